"""What the router knows about the served model: names, context length, vocabulary, tokenizer.

Built once from the first healthy worker's ``/model_info`` and ``/v1/models`` (by
``workers.WorkerPool``) and read by ``validation`` on every request. The tokenizer is loaded from
the folder the worker reports (or ``--tokenizer``) when that folder exists on this machine; without
it, token ids are not range-checked and prompt length is left to the worker.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


class PromptCounter:
    """Counts prompt tokens exactly with the model's tokenizer (loaded lazily, once)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path)

    def count_text(self, text: str) -> int:
        return len(self.text_ids(text))

    def count_chat(self, messages: list[dict[str, Any]]) -> int:
        return len(self.chat_ids(messages))

    def text_ids(self, text: str) -> list[int]:
        """The ids SGLang makes of a text prompt (``tokenizer.encode``, special tokens on)."""
        return list(self._tok(text, add_special_tokens=True)["input_ids"])

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The ids of the chat template applied with the generation prompt, as SGLang's chat
        completions make them for plain messages (no tools, no template arguments)."""
        ids = self._tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5: a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)


@dataclass(frozen=True)
class ModelInfo:
    served_names: frozenset[str]
    """Model ids the workers answer to (``model`` must be one of them)."""
    context_length: int | None
    """Maximum prompt + completion tokens, from ``/v1/models`` ``max_model_len``."""
    vocab_size: int | None
    """Embedding rows; token ids must be below this (from the model's config.json)."""
    counter: PromptCounter | None
    """Exact token counting, where the tokenizer folder is readable here."""

    @staticmethod
    def from_worker(model_info: dict[str, Any], models: dict[str, Any],
                    tokenizer_path: str | None) -> ModelInfo:
        names = {str(m["id"]) for m in models.get("data", []) if "id" in m}
        if model_info.get("served_model_name"):
            names.add(str(model_info["served_model_name"]))
        context = next((int(m["max_model_len"]) for m in models.get("data", [])
                        if m.get("max_model_len")), None)
        path = tokenizer_path or model_info.get("tokenizer_path") or model_info.get("model_path")
        vocab_size, counter = None, None
        if path and os.path.isdir(path):
            vocab_size = _read_vocab_size(path)
            try:
                counter = PromptCounter(path)
            except Exception as exc:  # a tokenizer that cannot load must not stop routing
                logger.warning("cannot load tokenizer from %s (%s); prompt lengths are "
                               "left to the workers", path, exc)
        else:
            logger.warning("tokenizer folder %r is not readable here; out-of-vocabulary token "
                           "ids cannot be rejected by the router (pass --tokenizer)", path)
        return ModelInfo(frozenset(names), context, vocab_size, counter)


def _read_vocab_size(path: str) -> int | None:
    config = os.path.join(path, "config.json")
    if not os.path.exists(config):
        return None
    with open(config) as f:
        data = json.load(f)
    value = data.get("vocab_size") or data.get("text_config", {}).get("vocab_size")
    return int(value) if value else None
