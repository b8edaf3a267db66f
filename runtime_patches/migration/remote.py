"""Stand-ins that take the place of migrated decoder layers in the worker's model.

Who calls: SGLang's own layer loop (``LlamaModel.forward``: ``for i in range(start, end):
hidden = self.layers[i](positions, hidden, forward_batch, ...)``), on the scheduler thread, once
per model step. :class:`runtime_patches.migration.manager.MigrationManager` puts them in
``model.layers`` when a range [s, e) migrates and puts the real layers back on restore.

``layers[s]`` becomes :class:`RemoteLayers`: it exports the residual stream exactly as SGLang's
pipeline parallelism does between ranks (``residual_batch.to_pp``), sends hidden state,
residual and the batch metadata attention needs (mode, positions, KV slots written this step,
sequence lengths, the batch's rows of ``req_to_token``, extend lengths) to the layer host,
and imports the reply with the next stage's ``from_pp``. ``layers[s+1 .. e-1]`` become
:class:`PassThroughLayer`. No other SGLang code changes: the loop does not know.

A host that is lost mid-step raises :class:`RangeLost` out of the model's forward; the
scheduler-side patch (``runtime_patches.migration.patches``) catches it around ``run_batch``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from router.rebalance.messages import ForwardStats
from runtime_patches.migration.transport import LayerHostLost, LayerHostRefused, LayerTransport


class StepLost(RuntimeError):
    """A model step cannot finish because a layer or head host is gone or refused it."""


class RangeLost(StepLost):
    """A migrated range cannot run: its layer host is gone or refused the step."""

    def __init__(self, layers: RemoteLayers, cause: Exception) -> None:
        super().__init__(f"layers [{layers.start}, {layers.end}) on {layers.transport.address}: "
                         f"{cause}")
        self.layers = layers
        self.cause = cause


class PassThroughLayer(nn.Module):
    """Layer i in (s, e): its work was done by the layer host inside ``layers[s]``."""

    def __init__(self, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id

    def forward(self, positions: torch.Tensor, hidden_states: Any, forward_batch: Any,
                capture_output: Any = None) -> Any:
        return hidden_states


class RemoteLayers(nn.Module):
    """Layer s: runs layers [s, e) on the layer host, one round trip per model step."""

    def __init__(self, transport: LayerTransport, start: int, end: int, resume: Any,
                 req_to_token_pool: Any) -> None:
        super().__init__()
        self.transport = transport
        self.start, self.end = start, end
        self._resume = resume
        self._req_to_token_pool = req_to_token_pool
        self.num_steps = 0
        self.step_seconds = 0.0
        self.handoff_bytes = 0

    def forward(self, positions: torch.Tensor, hidden_states: Any, forward_batch: Any,
                capture_output: Any = None) -> Any:
        from sglang.srt.layers.layer_boundary.residual import batch as residual_batch
        from sglang.srt.model_executor.forward_batch_info import PPProxyTensors

        mode = forward_batch.forward_mode
        if mode.is_idle():
            return hidden_states
        started = time.perf_counter()
        sent = residual_batch.to_pp(hidden_states, forward_batch).tensors
        tensors = dict(sent)
        tensors.update(self.batch_tensors(positions, forward_batch))
        before = self.transport.bytes_sent + self.transport.bytes_received
        try:
            _, out = self.transport.call("forward", {"mode": int(mode)}, tensors)
        except (LayerHostLost, LayerHostRefused) as exc:
            raise RangeLost(self, exc) from exc
        if "hidden_states" not in out or "residual" not in out:
            raise RangeLost(self, ValueError("the reply has no hidden_states/residual"))
        self.handoff_bytes += self.transport.bytes_sent + self.transport.bytes_received - before
        self.num_steps += 1
        self.step_seconds += time.perf_counter() - started
        device = positions.device
        reply = {name: out[name].to(device) for name in ("hidden_states", "residual")}
        return self._resume.from_pp(PPProxyTensors(reply), forward_batch)

    def batch_tensors(self, positions: torch.Tensor, forward_batch: Any) -> dict[str, Any]:
        """What attention over the migrated layers needs from this step's batch."""
        tensors = attention_metadata(forward_batch, self._req_to_token_pool)
        tensors["positions"] = positions
        return tensors

    def stats(self) -> ForwardStats:
        return ForwardStats(self.num_steps, round(self.step_seconds, 6), self.handoff_bytes,
                            round(1000 * self.step_seconds / self.num_steps, 3)
                            if self.num_steps else None)


def attention_metadata(forward_batch: Any, req_to_token_pool: Any) -> dict[str, Any]:
    """The step's batch as attention on another process needs it: KV slots written this step,
    sequence lengths, the batch's rows of ``req_to_token`` (so the host indexes rows 0..B-1),
    and for extend steps the prefix and extend lengths."""
    seq_lens = forward_batch.seq_lens
    max_len = int(seq_lens.max()) if seq_lens.numel() else 0
    rows = req_to_token_pool.req_to_token[forward_batch.req_pool_indices, :max_len]
    tensors = {"out_cache_loc": forward_batch.out_cache_loc, "seq_lens": seq_lens,
               "req_to_token": rows}
    if forward_batch.forward_mode.is_extend():
        tensors["extend_prefix_lens"] = forward_batch.extend_prefix_lens
        tensors["extend_seq_lens"] = forward_batch.extend_seq_lens
    return tensors
