"""Never lose a run: validate before acting, resume from any kill point, refuse a changed config, lock, stop on NaN."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import layergeo.distil as train_module
from layergeo.cli import main
from layergeo.runs import RunDir, RunLock, read_jsonl

DRIVER = Path(__file__).with_name("kill_driver.py")
# a teacher of 2 epochs (16 steps, evaluated and checkpointed each epoch) and a student of 12 steps
# checkpointed every 4: enough kill points in both phases, seconds each
SETTINGS = ["--preset", "tiny", "--set", "teacher.train.epochs=2", "--set", "train.max_steps=12",
            "--set", "train.eval_every=4", "--set", "train.log_every=1"]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _killed(tmp_path: Path, point: str, *argv: str) -> int:
    done = subprocess.run([sys.executable, str(DRIVER), point, "--", *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    return done.returncode


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one must equal."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(["train", *SETTINGS, "--out", str(out)]) == 0
    return out


def _same_run(a: Path, b: Path) -> None:
    """Bit-identical weights, identical metrics and mapping, for the student and the teacher it trained."""
    for run in ("", "teacher"):
        ra, rb = RunDir(a / run), RunDir(b / run)
        assert (ra.checkpoint("best") / "model.safetensors").read_bytes() == (rb.checkpoint("best") / "model.safetensors").read_bytes()
        assert ra.results()["dev"] == rb.results()["dev"] and ra.results()["test"] == rb.results()["test"]
        drop = lambda rows: [r for r in rows if "split" in r or "loss" in r]  # noqa: E731
        assert drop(read_jsonl(ra.metrics_file)) == drop(read_jsonl(rb.metrics_file))
    assert read_jsonl(RunDir(a).mapping_file) == read_jsonl(RunDir(b).mapping_file)
    assert not RunDir(b).checkpoint("last").exists() and not list((b / "checkpoints").glob(".*"))


@pytest.mark.parametrize("point", [
    "step:teacher:3",                    # in the teacher phase, before its first checkpoint
    "step:teacher:11",                   # in the teacher phase, after its first checkpoint
    "before-replace:.last.tmp-",         # while the teacher writes `last` (old one aside, new one not in)
    "after-replace:teacher/results.json",  # right after the teacher finished
    "step:run:6",                        # in the student phase
])
def test_a_kill_anywhere_resumes_to_the_uninterrupted_run(whole, tmp_path, point):
    out = tmp_path / "run"
    assert _killed(tmp_path, point, "train", *SETTINGS, "--out", str(out)) == -9
    assert not RunDir(out).finished and (out / "config.yaml").is_file()
    assert main(["train", "--out", str(out), "--resume"]) == 0
    _same_run(whole, out)
    env = json.loads((out / "env.json").read_text())
    if point.startswith("step:run"):  # the student phase had two sittings; its wall time counts both
        assert len(env["sittings"]) == 2 and env["wall_time_s"] == pytest.approx(sum(s["wall_time_s"] for s in env["sittings"]), abs=0.2)
        assert all(s["git_commit"] == env["git_commit"] and s["versions"] == env["versions"] for s in env["sittings"])


def test_a_kill_after_the_results_leaves_a_finished_run_and_resume_says_so(whole, tmp_path, capsys):
    out = tmp_path / "run"
    assert _killed(tmp_path, "after-replace:run/results.json", "train", *SETTINGS, "--out", str(out)) == -9
    assert RunDir(out).finished
    before = _tree(out)
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert _tree(out) == before


def test_resume_refuses_a_changed_config_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert _killed(tmp_path, "step:run:6", "train", *SETTINGS, "--out", str(out)) == -9
    before = _tree(out)
    argv = ["train", *SETTINGS, "--set", "train.lr=0.5", "--set", "matching.strategy=reverse", "--out", str(out), "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "matching.strategy: 'forward' -> 'reverse'" in err and "train.lr" in err and len(err.strip().splitlines()) == 1
    assert _tree(out) == before
    # the same settings again are the saved config: resuming with them is allowed
    assert main(["train", *SETTINGS, "--out", str(out), "--resume"]) == 0


def test_resume_tidies_orphan_temporaries(tmp_path):
    out = tmp_path / "run"
    assert _killed(tmp_path, "step:run:6", "train", *SETTINGS, "--out", str(out)) == -9
    (out / "checkpoints" / ".last.tmp-orphan").mkdir()
    (out / ".results.json.orphan").write_text("{")
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert not (out / "checkpoints" / ".last.tmp-orphan").exists() and not (out / ".results.json.orphan").exists()


def test_overwrite_with_a_bad_config_keeps_the_old_run(whole, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    before = _tree(out)
    assert main(["train", "--preset", "tiny", "--set", "student.layers=9", "--overwrite", "--out", str(out)]) == 2
    assert "deeper than its teacher" in capsys.readouterr().err
    assert _tree(out) == before


def test_a_late_failure_keeps_the_run_with_its_error_and_resumes(whole, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    from layergeo.families.encoder import EncoderFamily

    monkeypatch.setattr(EncoderFamily, "evaluate", broken)
    assert main(["train", *SETTINGS, "--set", f"teacher.dir={whole / 'teacher'}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "disk on fire" in err and "--resume" in err and "Traceback" not in err
    assert out.is_dir() and not RunDir(out).finished and "Traceback" in (out / "error.txt").read_text()
    monkeypatch.undo()
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert RunDir(out).finished and not (out / "error.txt").exists()


def test_a_narrow_student_matched_to_nothing_finishes(whole, tmp_path):
    out = tmp_path / "narrow-none"
    assert main(["train", "--preset", "tiny", "--set", f"teacher.dir={whole / 'teacher'}", "--set", "student.init=random",
                 "--set", "student.hidden_size=32", "--set", "matching.strategy=none", "--out", str(out)]) == 0
    assert RunDir(out).finished
    assert "no student->teacher projection" in json.loads((out / "env.json").read_text())["trace"]["why"]


def test_a_second_writer_is_refused_and_a_dead_holder_does_not_block(whole, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    argv = ["train", *SETTINGS, "--set", f"teacher.dir={whole / 'teacher'}", "--overwrite", "--out", str(out)]
    with RunLock(out):
        before = _tree(out)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "is being written by process" in err and len(err.strip().splitlines()) == 1
        assert _tree(out) == before
    # a lock file left by a killed writer holds no lock: the next writer proceeds
    assert (out / ".lock").is_file()
    assert main(argv) == 0


def test_a_non_finite_loss_stops_the_run_with_the_step_and_the_term(whole, tmp_path, monkeypatch, capsys):
    original = train_module.distillation_losses

    def poisoned(*args, **kwargs):
        step_losses = original(*args, **kwargs)

        def losses(batch, epoch, step):
            terms = step_losses(batch, epoch, step)
            if step == 2:
                terms["kl"] = terms["kl"] * float("nan")
                terms["loss"] = terms["loss"] + terms["kl"]
            return terms

        return losses

    monkeypatch.setattr(train_module, "distillation_losses", poisoned)
    out = tmp_path / "run"
    assert main(["train", *SETTINGS, "--set", f"teacher.dir={whole / 'teacher'}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "kl" in err and "steps 3..3" in err and "not finite" in err
    assert not RunDir(out).finished
    for line in (out / "metrics.jsonl").read_text().splitlines():  # strict JSON: no NaN written
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))


def test_a_sweep_skips_a_run_another_writer_holds_and_completes_missing_geometry(tmp_path, capsys):
    from layergeo.sweep import execute

    grid = tmp_path / "grid.yaml"
    grid.write_text("name: g\npreset: tiny\nbase: {train: {max_steps: 4}}\n"
                    "grid: {matching.strategy: [forward, reverse]}\ngeometry: {checkpoints: [best], max_examples: 8}\n")
    root = tmp_path / "runs"
    (root / "g" / "runs" / "reverse").mkdir(parents=True)
    with RunLock(root / "g" / "runs" / "reverse"):
        execute(grid, root)
    assert "skip reverse" in capsys.readouterr().out
    forward, reverse = RunDir(root / "g" / "runs" / "forward"), RunDir(root / "g" / "runs" / "reverse")
    assert forward.finished and not reverse.finished
    geometry = next((forward.path / "geometry").iterdir())
    shutil.rmtree(geometry)  # as if the sweep had been killed while measuring it
    execute(grid, root)
    assert reverse.finished and (geometry / "summary.json").is_file()


def test_geometry_refuses_a_teacher_that_is_not_the_one_distilled_from(whole, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    other = tmp_path / "other-teacher"
    assert main(["teacher", "--preset", "tiny", "--set", "seed=1", "--out", str(other)]) == 0
    for name in ("model.safetensors", "config.json"):
        shutil.copy(other / "checkpoints" / "best" / name, out / "teacher" / "checkpoints" / "best" / name)
    config = (out / "config.yaml").read_text().replace(str((whole / "teacher").resolve()), str((out / "teacher").resolve()))
    (out / "config.yaml").write_text(config)  # the copy's own (replaced) teacher, not the original one
    assert str(out / "teacher") in config
    before = _tree(out)
    assert main(["angles", "--run", str(out), "--max-examples", "4"]) == 2
    assert "is not the one run" in capsys.readouterr().err
    assert _tree(out) == before


GRID = ("name: g\npreset: tiny\nbase: {train: {max_steps: 6, eval_every: 2}}\n"
        "grid: {matching.strategy: [forward, reverse, none]}\ngeometry: {checkpoints: [best], max_examples: 8}\n")


def _sweep(tmp_path: Path, root: Path, point: str | None = None) -> subprocess.Popen:
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    argv = ["sweep", str(grid), "--out", str(root)]
    command = [sys.executable, str(DRIVER), point, "--", *argv] if point else [sys.executable, "-m", "layergeo.cli", *argv]
    return subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _sweep_results(root: Path) -> dict[str, tuple]:
    runs = sorted((root / "g" / "runs").iterdir())
    return {r.name: (RunDir(r).results()["dev"], (r / "checkpoints" / "best" / "model.safetensors").read_bytes(),
                     json.loads(next((r / "geometry").iterdir()).joinpath("summary.json").read_text())["frac_acute"])
            for r in runs}


def test_a_killed_sweep_and_two_sweeps_sharing_a_grid_give_the_sweep_alone(tmp_path):
    alone = tmp_path / "alone"
    assert _sweep(tmp_path, alone).wait(timeout=600) == 0
    expected = _sweep_results(alone)
    # killed inside its second student, then run again
    killed = tmp_path / "killed"
    assert _sweep(tmp_path, killed, "step:reverse:3").wait(timeout=600) == -9
    assert RunDir(killed / "g" / "runs" / "forward").finished and not RunDir(killed / "g" / "runs" / "reverse").finished
    assert _sweep(tmp_path, killed).wait(timeout=600) == 0
    assert _sweep_results(killed) == expected
    # two sweeps of one grid at once: each run is trained once, by one of them, and nothing is left half-written
    shared = tmp_path / "shared"
    first, second = _sweep(tmp_path, shared), _sweep(tmp_path, shared)
    outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert "Traceback" not in "".join(outputs)
    started = [line.split()[-1] for out in outputs for line in out.splitlines() if "] start train " in line]
    assert sorted(started) == ["forward", "none", "reverse"]
    assert _sweep_results(shared) == expected
    leftovers = [p for p in shared.rglob(".*") if p.name != ".lock"]
    assert not leftovers
