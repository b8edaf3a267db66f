"""A HELR placement plan runs as SGLang pipeline parallelism on CPU (gloo).

The tiny random Llama (4 decoder layers, untied LM head) is served once as one process and once
as the two pipeline ranks HELR plans for it on a two-GPU cluster where neither GPU can hold the
whole model (the uneven plan 3,1: ``--pp-size 2``, ``SGLANG_PP_LAYER_PARTITION``).
Greedy answers must be token-for-token identical, and each rank must have built exactly the
layers the plan gave it (read from the line ``runtime_patches.cpu.pipeline`` logs per rank).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from runtime_patches import models
from runtime_patches.cpu.pipeline import LOG_PREFIX
from runtime_patches.launch import PP_PARTITION_ENV, WorkerConfig, WorkerProcess, format_cpus
from tests.integration.cluster import LOG_DIR, free_port, generate

pytestmark = pytest.mark.integration

CLUSTER = {"gpus": [{"id": 0, "memory_gb": 0.003, "tflops": 100},
                    {"id": 1, "memory_gb": 0.006, "tflops": 100}],
           "links": {"matrix": [["X", "NV18"], ["NV18", "X"]]}}
"""Two GPUs, neither able to hold the whole tiny model (6.95 MB with its workspace): GPU 1
takes the embedding and three layers, GPU 0 (2.9 MB usable) only one layer and the LM head."""


def helr_plan() -> tuple[int, ...]:
    """The layers per pipeline rank that HELR plans for the tiny model on ``CLUSTER``."""
    from router.placement.placement import plan_from_json

    plan = plan_from_json({"model": models.prepare("tiny"), "cluster": CLUSTER, "mode": "lr",
                           "batch_size": 1, "prompt_tokens": 16, "output_tokens": 16})
    return tuple(plan["sglang"]["layer_partition"])


@pytest.fixture(scope="module")
def plan() -> tuple[int, ...]:
    """Layers per pipeline rank, from HELR: (3, 1), deliberately uneven."""
    return helr_plan()


def test_helr_plans_an_uneven_two_rank_split(plan: tuple[int, ...]) -> None:
    assert plan == (3, 1)
PROMPTS = ("def hello(name):", "import os\nimport sys\n", "class Foo:\n    def __init__(self",
           "for i in range(10):")
MAX_NEW_TOKENS = 16
RANK_LINE = re.compile(re.escape(LOG_PREFIX) + r" rank (\d+) of (\d+) owns layers "
                       r"\[(\d+), (\d+)\) of (\d+) \((-?\d+) built\)")


def planned_ranges(plan: tuple[int, ...]) -> list[tuple[int, int]]:
    """``(1, 3)`` -> ``[(0, 1), (1, 4)]``: the half-open layer range of each rank."""
    bounds = [sum(plan[:rank]) for rank in range(len(plan) + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@pytest.fixture(scope="module")
def workers(plan: tuple[int, ...]) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    """(one-process worker, two-rank pipeline worker running ``plan``), on the tiny model."""
    path = models.prepare("tiny")
    served = models.recipe("tiny").served_name
    cpus = format_cpus(sorted(os.sched_getaffinity(0)))  # both ranks share the worker's cores
    single = WorkerProcess(
        WorkerConfig(model_path=path, port=free_port(), served_model_name=served, device="cpu",
                     cpus=cpus),
        log_path=os.path.join(LOG_DIR, "pp-single.log"))
    pipeline = WorkerProcess(
        WorkerConfig(model_path=path, port=free_port(), served_model_name=served, device="cpu",
                     cpus=cpus, pp_size=len(plan), pp_layer_partition=plan),
        log_path=os.path.join(LOG_DIR, "pp-2ranks.log"))
    started = [single, pipeline]
    try:
        for w in started:
            w.start()
        with ThreadPoolExecutor(len(started)) as pool:
            list(pool.map(lambda w: w.wait_ready(600), started))
        yield single, pipeline
    finally:
        for w in started:
            w.stop()


def test_pipeline_greedy_output_equals_one_process(
        workers: tuple[WorkerProcess, WorkerProcess]) -> None:
    single, pipeline = workers
    for prompt in PROMPTS:
        expected = generate(single, prompt, MAX_NEW_TOKENS)
        got = generate(pipeline, prompt, MAX_NEW_TOKENS)
        assert len(expected["output_ids"]) == MAX_NEW_TOKENS, expected
        assert got["output_ids"] == expected["output_ids"], prompt
        assert got["text"] == expected["text"]


def test_each_rank_built_the_planned_layers(
        workers: tuple[WorkerProcess, WorkerProcess], plan: tuple[int, ...]) -> None:
    _, pipeline = workers
    assert pipeline.log_path is not None
    with open(pipeline.log_path, errors="replace") as f:
        found = {int(m[1]): m for m in RANK_LINE.finditer(f.read())}
    assert sorted(found) == list(range(len(plan))), f"rank lines: {found}"
    for rank, (start, end) in enumerate(planned_ranges(plan)):
        m = found[rank]
        assert (int(m[2]), int(m[3]), int(m[4]), int(m[5])) == (len(plan), start, end, 4)
        assert int(m[6]) == end - start, m[0]  # layers outside the range are PPMissingLayer


@pytest.mark.parametrize(("num_layers", "plan"), [
    (4, (3, 1)), (4, (2, 2)), (4, (1, 1, 2)),  # the tiny model
    (30, (20, 10)), (30, (7, 8, 15)), (30, (1, 29)),  # SmolLM2-135M's 30 layers
])
def test_sglang_reads_a_plan_as_the_planned_ranges(
        monkeypatch: pytest.MonkeyPatch, num_layers: int, plan: tuple[int, ...]) -> None:
    from sglang.srt.distributed.utils import get_pp_indices

    monkeypatch.setenv(PP_PARTITION_ENV, ",".join(map(str, plan)))
    got = [get_pp_indices(num_layers, rank, len(plan)) for rank in range(len(plan))]
    assert got == planned_ranges(plan)
