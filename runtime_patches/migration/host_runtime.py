"""The layer host's SGLang side: builds decoder layers [s, e) of a source model and runs them.

Who calls what: ``runtime_patches.migration.host`` (one session per connected worker) creates
one :class:`LayerRange` when the worker opens a migration, feeds it the weights
(``load_layer``) and the KV of live slots (``put_kv``), then calls ``forward`` once per model
step of the worker; ``get_kv`` hands the KV back when the worker restores the layers.

The layers are SGLang's own classes (``LlamaDecoderLayer`` and friends, built inside SGLang's
``layer_stack`` with the neighbours' stage declarations, as a pipeline rank builds its slice),
run with SGLang's ``torch_native`` attention backend over an ``MHATokenToKVPool`` holding only
layers [s, e). The pool has as many slots as the worker's, and the worker's slot ids are used
as they are, so no slot mapping is kept here: each step carries the batch's rows of the
worker's ``req_to_token`` table. The hand-off in and out is SGLang's pipeline hand-off
(``residual_batch.to_pp`` / ``attn_boundary.from_pp``), so hidden state and residual arrive
and leave exactly as between two pipeline ranks.

SGLang's parallel runtime (process groups of size 1, the published server args) is initialised
once per process, from the first session's model config; later sessions must use the same
architecture family. Pinned to sglang 0.5.23 (see ``runtime_patches.SGLANG_VERSION``).
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import socket
import tempfile
import threading
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from runtime_patches.migration.wire import parse_dtype

logger = logging.getLogger(__name__)

SUPPORTED_LAYER_CLASSES = frozenset({
    "sglang.srt.models.llama.LlamaDecoderLayer",
    "sglang.srt.models.qwen2.Qwen2DecoderLayer",
})
"""Decoder layer classes whose constructor is ``(config, layer_id, quant_config, prefix)``, with
``stage_facts(config, idx)``, and whose forward is ``(positions, hidden, forward_batch)``."""


class HostRefusal(ValueError):
    """A request the layer host cannot honour (bad range, unsupported model, ...)."""


@dataclass(frozen=True)
class RangeSpec:
    """What a worker sends to open a migrated range."""

    layer_class: str
    hf_config: dict[str, Any]
    start: int
    end: int
    dtype: str
    kv_size: int
    kv_page_size: int
    kv_dtype: str
    kv_head_num: int
    kv_head_dim: int
    kv_v_head_dim: int

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> RangeSpec:
        try:
            spec = cls(**{name: fields[name] for name in cls.__dataclass_fields__})
        except KeyError as exc:
            raise HostRefusal(f"open: missing field {exc.args[0]!r}") from None
        if spec.layer_class not in SUPPORTED_LAYER_CLASSES:
            raise HostRefusal(f"open: layer class {spec.layer_class} is not supported "
                              f"(supported: {sorted(SUPPORTED_LAYER_CLASSES)})")
        num_layers = int(spec.hf_config.get("num_hidden_layers", 0))
        if not 0 <= spec.start < spec.end <= num_layers:
            raise HostRefusal(f"open: layers [{spec.start}, {spec.end}) are not inside "
                              f"[0, {num_layers})")
        return spec


class _Runtime:
    """SGLang's process-wide state for this host, initialised once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._family: str | None = None
        self._dir: str | None = None

    def ensure(self, spec: RangeSpec) -> None:
        with self._lock:
            family = spec.hf_config.get("model_type", "?")
            if self._family is not None:
                if family != self._family:
                    raise HostRefusal(f"open: this layer host serves {self._family} models; "
                                      f"start another host for {family}")
                return
            self._dir = tempfile.mkdtemp(prefix="banaserve-layerhost-")
            with open(os.path.join(self._dir, "config.json"), "w") as fh:
                json.dump(spec.hf_config, fh)
            _init_sglang(self._dir, spec.dtype)
            self._family = family

    def warm(self, model_dir: str, dtype: str | None = None) -> None:
        """Initialise SGLang's runtime now, from a model folder's config.json, so the first
        migration does not pay for it (seconds during which the worker's scheduler waits).
        ``dtype``: the workers' served dtype; None: the launcher's choice on this machine."""
        with self._lock:
            if self._family is not None:
                return
            try:
                with open(os.path.join(model_dir, "config.json")) as fh:
                    config = json.load(fh)
            except (OSError, ValueError) as exc:
                raise HostRefusal(f"warm-up: cannot read {model_dir}/config.json: {exc}") \
                    from None
            if dtype is None:
                from runtime_patches.cpu_dtype import resolve

                device = "cpu" if not torch.cuda.is_available() else "cuda"
                dtype = resolve("auto", device, None).dtype or "auto"
            _init_sglang(model_dir, dtype)
            self._family = config.get("model_type", "?")


_RUNTIME = _Runtime()


def warm_up(model_dir: str, dtype: str | None = None) -> None:
    """See ``_Runtime.warm``."""
    _RUNTIME.warm(model_dir, dtype)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _init_sglang(model_dir: str, dtype: str) -> None:
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed import bootstrap
    from sglang.srt.runtime_context import SpawnRanks, publish
    from sglang.srt.server_args import ServerArgs

    device = "cpu" if not torch.cuda.is_available() else "cuda"
    server_args = ServerArgs(model_path=model_dir, device=device, dtype=dtype,
                             attention_backend="torch_native", skip_tokenizer_init=True)
    publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=0, dp_rank=None,
                                                           gpu_id=0))
    bootstrap.init_parallel_runtime(server_args=server_args, device=device,
                                    dist_port=_free_port())
    bootstrap.init_layer_runtime(model_config=ModelConfig.from_server_args(server_args))
    logger.info("SGLang runtime initialised for layer hosting (%s, %s)", device, dtype)


def _hf_config(spec: RangeSpec) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(**spec.hf_config)


class LayerRange:
    """Decoder layers [start, end) of one worker's model, with their KV pool."""

    def __init__(self, spec: RangeSpec) -> None:
        _RUNTIME.ensure(spec)
        self.spec = spec
        self.start, self.end = spec.start, spec.end
        self.dtype = parse_dtype(spec.dtype)
        self.layers = self._build_layers(spec)
        self.pool = self._build_pool(spec)
        self._req_to_token = SimpleNamespace(req_to_token=torch.zeros((1, 1), dtype=torch.int32))
        from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

        self.backend = TorchNativeAttnBackend(SimpleNamespace(
            device="cpu", req_to_token_pool=self._req_to_token, token_to_kv_pool=self.pool))
        self.loaded: set[int] = set()

    # -- construction ------------------------------------------------------------------------
    def _build_layers(self, spec: RangeSpec) -> torch.nn.ModuleList:
        from sglang.srt.layers.layer_boundary.factories import layer_stack
        from sglang.srt.model_loader.utils import set_default_torch_dtype

        module_name, _, class_name = spec.layer_class.rpartition(".")
        layer_cls = getattr(importlib.import_module(module_name), class_name)
        config = _hf_config(spec)
        num_layers = config.num_hidden_layers

        def facts(idx: int) -> Any:
            return layer_cls.stage_facts(config, idx)

        with set_default_torch_dtype(self.dtype), torch.device("cpu"), layer_stack(
            previous_layers=[functools.partial(facts, i) for i in reversed(range(spec.start))],
            next_layers=[functools.partial(facts, i) for i in range(spec.end, num_layers)],
        ):
            layers = [layer_cls(config=config, layer_id=i, quant_config=None,
                                prefix=f"model.layers.{i}")
                      for i in range(spec.start, spec.end)]
        return torch.nn.ModuleList(layers).eval()

    def _build_pool(self, spec: RangeSpec) -> Any:
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

        return MHATokenToKVPool(
            size=spec.kv_size, page_size=spec.kv_page_size, dtype=parse_dtype(spec.kv_dtype),
            head_num=spec.kv_head_num, head_dim=spec.kv_head_dim,
            layer_num=spec.end - spec.start, device="cpu", enable_memory_saver=False,
            v_head_dim=spec.kv_v_head_dim, start_layer=spec.start, end_layer=spec.end - 1)

    # -- weights and KV ----------------------------------------------------------------------
    def load_layer(self, layer_id: int, state: dict[str, torch.Tensor]) -> None:
        if not self.start <= layer_id < self.end:
            raise HostRefusal(f"weights: layer {layer_id} is not in [{self.start}, {self.end})")
        module = self.layers[layer_id - self.start]
        expected = module.state_dict()
        if set(state) != set(expected):
            raise HostRefusal(f"weights: layer {layer_id} parameters {sorted(state)} do not "
                              f"match {sorted(expected)}")
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
                raise HostRefusal(f"weights: {name} of layer {layer_id} is {tuple(tensor.shape)} "
                                  f"{tensor.dtype}, expected {tuple(expected[name].shape)} "
                                  f"{expected[name].dtype}")
        module.load_state_dict(state, strict=True)
        self.loaded.add(layer_id)

    def _check_slots(self, slots: torch.Tensor) -> torch.Tensor:
        slots = slots.to(torch.int64)
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= self.pool.size
                              + self.pool.page_size):
            raise HostRefusal("kv: slot ids outside the pool")
        return slots

    def put_kv(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """``k``/``v``: (layers in range, len(slots), heads, head_dim)."""
        slots = self._check_slots(slots)
        num = self.end - self.start
        if k.shape[0] != num or v.shape[0] != num or k.shape[1] != slots.numel():
            raise HostRefusal(f"kv: expected {num} layers x {slots.numel()} slots")
        for i in range(num):
            self.pool.k_buffer[i][slots] = k[i].to(self.pool.k_buffer[i].dtype)
            self.pool.v_buffer[i][slots] = v[i].to(self.pool.v_buffer[i].dtype)

    def get_kv(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self._check_slots(slots)
        k = torch.stack([self.pool.k_buffer[i][slots] for i in range(self.end - self.start)])
        v = torch.stack([self.pool.v_buffer[i][slots] for i in range(self.end - self.start)])
        return k, v

    def resize_kv(self, size: int) -> None:
        """Follow the worker's pool to ``size`` tokens (slot ids are the worker's)."""
        pool = self.pool
        if size < 1:
            raise HostRefusal(f"resize_kv: size {size} must be >= 1")
        from runtime_patches.migration.capacity import resized_kv

        for i in range(len(pool.k_buffer)):
            pool.k_buffer[i], pool.v_buffer[i] = resized_kv(
                pool.k_buffer[i], pool.v_buffer[i], size + pool.page_size)
        pool.size = size

    def kv_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.pool.k_buffer + self.pool.v_buffer)

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.layers.parameters())

    # -- one model step ----------------------------------------------------------------------
    def forward(self, fields: dict[str, Any],
                tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(self.loaded) != self.end - self.start:
            raise HostRefusal("forward: not every layer's weights have arrived")
        from sglang.srt.layers.layer_boundary.residual import batch as residual_batch
        from sglang.srt.model_executor.forward_batch_info import ForwardMode, PPProxyTensors
        from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

        mode = ForwardMode(int(fields["mode"]))
        if not (mode.is_extend() or mode.is_decode()):
            raise HostRefusal(f"forward: mode {mode.name} is not supported")
        batch = self._forward_batch(mode, tensors)
        self._req_to_token.req_to_token = tensors["req_to_token"]
        positions = tensors["positions"]
        with torch.inference_mode(), forward_context(ForwardContext(attn_backend=self.backend)):
            self.backend.init_forward_metadata(batch)
            if "residual" in tensors:
                hidden = self.layers[0].attn_boundary.from_pp(
                    PPProxyTensors({"hidden_states": tensors["hidden_states"],
                                    "residual": tensors["residual"]}), batch)
            else:
                residual_batch.start(batch)
                hidden = tensors["hidden_states"]
            for layer in self.layers:
                hidden = layer(positions, hidden, batch)
            out = residual_batch.to_pp(hidden, batch)
        return dict(out.tensors)

    def _forward_batch(self, mode: Any, tensors: dict[str, torch.Tensor]) -> Any:
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch

        seq_lens = tensors["seq_lens"]
        batch_size = int(seq_lens.numel())
        batch = ForwardBatch(
            forward_mode=mode, batch_size=batch_size,
            input_ids=torch.zeros(tensors["positions"].numel(), dtype=torch.int64),
            req_pool_indices=torch.arange(batch_size, dtype=torch.int64),
            seq_lens=seq_lens, out_cache_loc=tensors["out_cache_loc"],
            seq_lens_sum=int(seq_lens.sum()), positions=tensors["positions"],
        )
        batch.seq_lens_cpu = seq_lens
        if mode.is_extend():
            batch.extend_prefix_lens = tensors["extend_prefix_lens"]
            batch.extend_seq_lens = tensors["extend_seq_lens"]
            batch.extend_prefix_lens_cpu = tensors["extend_prefix_lens"].tolist()
            batch.extend_seq_lens_cpu = tensors["extend_seq_lens"].tolist()
            batch.extend_num_tokens = int(tensors["extend_seq_lens"].sum())
        return batch
