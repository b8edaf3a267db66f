"""Pipeline parallelism on the CPU engine: report which layers each pipeline rank owns.

SGLang 0.5.23's pipeline parallelism runs on CPU unchanged: the CPU platform picks the ``gloo``
backend (``srt/platforms/cpu.py``), the PP scheduler loop (``srt/managers/scheduler_pp_mixin.py``)
uses a dedicated communication stream only on CUDA and otherwise sends its tensor dicts on the
current stream, and ``torch.cpu.Event`` exists. So nothing here changes how PP runs.

What this module adds is one log line per pipeline rank, so that a placement plan
(``--pp-size N`` plus ``SGLANG_PP_LAYER_PARTITION``) can be checked against what the worker
actually built. Who calls it: ``runtime_patches.boot.install`` calls :func:`register`; the wrapped
``resolve_layer_indices`` is called once per scheduler process by SGLang's ``ModelRunner`` right
after the model's weights are loaded, and it logs (for ``pp_size > 1`` only)::

    pp layers: rank 1 of 2 owns layers [1, 4) of 4 (3 built)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from runtime_patches import SGLANG_VERSION
from runtime_patches.cpu import cpu_engine_enabled
from runtime_patches.registry import REGISTRY, Patch

logger = logging.getLogger(__name__)

LOG_PREFIX = "pp layers:"
"""Start of the line each pipeline rank logs; tests parse it (see :func:`format_owned_layers`)."""


def format_owned_layers(pp_rank: int, pp_size: int, start: int, end: int, num_layers: int,
                        num_built: int) -> str:
    """The log line for one rank: its half-open layer range and how many layers it built."""
    return (f"{LOG_PREFIX} rank {pp_rank} of {pp_size} owns layers [{start}, {end}) "
            f"of {num_layers} ({num_built} built)")


def _count_built_layers(model: Any) -> int | None:
    """Decoder layers this rank materialised (SGLang puts ``PPMissingLayer`` in the others)."""
    from sglang.srt.layers.utils.common import PPMissingLayer

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return None
    return sum(not isinstance(layer, PPMissingLayer) for layer in layers)


def _log_owned_layers(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def resolve_layer_indices(*args: Any, **kwargs: Any) -> Any:
        info = original(*args, **kwargs)
        from sglang.srt.runtime_context import get_parallel

        parallel = get_parallel()
        if parallel.pp_size > 1 and not kwargs.get("is_draft_worker", False):
            model = kwargs.get("model", args[0] if args else None)
            config = getattr(getattr(kwargs.get("model_config"), "hf_config", None),
                             "num_hidden_layers", -1)
            built = _count_built_layers(model)
            logger.info("%s", format_owned_layers(
                parallel.pp_rank, parallel.pp_size, info.start_layer, info.end_layer, config,
                -1 if built is None else built))
        return info

    return resolve_layer_indices


def register() -> None:
    """Add the pipeline-rank report to the registry (called once by ``runtime_patches.boot``)."""
    REGISTRY.add(Patch(
        name="cpu.pp_log_owned_layers",
        target="sglang.srt.model_executor.model_runner_components.layer_setup:"
               "resolve_layer_indices",
        kind="wrap", new=_log_owned_layers,
        rationale="Logs the layer range each pipeline rank built, so a HELR placement plan "
                  "(SGLANG_PP_LAYER_PARTITION) can be checked against the running worker; "
                  "returns SGLang's result unchanged.",
        package="sglang", version=SGLANG_VERSION, when=cpu_engine_enabled,
    ))
