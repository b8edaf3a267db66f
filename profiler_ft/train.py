"""LoRA fine-tuning of the predictor: seeded, checkpointed, resumable.

Who calls what: ``python -m profiler_ft train`` calls `train`. Determinism: the data order of
epoch e is a shuffle seeded by (seed, e) and dropout in step s is seeded by (seed, s), so a run
killed and resumed from a checkpoint (optimizer, scheduler and adapter restored) takes exactly the
steps an uninterrupted run takes. Re-running `train` on the same folder resumes from the last
checkpoint; a finished folder is left alone unless ``--restart``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from profiler_ft import backbone as bb
from profiler_ft import checkpoints
from profiler_ft.artifact import PredictorMeta, adapter_dir
from profiler_ft.buckets import Buckets
from profiler_ft.dataset import Example, read_meta, read_split
from profiler_ft.errors import ProfilerError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    data_dir: str
    """A folder written by build-dataset."""
    out_dir: str
    """The predictor folder (adapter, predictor.json, checkpoints)."""
    backbone: str = bb.DEFAULT
    """The backbone as given, recorded in predictor.json: a folder, all-MiniLM-L6-v2, a name in
    the local HF cache (see profiler_ft/backbone.py), or a name the caller resolved into
    ``backbone_dir`` (the CLI does so for a prepared BanaServe model such as smollm2)."""
    backbone_dir: str = ""
    """The backbone's folder when the caller resolved ``backbone`` itself (empty: resolve
    ``backbone`` here)."""
    epochs: int = 3
    """Passes over the training split."""
    batch_size: int = 32
    """Examples per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate (linear warm-up, then linear decay)."""
    warmup_fraction: float = 0.06
    """Share of all steps spent warming up."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    max_length: int = 128
    """Backbone tokens per prompt (a longer prompt keeps its end)."""
    lora: bb.LoraSettings = bb.LoraSettings()
    """LoRA rank, alpha and dropout."""
    seed: int = 0
    """Seed for data order, dropout and the head's initialisation."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every N steps (and at each epoch's end)."""
    max_steps: int = 0
    """Stop after N steps in all (0: run every epoch); for smoke runs."""
    limit: int = 0
    """Train on the first N training examples only (0: all)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction: must be in [0, 1), got {self.warmup_fraction}")
        if self.max_steps < 0 or self.limit < 0:
            raise ValueError("max_steps and limit must be >= 0")

    def run_identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the one it resumes."""
        skip = {"out_dir", "checkpoint_every", "max_steps", "backbone_dir"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def _bucket_lengths(train: list[Example], buckets: Buckets) -> list[int]:
    lengths = []
    for index in range(buckets.num_buckets):
        seen = [ex.output_tokens for ex in train if ex.bucket == index]
        lengths.append(int(statistics.median(seen)) if seen else buckets.fallback_length(index))
    return lengths


def _batches(num: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(num))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, num, batch_size)]


def _evaluate(model: Any, tok: Any, rows: list[Example], cfg: TrainConfig) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(rows), 64):
            chunk = rows[start:start + 64]
            enc = tok([r.text for r in chunk], padding=True, truncation=True,
                      max_length=cfg.max_length, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1).tolist()
            correct += sum(int(p == r.bucket) for p, r in zip(pred, chunk, strict=True))
    model.train()
    return correct / len(rows)


def train(cfg: TrainConfig, progress: bool = True, restart: bool = False) -> PredictorMeta:
    data_meta = read_meta(cfg.data_dir)
    buckets = Buckets(tuple(data_meta["bucket_bounds"]))
    rows = read_split(cfg.data_dir, "train")
    rows = rows[:cfg.limit] if cfg.limit else rows
    val = read_split(cfg.data_dir, "validation") if os.path.isfile(
        os.path.join(cfg.data_dir, "validation.jsonl")) else []
    folder = bb.resolve(cfg.backbone_dir or cfg.backbone)
    import torch
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    if restart:
        shutil.rmtree(cfg.out_dir, ignore_errors=True)
    os.makedirs(cfg.out_dir, exist_ok=True)
    if os.path.isfile(os.path.join(cfg.out_dir, "predictor.json")) and not checkpoints.latest(
            cfg.out_dir):
        raise ProfilerError(f"{cfg.out_dir}: already holds a finished predictor; pass --restart "
                            "to train a new one there")
    torch.manual_seed(cfg.seed)
    model, tok = bb.build_for_training(folder, buckets.num_buckets, cfg.lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(rows) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total * cfg.warmup_fraction), total)
    state = checkpoints.resume(cfg.out_dir, cfg.run_identity(), model, optimizer, scheduler)
    step, history = state.step, state.history
    if step:
        log.warning("resuming %s from step %d of %d", cfg.out_dir, step, total)
    stop_at = min(total, cfg.max_steps) if cfg.max_steps else total
    bar = tqdm(total=stop_at, initial=step, desc="training", unit="step", disable=not progress)
    epoch_started = time.monotonic()
    while step < stop_at:
        epoch, offset = divmod(step, steps_per_epoch)
        batch = _batches(len(rows), cfg.batch_size, cfg.seed, epoch)[offset]
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        enc = tok([rows[i].text for i in batch], padding=True, truncation=True,
                  max_length=cfg.max_length, return_tensors="pt")
        labels = torch.tensor([rows[i].bucket for i in batch])
        loss = torch.nn.functional.cross_entropy(model(**enc).logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch + 1)
        epoch_done = step % steps_per_epoch == 0
        if epoch_done:
            seconds = time.monotonic() - epoch_started
            acc = _evaluate(model, tok, val, cfg) if val else None
            history.append({"epoch": epoch + 1, "step": step, "seconds": round(seconds, 1),
                            "loss": round(loss.item(), 4), "validation_accuracy": acc})
            with open(os.path.join(cfg.out_dir, "train_log.jsonl"), "a") as f:
                f.write(json.dumps(history[-1]) + "\n")
            best = max((h["validation_accuracy"] or 0) for h in history)
            if acc is None or acc >= best:
                checkpoints.save_best(cfg.out_dir, model)
            epoch_started = time.monotonic()
        if epoch_done or step % cfg.checkpoint_every == 0 or step == stop_at:
            checkpoints.save(cfg.out_dir, step, cfg.run_identity(), model, optimizer, scheduler,
                             history)
    bar.close()
    if step < total:
        log.warning("stopped at step %d of %d (--max-steps); the adapter is the current one",
                    step, total)
        checkpoints.save_best(cfg.out_dir, model)
    return _finish(cfg, folder, buckets, rows, data_meta, history, step)


def _finish(cfg: TrainConfig, folder: str, buckets: Buckets, rows: list[Example],
            data_meta: dict[str, Any], history: list[dict[str, Any]],
            step: int) -> PredictorMeta:
    best = checkpoints.best_dir(cfg.out_dir)
    final = adapter_dir(cfg.out_dir)
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(best, final)
    seconds = [h["seconds"] for h in history]
    meta = PredictorMeta(
        backbone=cfg.backbone, backbone_dir=folder, backbone_type=bb.model_type(folder),
        bucket_bounds=list(buckets.bounds), bucket_lengths=_bucket_lengths(rows, buckets),
        max_length=cfg.max_length, tokenizer_dir=data_meta.get("tokenizer_dir", ""),
        lora=asdict(cfg.lora), train=asdict(cfg) | {"steps": step, "examples": len(rows)},
        metrics={"history": history,
                 "seconds_per_epoch": round(statistics.mean(seconds), 1) if seconds else None,
                 "best_validation_accuracy": max(
                     (h["validation_accuracy"] or 0 for h in history), default=None)})
    meta.save(cfg.out_dir)
    if step >= cfg.epochs * -(-len(rows) // cfg.batch_size):
        checkpoints.clear(cfg.out_dir)
    return meta
