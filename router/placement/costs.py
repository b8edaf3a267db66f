"""Per-layer memory and work of a Llama-like model, read from a HF ``config.json``: HELR's inputs.

Who calls what:
  ``load_model_config`` / ``ModelShape.from_config``  placement.py, on a model folder or an inline
                                                     config dict from ``POST /v1/plan/placement``
  ``model_costs``     placement.py: the placement units (embedding, each transformer layer, final
                      norm + LM head) with their weight bytes and KV bytes per token
  ``unit_time``       placement.py: analytic roofline time of one unit on one GPU for a Workload

Units are what HELR places: unit 0 is the embedding, units 1..L the transformer layers, unit L+1
the final norm with the LM head. Weights are counted as HF stores them (q, k, v, o, gate, up,
down, two RMSNorms per layer; biases when ``attention_bias`` / ``mlp_bias`` say so), so the sum
over units matches the safetensors parameter count times the dtype size. With tied embeddings
the head needs its own copy only when it sits on another GPU than the embedding (SGLang builds
the embedding on the first pipeline rank and the head on the last); ``ModelCosts.shared_bytes``
is what a single stage saves.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4, "int8": 1}
"""Bytes per weight. KV cache and activations use the same size, except int8 (16-bit)."""

_DTYPE_ALIASES: dict[str, str] = {
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
    "int8": "int8", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32",
}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "vocab_size")


def normalise_dtype(name: str) -> str:
    """Map ``bfloat16``/``bf16``/``torch.float16``... to one of ``DTYPE_BYTES``' keys."""
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"dtype: unknown dtype {name!r}; use one of {', '.join(DTYPE_BYTES)}")
    return _DTYPE_ALIASES[key]


def _positive_int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.{key}: expected a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelShape:
    """The fields of a LlamaForCausalLM-like ``config.json`` that decide memory and work."""

    hidden_size: int
    """Model width d."""
    intermediate_size: int
    """MLP width (gate, up and down projections)."""
    num_hidden_layers: int
    """Transformer layers L."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """KV heads (grouped-query attention); equals the query heads without GQA."""
    head_dim: int
    """Per-head width; ``hidden_size // num_attention_heads`` unless the config says otherwise."""
    vocab_size: int
    """Rows of the embedding and of the LM head."""
    tie_word_embeddings: bool = False
    """The LM head reuses the embedding matrix (no ``lm_head.weight`` in the checkpoint)."""
    attention_bias: bool = False
    """q, k, v and o projections carry biases."""
    mlp_bias: bool = False
    """gate, up and down projections carry biases."""
    config_dtype: str = "bf16"
    """Dtype named by the config (``torch_dtype`` or ``dtype``); the default dtype for costs."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"config.{name}: expected a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config.num_key_value_heads: {self.num_key_value_heads} does not "
                             f"divide num_attention_heads {self.num_attention_heads}")
        if self.config_dtype not in DTYPE_BYTES:
            raise ValueError(f"config.torch_dtype: unknown dtype {self.config_dtype!r}")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """Read a parsed ``config.json`` (raises ``ValueError`` naming the bad ``config.*`` key)."""
        if not isinstance(config, dict):
            raise ValueError(f"config: expected a JSON object, got {type(config).__name__}")
        values = {key: _positive_int(config, key) for key in _REQUIRED}
        kv_heads = config.get("num_key_value_heads") or values["num_attention_heads"]
        head_dim = config.get("head_dim") or values["hidden_size"] // values["num_attention_heads"]
        dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
        try:
            dtype = normalise_dtype(dtype)
        except ValueError as exc:
            raise ValueError(f"config.torch_dtype: {str(exc).removeprefix('dtype: ')}") from exc
        return cls(num_key_value_heads=kv_heads, head_dim=head_dim,
                   tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                   attention_bias=bool(config.get("attention_bias", False)),
                   mlp_bias=bool(config.get("mlp_bias", False)),
                   config_dtype=dtype, **values)

    def layer_params(self) -> int:
        """Parameters of one transformer layer."""
        d, q_width = self.hidden_size, self.num_attention_heads * self.head_dim
        kv_width = self.num_key_value_heads * self.head_dim
        attention = d * q_width + 2 * d * kv_width + q_width * d
        if self.attention_bias:
            attention += q_width + 2 * kv_width + d
        mlp = 3 * d * self.intermediate_size
        if self.mlp_bias:
            mlp += 2 * self.intermediate_size + d
        return attention + mlp + 2 * d

    def checkpoint_params(self) -> int:
        """Parameters in the checkpoint: embedding, layers, final norm, untied LM head."""
        embedding = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embedding
        return embedding + self.num_hidden_layers * self.layer_params() + self.hidden_size + head


def load_model_config(source: str | dict[str, Any]) -> dict[str, Any]:
    """A config dict given inline, or ``<folder>/config.json`` (or a path to a JSON file)."""
    if isinstance(source, dict):
        return source
    path = os.path.join(source, "config.json") if os.path.isdir(source) else source
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as exc:
        raise ValueError(f"model: cannot read {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"model: {path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"model: {path} does not hold a JSON object")
    return config


@dataclass(frozen=True)
class UnitCost:
    """One placement unit: memory it pins and work it does per token."""

    name: str
    """``embedding``, ``layer N`` (0-based, as SGLang counts) or ``lm_head``."""
    weight_bytes: int
    """Weights resident on the unit's GPU (the LM head counts its own copy when tied)."""
    kv_bytes_per_token: int
    """KV cache bytes one token occupies in this unit (0 outside transformer layers)."""
    matmul_flops_per_token: int
    """2 x multiply-accumulates of the weight matmuls for one token."""
    attention_flops_per_context: int
    """Extra FLOPs per token per token of context (QK^T and AV), 0 outside layers."""
    row_bytes_per_token: int = 0
    """Bytes gathered per token instead of streaming all weights (the embedding's one row)."""


@dataclass(frozen=True)
class ModelCosts:
    """All placement units of one model at one dtype."""

    units: tuple[UnitCost, ...]
    """Embedding, the L transformer layers, final norm + LM head, in order."""
    dtype: str
    """Weight dtype (a ``DTYPE_BYTES`` key)."""
    act_bytes: int
    """Bytes per activation / KV element."""
    hidden_size: int
    """Model width, for activation hand-off sizes."""
    intermediate_size: int
    """MLP width, for the activation workspace estimate."""
    shared_bytes: int
    """Bytes saved when embedding and LM head share a GPU (tied embeddings), else 0."""

    @property
    def num_layers(self) -> int:
        """Transformer layers (units minus embedding and head)."""
        return len(self.units) - 2

    @property
    def handoff_bytes_per_token(self) -> int:
        """Bytes sent across a stage boundary per token: hidden states and residual (SGLang's
        ``PPProxyTensors`` for Llama carry both)."""
        return 2 * self.hidden_size * self.act_bytes

    def total_weight_bytes(self) -> int:
        """Weight bytes of the whole model on one GPU (the checkpoint size)."""
        return sum(u.weight_bytes for u in self.units) - self.shared_bytes


def model_costs(shape: ModelShape, dtype: str | None = None) -> ModelCosts:
    """Placement units for ``shape`` at ``dtype`` (default: the config's dtype)."""
    dtype = normalise_dtype(dtype) if dtype else shape.config_dtype
    wbytes = DTYPE_BYTES[dtype]
    act = 2 if dtype == "int8" else wbytes
    d = shape.hidden_size
    embed = shape.vocab_size * d
    layer_params = shape.layer_params()
    matmul = layer_params - 2 * d - _bias_params(shape)
    kv_per_token = 2 * shape.num_key_value_heads * shape.head_dim * act
    attention = 4 * shape.num_attention_heads * shape.head_dim
    units = [UnitCost("embedding", embed * wbytes, 0, 0, 0, row_bytes_per_token=d * wbytes)]
    units += [UnitCost(f"layer {i}", layer_params * wbytes, kv_per_token, 2 * matmul, attention)
              for i in range(shape.num_hidden_layers)]
    units.append(UnitCost("lm_head", (embed + d) * wbytes, 0, 2 * embed, 0))
    shared = embed * wbytes if shape.tie_word_embeddings else 0
    return ModelCosts(units=tuple(units), dtype=dtype, act_bytes=act, hidden_size=d,
                      intermediate_size=shape.intermediate_size, shared_bytes=shared)


def _bias_params(shape: ModelShape) -> int:
    d, i = shape.hidden_size, shape.intermediate_size
    q_width = shape.num_attention_heads * shape.head_dim
    kv_width = shape.num_key_value_heads * shape.head_dim
    total = q_width + 2 * kv_width + d if shape.attention_bias else 0
    return total + (2 * i + d if shape.mlp_bias else 0)


@dataclass(frozen=True)
class Workload:
    """The batch a placement is sized for."""

    batch_size: int = 1
    """Sequences served together (b)."""
    prompt_tokens: int = 512
    """Prompt length per sequence (s)."""
    output_tokens: int = 128
    """Predicted output length per sequence (o); 0 sizes for prefill only."""
    prefill_chunk_tokens: int = 8192
    """Tokens per prefill forward (SGLang's ``--chunked-prefill-size``): bounds the workspace."""

    def __post_init__(self) -> None:
        for name, low in (("batch_size", 1), ("prompt_tokens", 1), ("output_tokens", 0),
                          ("prefill_chunk_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")

    @property
    def reserved_tokens(self) -> int:
        """KV tokens to reserve: r = b * (s + o)."""
        return self.batch_size * (self.prompt_tokens + self.output_tokens)

    @property
    def decode_context(self) -> float:
        """Mean context length over the decode steps."""
        return self.prompt_tokens + self.output_tokens / 2

    def activation_bytes(self, costs: ModelCosts) -> int:
        """Per-stage activation workspace: one prefill chunk through the widest layer
        (4 x hidden for hidden states, residual, q and attention out; 2 x MLP width)."""
        width = 4 * costs.hidden_size + 2 * costs.intermediate_size
        tokens = min(self.batch_size * self.prompt_tokens, self.prefill_chunk_tokens)
        return tokens * width * costs.act_bytes


def unit_time(unit: UnitCost, work: Workload, peak_flops: float, mem_bw: float) -> float:
    """Seconds for ``unit`` to serve ``work`` on one GPU: the prefill plus every decode step, each
    ``max(flops / peak_flops, bytes / mem_bw)`` (roofline). Matmul units read all their weights
    once per pass; the embedding reads one row per token; the LM head computes logits for the
    last position only, as SGLang does."""
    b, s, ctx = work.batch_size, work.prompt_tokens, work.decode_context
    streamed = unit.weight_bytes if unit.matmul_flops_per_token else 0
    prefill_tokens = b if unit.name == "lm_head" else b * s
    prefill_flops = (prefill_tokens * unit.matmul_flops_per_token
                     + b * unit.attention_flops_per_context * s * s / 2)
    prefill_bytes = (streamed + prefill_tokens * unit.row_bytes_per_token
                     + b * s * unit.kv_bytes_per_token)
    step_flops = b * (unit.matmul_flops_per_token + unit.attention_flops_per_context * ctx)
    step_bytes = streamed + b * unit.row_bytes_per_token + b * ctx * unit.kv_bytes_per_token
    prefill = max(prefill_flops / peak_flops, prefill_bytes / mem_bw)
    decode = max(step_flops / peak_flops, step_bytes / mem_bw)
    return prefill + work.output_tokens * decode
