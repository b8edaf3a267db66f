"""The prediction API: load a trained predictor once, then predict for batches of prompts.

Who calls what: the router's `router/length.py` (one `LengthPredictor` per router process, its
`predict` called from one worker thread with micro-batches), `python -m profiler_ft predict` and
`eval`. `predict` is thread-compatible, not thread-safe: call it from one thread at a time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from profiler_ft import backbone
from profiler_ft.artifact import PredictorMeta, adapter_dir
from profiler_ft.errors import ProfilerError

log = logging.getLogger(__name__)
SUB_BATCH = 8


@dataclass(frozen=True)
class Prediction:
    bucket: int
    """Index of the most likely bucket."""
    label: str
    """The bucket as text (``33-64``)."""
    length: int
    """Implied output length in tokens: the median training length of the bucket."""
    probs: tuple[float, ...]
    """Probability of each bucket."""

    def as_dict(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "label": self.label, "length": self.length,
                "probs": [round(p, 4) for p in self.probs]}


class LengthPredictor:
    def __init__(self, meta: PredictorMeta, model: Any, tokenizer: Any) -> None:
        self.meta = meta
        self.buckets = meta.buckets
        self._model = model
        self._tokenizer = tokenizer

    @classmethod
    def load(cls, folder: str, merge: bool = True) -> LengthPredictor:
        """Load ``folder`` (see profiler_ft/artifact.py); ProfilerError on anything missing or
        mismatched. ``merge`` folds the LoRA weights into the backbone for faster inference."""
        meta = PredictorMeta.load(folder)
        adapter = adapter_dir(folder)
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise ProfilerError(f"{folder}: the adapter is missing ({adapter}/adapter_config.json)")
        from peft import PeftModel

        if os.path.isdir(meta.backbone_dir):
            folder_bb = backbone.resolve(meta.backbone_dir)
        else:  # trained elsewhere: find the backbone by the name it was given
            try:
                folder_bb = backbone.resolve(meta.backbone)
            except ProfilerError as exc:
                raise ProfilerError(f"{folder}: the backbone folder {meta.backbone_dir} is "
                                    f"missing and {exc}") from None
        found_type = backbone.model_type(folder_bb)
        if found_type != meta.backbone_type:
            raise ProfilerError(f"{folder}: trained on a {meta.backbone_type} backbone, but "
                                f"{folder_bb} is {found_type or 'unknown'}")
        tok = backbone.load_tokenizer(folder_bb)
        base = backbone.load_classifier(folder_bb, meta.buckets.num_buckets, tok.pad_token_id)
        try:
            model = PeftModel.from_pretrained(base, adapter)
        except (RuntimeError, ValueError, KeyError) as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            first = next((ln for ln in lines if "mismatch" in ln or "Missing" in ln),
                         lines[0] if lines else type(exc).__name__)
            raise ProfilerError(f"{folder}: the adapter does not fit backbone {folder_bb}: "
                                f"{first}") from None
        if merge:
            model = model.merge_and_unload()
        model.eval()
        return cls(meta, model, tok)

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """One Prediction per text, in order (one forward pass for the whole list)."""
        if not texts:
            return []
        probs = self.probabilities(texts)
        out = []
        for row in probs:
            best = max(range(len(row)), key=row.__getitem__)
            out.append(Prediction(bucket=best, label=self.buckets.label(best),
                                  length=self.meta.bucket_lengths[best], probs=tuple(row)))
        return out

    def probabilities(self, texts: Sequence[str]) -> list[list[float]]:
        """Bucket probabilities per text. The texts are sorted by token count and run in
        sub-batches of ``SUB_BATCH``, each padded to its own longest: a batch of mixed prompts
        padded to its longest would mostly compute padding (Alpaca: 18 tokens on average, the
        longest of 32 about 55)."""
        import torch

        enc = self._tokenizer(list(texts), truncation=True, max_length=self.meta.max_length)
        order = sorted(range(len(texts)), key=lambda i: len(enc["input_ids"][i]))
        out: list[list[float]] = [[] for _ in texts]
        with torch.inference_mode():
            for start in range(0, len(order), SUB_BATCH):
                chunk = order[start:start + SUB_BATCH]
                batch = self._tokenizer.pad({k: [v[i] for i in chunk] for k, v in enc.items()},
                                            return_tensors="pt")
                probs = torch.softmax(self._model(**batch).logits.float(), dim=-1).tolist()
                for i, row in zip(chunk, probs, strict=True):
                    out[i] = row
        return out

    def predict_many(self, texts: Sequence[str], batch_size: int = 32) -> list[Prediction]:
        """Batches of similar length (less padding), results in the input order."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: list[Prediction | None] = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, pred in zip(chunk, self.predict([texts[i] for i in chunk]), strict=True):
                results[i] = pred
        return [r for r in results if r is not None]
