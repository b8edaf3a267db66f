"""Training data for the predictor: (prompt, output length in tokens, bucket), split three ways.

Who calls what: ``python -m profiler_ft build-dataset`` calls `build`; `train` and `eval` call
`read_split`. Input files are JSON (a list of records) or JSONL, in any of these shapes:

- Alpaca: ``{"instruction", "input"?, "output"}``;
- ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}``: every
  assistant turn is one example, the turns before it its prompt;
- OpenAI chat: ``{"messages": [..., {"role": "assistant", "content"}]}``;
- prompt/response pairs: ``{"prompt", "response"}``.

The output length is the reference answer's length in the served model's tokens (no special
tokens). A record without a reference answer is skipped and counted (``--strict`` makes it an
error); a file with no usable record at all is an error.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from profiler_ft.buckets import Buckets
from profiler_ft.errors import ProfilerError
from profiler_ft.text import messages_text

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
          "bard": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class DatasetConfig:
    inputs: tuple[str, ...]
    """Instruction files with reference answers (JSON or JSONL)."""
    out_dir: str
    """Where train/validation/test JSONL and dataset.json are written."""
    tokenizer: str = "smollm2"
    """The served model's tokenizer as given, recorded in dataset.json: a folder, or a prepared
    model name (smollm2, tiny) the caller resolved into ``tokenizer_dir``."""
    tokenizer_dir: str = ""
    """The tokenizer's folder when the caller resolved ``tokenizer`` itself (the CLI does so with
    ``runtime_patches.models``); empty: ``tokenizer`` must be a folder."""
    buckets: str = "pow2"
    """Bucket preset or comma-separated upper bounds (see profiler_ft/buckets.py)."""
    validation_fraction: float = 0.15
    """Share of examples held out for choosing the checkpoint."""
    test_fraction: float = 0.15
    """Share of examples held out for `eval`."""
    seed: int = 0
    """Shuffle seed for the split."""
    limit: int = 0
    """Keep only the first N examples (0: all)."""
    strict: bool = False
    """Fail on the first record without a reference answer instead of skipping it."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: give at least one data file")
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}: must be in [0, 1), got {value}")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError("validation_fraction + test_fraction must leave training data")
        if self.limit < 0:
            raise ValueError(f"limit: must be >= 0, got {self.limit}")
        Buckets.parse(self.buckets)


@dataclass
class Example:
    prompt: str
    """The prompt as the served model's chat template renders it."""
    text: str
    """What the backbone reads (profiler_ft/text.py)."""
    prompt_tokens: int
    output_tokens: int
    bucket: int
    source: str = ""
    """``file#record`` (``#turn`` for ShareGPT)."""


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    output: str
    source: str
    extra: dict[str, Any] = field(default_factory=dict)


def _read_records(path: str) -> list[Any]:
    if not os.path.isfile(path):
        raise ProfilerError(f"{path}: no such data file")
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
        head = raw.lstrip()[:1]
        if path.endswith(".jsonl") or head not in ("[", "{"):
            return [json.loads(line) for line in raw.split("\n") if line.strip()]
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            if head != "{":
                raise
            # one object per line: JSONL under another extension
            return [json.loads(line) for line in raw.split("\n") if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProfilerError(f"{path}: not valid JSON or JSONL ({exc})") from None
    if isinstance(data, dict):
        data = data.get("data", [data])
    if not isinstance(data, list):
        raise ProfilerError(f"{path}: expected a list of records")
    return data


def _conversations(record: Any, source: str) -> Iterator[Conversation | str]:
    """Yield one Conversation per reference answer, or a reason string for a skipped record."""
    if not isinstance(record, dict):
        yield "is not a JSON object"
        return
    if "instruction" in record:
        question = str(record.get("instruction") or "")
        if record.get("input"):
            question += "\n\n" + str(record["input"])
        output = record.get("output")
        if not isinstance(output, str) or not output.strip():
            yield "has no reference answer ('output' missing or empty)"
            return
        yield Conversation([{"role": "user", "content": question}], output, source)
        return
    if isinstance(record.get("conversations"), list) or isinstance(record.get("messages"), list):
        turns = record.get("conversations") or record.get("messages")
        history: list[dict[str, str]] = []
        found = False
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                continue
            role = _ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
            content = turn.get("value", turn.get("content"))
            if role is None or not isinstance(content, str):
                continue
            asked = any(m["role"] == "user" for m in history)
            if role == "assistant" and asked and content.strip():
                found = True
                yield Conversation(list(history), content, f"{source}#{i}")
            history.append({"role": role, "content": content})
        if not found:
            yield "has no assistant answer after a user turn"
        return
    if "prompt" in record:
        output = record.get("response", record.get("output"))
        if not isinstance(output, str) or not output.strip():
            yield "has no reference answer ('response' missing or empty)"
            return
        yield Conversation([{"role": "user", "content": str(record["prompt"])}], output, source)
        return
    yield "has none of the known shapes (instruction/output, conversations, messages, prompt)"


def load_conversations(paths: tuple[str, ...], strict: bool) -> list[Conversation]:
    found: list[Conversation] = []
    for path in paths:
        records = _read_records(path)
        usable, skipped, first_reason = 0, 0, ""
        for index, record in enumerate(records):
            for item in _conversations(record, f"{os.path.basename(path)}#{index}"):
                if isinstance(item, str):
                    if strict:
                        raise ProfilerError(f"{path}: record {index} {item}")
                    skipped += 1
                    first_reason = first_reason or f"record {index} {item}"
                else:
                    usable += 1
                    found.append(item)
        if usable == 0:
            detail = f" (first: {first_reason})" if first_reason else " (the file is empty)"
            raise ProfilerError(f"{path}: no record with a reference answer{detail}; "
                                "output lengths need reference answers")
        if skipped:
            log.warning("%s: skipped %d record(s) without a reference answer (first: %s)",
                        path, skipped, first_reason)
    return found


def split_indices(n: int, validation_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, list[int]]:
    """A seeded shuffle cut into train/validation/test; every index lands in exactly one."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    num_test = round(n * test_fraction)
    num_val = round(n * validation_fraction)
    return {"test": sorted(order[:num_test]),
            "validation": sorted(order[num_test:num_test + num_val]),
            "train": sorted(order[num_test + num_val:])}


def label(conversations: list[Conversation], tokenizer: Any, buckets: Buckets,
          progress: bool = True) -> list[Example]:
    """Render each prompt with the chat template and count the answer's tokens."""
    from tqdm import tqdm

    examples = []
    for conv in tqdm(conversations, desc="tokenizing", unit="ex", disable=not progress):
        prompt = tokenizer.apply_chat_template(conv.messages, tokenize=False,
                                               add_generation_prompt=True)
        num_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        num_output = len(tokenizer(conv.output, add_special_tokens=False)["input_ids"])
        examples.append(Example(prompt=prompt, text=messages_text(conv.messages),
                                prompt_tokens=num_prompt, output_tokens=num_output,
                                bucket=buckets.index(num_output), source=conv.source))
    return examples


def load_tokenizer(folder: str) -> tuple[Any, str]:
    """The served model's tokenizer and its (absolute) folder."""
    from transformers import AutoTokenizer

    if not os.path.isdir(folder):
        raise ProfilerError(f"tokenizer: {folder!r} is not a folder (a prepared model name such "
                            "as smollm2 is resolved by python -m profiler_ft)")
    folder = os.path.abspath(folder)
    try:
        return AutoTokenizer.from_pretrained(folder), folder
    except (OSError, ValueError) as exc:
        raise ProfilerError(f"tokenizer: cannot load one from {folder}: {exc}") from None


def build(cfg: DatasetConfig, progress: bool = True) -> dict[str, Any]:
    """Write the three splits and dataset.json; return dataset.json's contents."""
    buckets = Buckets.parse(cfg.buckets)
    conversations = load_conversations(cfg.inputs, cfg.strict)
    if cfg.limit:
        conversations = conversations[:cfg.limit]
    tokenizer, folder = load_tokenizer(cfg.tokenizer_dir or cfg.tokenizer)
    examples = label(conversations, tokenizer, buckets, progress)
    parts = split_indices(len(examples), cfg.validation_fraction, cfg.test_fraction, cfg.seed)
    if not parts["train"]:
        raise ProfilerError(f"only {len(examples)} example(s): nothing left to train on")
    os.makedirs(cfg.out_dir, exist_ok=True)
    counts = {}
    for split in SPLITS:
        rows = [examples[i] for i in parts[split]]
        counts[split] = len(rows)
        tmp = os.path.join(cfg.out_dir, f".{split}.jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")
        os.replace(tmp, os.path.join(cfg.out_dir, f"{split}.jsonl"))
    histogram = [0] * buckets.num_buckets
    for ex in examples:
        histogram[ex.bucket] += 1
    meta = {"config": asdict(cfg), "tokenizer_dir": folder, "bucket_bounds": list(buckets.bounds),
            "bucket_labels": buckets.labels(), "bucket_counts": histogram, "split_sizes": counts}
    with open(os.path.join(cfg.out_dir, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def read_meta(data_dir: str) -> dict[str, Any]:
    path = os.path.join(data_dir, "dataset.json")
    if not os.path.isfile(path):
        raise ProfilerError(f"{data_dir}: not a dataset folder (no dataset.json); "
                            "run `python -m profiler_ft build-dataset` first")
    with open(path) as f:
        return json.load(f)


def read_split(data_dir: str, split: str) -> list[Example]:
    path = os.path.join(data_dir, f"{split}.jsonl")
    if not os.path.isfile(path):
        raise ProfilerError(f"{data_dir}: no {split}.jsonl; run `python -m profiler_ft "
                            "build-dataset` first")
    with open(path, encoding="utf-8") as f:
        rows = [Example(**json.loads(line)) for line in f if line.strip()]
    if not rows:
        raise ProfilerError(f"{path}: the {split} split is empty")
    return rows
