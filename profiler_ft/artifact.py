"""A trained predictor on disk: the folder layout and its metadata file.

Layout of a predictor folder (written by `train`, read by `predictor.LengthPredictor.load`)::

    predictor.json     PredictorMeta below (backbone, buckets, lengths, metrics)
    adapter/           the LoRA adapter and classification head (peft's save_pretrained)
    checkpoints/       step-NNNNNNN/state.pt while training (adapter, optimizer, scheduler, step);
                       the last two are kept
    best/              the adapter of the best epoch so far (copied to adapter/ at the end)
    train_log.jsonl    one line per epoch
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from profiler_ft.buckets import Buckets
from profiler_ft.errors import ProfilerError

FORMAT = 1
META = "predictor.json"
ADAPTER = "adapter"


@dataclass
class PredictorMeta:
    backbone: str
    """The backbone as given (a name or a folder)."""
    backbone_dir: str
    """The folder it resolved to when training."""
    backbone_type: str
    """``model_type`` from the backbone's config.json (bert, llama, ...)."""
    bucket_bounds: list[int]
    bucket_lengths: list[int]
    """Implied length per bucket: the median training length in it."""
    max_length: int
    """Backbone tokens read per prompt (longer prompts keep their end)."""
    tokenizer_dir: str = ""
    """The served model's tokenizer the labels were counted with."""
    lora: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT

    @property
    def buckets(self) -> Buckets:
        return Buckets(tuple(self.bucket_bounds))

    def save(self, folder: str) -> None:
        tmp = os.path.join(folder, f".{META}.tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=2)
        os.replace(tmp, os.path.join(folder, META))

    @classmethod
    def load(cls, folder: str) -> PredictorMeta:
        path = os.path.join(folder, META)
        if not os.path.isdir(folder):
            raise ProfilerError(f"{folder}: no such predictor folder")
        if not os.path.isfile(path):
            raise ProfilerError(f"{folder}: not a trained predictor (no {META}); run "
                                "`python -m profiler_ft train` first")
        try:
            with open(path) as f:
                raw = json.load(f)
            meta = cls(**raw)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ProfilerError(f"{path}: unreadable predictor metadata ({exc})") from None
        if meta.format != FORMAT:
            raise ProfilerError(f"{path}: format {meta.format}, this version reads {FORMAT}")
        if len(meta.bucket_lengths) != len(meta.bucket_bounds) + 1:
            raise ProfilerError(f"{path}: {len(meta.bucket_lengths)} bucket lengths for "
                                f"{len(meta.bucket_bounds) + 1} buckets")
        return meta


def adapter_dir(folder: str) -> str:
    return os.path.join(folder, ADAPTER)
