"""The same run on 1 and on 2 CPU processes (accelerate, DDP over gloo): same mapping, same losses.

Both runs start from one tiny teacher whose checkpoint has dropout switched off, so that a student's
forward pass is a function of its batch alone (with dropout every process draws its own masks and
the runs are two random draws). The 2-process run is started with ``accelerate launch --multi_gpu``,
which starts torch's elastic launcher whatever the hardware; ``device=cpu`` makes the processes CPU
processes talking over gloo. (``accelerate launch --cpu --num_processes 2`` would start a single
process: accelerate runs several CPU processes only through mpirun.) The test checks env.json to be
sure two processes ran.

Tolerance. With split batches every process gets half of each global batch, and the loss is built so
that the mean over processes equals the global mean (CE and KL per example, the hidden term
reweighted by each process's share of the tokens; see layergeo.train). What remains is float32
rounding: per-process means, the all-reduce, and kernels run on half batches padded to their own
lengths, about 1e-7 relative per operation, carried through 4 AdamW steps. Measured: loss, CE,
hidden and grad_norm agree to ~1e-6 relative, KL (~1e-3, a difference of nearly equal
log-probabilities, so more cancellation) to ~1.5e-5 relative, 5e-9 absolute. We allow rel 1e-4 with
an absolute floor of 1e-7. Without the token reweighting the hidden and KL terms drift apart by
1e-4 to 3e-3 within these 4 steps, which this tolerance catches.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from layergeo.cli import main
from layergeo.runs import read_jsonl

SETTINGS = ["device=cpu", "data.max_train=64", "train.batch_size=8", "train.max_steps=4", "train.log_every=1",
            "train.eval_every=2", "matching.strategy=rail", "matching.rail_every_steps=2"]
TERMS = ("loss", "ce", "kl", "hidden", "grad_norm", "lr")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A finished tiny teacher run whose best checkpoint has no dropout."""
    out = tmp_path_factory.mktemp("distributed") / "teacher"
    assert main(["teacher", "--preset", "tiny", "--out", str(out), "--set", "data.max_train=64", "--set", "device=cpu"]) == 0
    config_file = out / "checkpoints" / "best" / "config.json"
    config = json.loads(config_file.read_text())
    config["hidden_dropout_prob"] = config["attention_probs_dropout_prob"] = 0.0
    config_file.write_text(json.dumps(config, indent=2))
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(out: Path, teacher: Path, processes: int, preset: str = "tiny", extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = ["-m", "layergeo.cli", "train", "--preset", preset, "--out", str(out), "--set", f"teacher.dir={teacher}"]
    for item in (*SETTINGS, *extra):
        args += ["--set", item]
    if processes > 1:
        args = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(_free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env)


def test_two_processes_give_the_mapping_and_losses_of_one(teacher, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    single = _train(one, teacher, 1)
    assert single.returncode == 0, single.stderr[-3000:]
    double = _train(two, teacher, 2, extra=("train.log_with=tensorboard",))  # trackers: on the main process only
    assert double.returncode == 0, double.stderr[-3000:]

    assert json.loads((one / "env.json").read_text())["processes"] == 1
    assert json.loads((two / "env.json").read_text())["processes"] == 2  # really two processes
    assert double.stdout.count("train run written to") == 1  # only the main process reports

    # the mapping: rail redraws every 2 steps, from (seed, period) alone
    assert read_jsonl(two / "mapping.jsonl") == read_jsonl(one / "mapping.jsonl")
    assert [m["step"] for m in read_jsonl(two / "mapping.jsonl")] == [0, 2]

    # the loss terms at every logged step, and the dev evaluations
    metrics = {n: read_jsonl(d / "metrics.jsonl") for n, d in (("one", one), ("two", two))}
    steps = {n: [r for r in m if "loss" in r] for n, m in metrics.items()}
    assert [r["step"] for r in steps["one"]] == [r["step"] for r in steps["two"]] == [1, 2, 3, 4]
    for a, b in zip(steps["one"], steps["two"]):
        assert set(a) == set(b)
        for term in TERMS:
            assert b[term] == pytest.approx(a[term], rel=1e-4, abs=1e-7), (a["step"], term, a[term], b[term])
    dev = {n: [r for r in m if r.get("split") == "dev"] for n, m in metrics.items()}
    assert [r["step"] for r in dev["two"]] == [2, 4]
    assert dev["two"] == dev["one"]  # predictions gathered from both processes: all 64 examples, once each
    (logged,) = (two / "trackers").iterdir()  # one writer, the main process's
    events = EventAccumulator(str(logged))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx({r["step"]: r["loss"] for r in steps["two"]}, rel=1e-6)

    # results.json: written once (by the main process), complete
    results = json.loads((two / "results.json").read_text())
    expected = json.loads((one / "results.json").read_text())
    assert set(results) == set(expected)
    assert results["steps"] == 4 and results["kind"] == "student" and results["strategy"] == "rail"
    assert results["dev"]["n"] == results["test"]["n"] == 64
    assert [p.name for p in two.glob(".*")] == [".lock"] and not (two / "checkpoints" / "last").exists()
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["best", "init"]

    # a bad --out stops every process with the main process's one-line error, nobody waits forever
    again = _train(two, teacher, 2)
    assert again.returncode != 0 and "is not empty" in again.stderr


NARROW = ("student.lora.r=null", "student.init=random", "student.hidden_size=32")  # full fine-tuning, trained projections


@pytest.mark.parametrize("student", [(), NARROW], ids=["lora", "narrow-with-projections"])
def test_a_causal_lm_student_on_two_processes_trains_as_on_one(student, tmp_path):
    """The causal family on 2 processes: a LoRA student (frozen base under DDP) or a narrower student with
    trained projections (a LoRA student keeps its teacher's width), completion-token shares for CE, KL and
    the hidden term. The tiny Llama and the preset's adapter have no dropout."""
    teacher = tmp_path / "teacher"
    assert main(["teacher", "--preset", "causal-tiny", "--out", str(teacher), "--set", "data.max_train=64",
                 "--set", "device=cpu"]) == 0
    one, two = tmp_path / "one", tmp_path / "two"
    for out, processes in ((one, 1), (two, 2)):
        done = _train(out, teacher, processes, preset="causal-tiny", extra=student)
        assert done.returncode == 0, done.stderr[-3000:]
    assert (two / "checkpoints" / "best" / "projections.safetensors").is_file() == bool(student)
    assert json.loads((two / "env.json").read_text())["processes"] == 2
    steps = {n: [r for r in read_jsonl(d / "metrics.jsonl") if "loss" in r] for n, d in (("one", one), ("two", two))}
    assert [r["step"] for r in steps["two"]] == [1, 2, 3, 4]
    for a, b in zip(steps["one"], steps["two"]):
        for term in TERMS:
            assert b[term] == pytest.approx(a[term], rel=1e-4, abs=1e-7), (a["step"], term, a[term], b[term])
    dev = {n: [r for r in read_jsonl(d / "metrics.jsonl") if r.get("split") == "dev"] for n, d in (("one", one), ("two", two))}
    for a, b in zip(dev["one"], dev["two"]):
        assert (a["accuracy"], a["exact_match"], a["n"]) == (b["accuracy"], b["exact_match"], b["n"])
        assert b["token_ce"] == pytest.approx(a["token_ce"], rel=1e-5)
