"""Geometry along training: the trace equals `layergeo angles` on the checkpoint of the same step, its distances
equal a float64 brute force, it does not change training, and a resumed run measures what it lost again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import layergeo.distil as train_module
from layergeo.analyse import AngleOptions, analyse_run
from layergeo.cli import main
from layergeo.collect import hidden_states, load_run, texts_loader
from layergeo.config import TraceConfig
from layergeo.runs import read_jsonl
from layergeo.trace import probe_steps, trace_tables

# one evaluation, at the last step, so checkpoints/best is the student after step 6
SETTINGS = ("train.max_steps=6", "train.eval_every=6", "train.batch_size=16", "trace.every=2", "trace.examples=12")


def _train(out: Path, teacher: Path | None, *overrides: str) -> int:
    args = ["train", "--preset", "tiny", "--out", str(out)] + (["--set", f"teacher.dir={teacher}"] if teacher else [])
    for item in overrides:
        args += ["--set", item]
    return main(args)


@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trace") / "run"
    assert _train(out, None, *SETTINGS) == 0
    return out


def test_probe_steps():
    assert probe_steps(TraceConfig(probes=10), 100) == {0, *range(10, 101, 10)}
    assert probe_steps(TraceConfig(probes=3), 10) == {0, 4, 8, 10}  # every ceil(10 / 3) = 4, and the end
    assert probe_steps(TraceConfig(every=7), 20) == {0, 7, 14, 20}
    assert probe_steps(TraceConfig(probes=10), 3) == {0, 1, 2, 3}


@pytest.mark.parametrize("checkpoint, step", [("init", 0), ("best", 6)])
def test_the_trace_equals_layergeo_angles_on_the_checkpoint_of_that_step(traced, tmp_path, checkpoint, step):
    assert json.loads((traced / "results.json").read_text())["best_step"] == 6
    angles, _ = trace_tables(traced)
    assert sorted(angles.step.unique()) == [0, 2, 4, 6]
    out = analyse_run(traced, AngleOptions(checkpoint=checkpoint, max_examples=12), out=tmp_path / checkpoint)
    offline = pd.read_csv(out / "angles.csv")
    keys = ["student_layer", "teacher_i", "teacher_k"]
    live = angles[angles.step == step].merge(offline, on=keys, suffixes=("", "_offline"))
    assert len(live) == len(offline) == len(angles[angles.step == step]) > 0
    assert (live.n_tokens == live.n_tokens_offline).all()
    np.testing.assert_allclose(live.frac_acute, live.frac_acute_offline, rtol=0, atol=1e-12)
    np.testing.assert_allclose(live.mean_thales_ratio, live.mean_thales_ratio_offline, rtol=1e-9)


def test_trace_distances_equal_a_float64_brute_force(traced):
    _, distances = trace_tables(traced)
    loaded = load_run(traced, "best")
    loader, _, _ = texts_loader(loaded, "dev", max_examples=12)
    teacher, student = (torch.cat(parts).double() for parts in zip(*(s["encoder"] for s in hidden_states(loaded, loader, torch.device("cpu")))))
    for j in range(student.shape[1]):
        projected = student[:, j]  # the same width: no projection
        for i in range(teacher.shape[1]):
            expected = float(np.mean([np.linalg.norm(t - s) for t, s in zip(teacher[:, i].numpy(), projected.numpy())]))
            row = distances[(distances.step == 6) & (distances.student_layer == j) & (distances.teacher_layer == i)]
            assert row.distance.item() == pytest.approx(expected, rel=1e-5)


def test_the_trace_does_not_change_training(traced, tmp_path):
    assert _train(tmp_path / "off", traced / "teacher", *SETTINGS, "trace.examples=0") == 0
    assert not (tmp_path / "off" / "trace_angles.jsonl").exists()
    on, off = (json.loads((folder / "results.json").read_text()) for folder in (traced, tmp_path / "off"))
    assert on["dev"] == off["dev"] and on["test"] == off["test"]
    assert read_jsonl(traced / "metrics.jsonl") == read_jsonl(tmp_path / "off" / "metrics.jsonl")
    assert json.loads((tmp_path / "off" / "env.json").read_text())["trace"]["used"] is False
    cost = json.loads((traced / "env.json").read_text())["trace"]
    assert cost["used"] and cost["examples"] == 12 and 0 < cost["seconds"] < json.loads((traced / "env.json").read_text())["wall_time_s"]


def test_a_resumed_run_has_the_trace_of_an_uninterrupted_one(traced, tmp_path, monkeypatch):
    settings = (*SETTINGS, "train.eval_every=3")  # a resumable state at step 3
    assert _train(tmp_path / "whole", traced / "teacher", *settings) == 0
    original = train_module.distillation_losses

    def crashing(*args, **kwargs):
        step_losses = original(*args, **kwargs)

        def wrapped(batch, epoch, step):
            if step == 4:  # after the probe at step 4 was written, before any state after step 3 was saved
                raise KeyboardInterrupt
            return step_losses(batch, epoch, step)

        return wrapped

    monkeypatch.setattr(train_module, "distillation_losses", crashing)
    assert _train(tmp_path / "cut", traced / "teacher", *settings) == 130
    assert sorted(trace_tables(tmp_path / "cut")[0].step.unique()) == [0, 2, 4]
    monkeypatch.setattr(train_module, "distillation_losses", original)
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    for whole, cut in zip(trace_tables(tmp_path / "whole"), trace_tables(tmp_path / "cut")):
        pd.testing.assert_frame_equal(whole, cut)
    env = json.loads((tmp_path / "cut" / "env.json").read_text())  # the trace's time, like the wall time, sums the sittings
    assert len(env["sittings"]) == 2 and all(sitting["trace_s"] > 0 for sitting in env["sittings"])
    assert env["trace"]["seconds"] == pytest.approx(sum(sitting["trace_s"] for sitting in env["sittings"]), abs=2e-3)
    assert env["trace"]["seconds"] < env["wall_time_s"]


NORMALISED = {"none": lambda x: x, "l2": lambda x: x / x.norm(dim=-1, keepdim=True),  # per token; layernorm over the layer
              "layernorm": lambda x: (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5)}


@pytest.mark.parametrize("normalize", ["none", "l2", "layernorm"])
def test_gradient_alignments_in_a_run_equal_separate_gradients_of_its_checkpoint(traced, tmp_path, normalize):
    """The pulls are those of the run's hidden loss: ½|n(W S_j) − n(T_i)|² with n as loss.normalize says."""
    from layergeo.alignment import flat_gradient
    from layergeo.trace import alignment_tables

    out = tmp_path / "gradients"
    assert _train(out, traced / "teacher", *SETTINGS, "trace.gradients=true", "trace.examples=6", f"loss.normalize={normalize}") == 0
    layers, terms, first_order = alignment_tables(out)
    assert sorted(first_order.step.unique()) == [0, 2, 4, 6] and set(first_order.student_layer) == {2}
    assert sorted(layers.step.unique()) == sorted(terms.step.unique()) == [0, 2, 4, 6]
    assert set(terms.term) == {"forward", "reverse", "all_to_one", "shuffle", "rail", "kl"}
    assert layers.cosine.between(-1 - 1e-9, 1 + 1e-9).all() and terms.cosine_with_ce.between(-1 - 1e-9, 1 + 1e-9).all()
    loaded = load_run(out, "best")  # the student after step 6
    loaded.student.eval()
    pull_batch = next(iter(texts_loader(loaded, "dev", max_examples=12, batch_size=6)[0]))
    family, params = loaded.family, [p for p in loaded.student.parameters() if p.requires_grad]
    mask = family.masks(pull_batch)["encoder"].bool()
    with torch.inference_mode():
        teacher = family.hidden_states(loaded.teacher(**family.inputs(pull_batch), output_hidden_states=True))["encoder"]

    def pull(i):
        student = family.hidden_states(loaded.student(**family.inputs(pull_batch)))["encoder"]
        n = NORMALISED[normalize]
        return flat_gradient(0.5 * ((n(student[1][mask]) - n(teacher[i][mask].clone())) ** 2).sum(), params).double()

    g1, g3 = pull(1), pull(3)
    row = layers[(layers.step == 6) & (layers.student_layer == 1) & (layers.teacher_i == 1) & (layers.teacher_k == 3)]
    assert row.cosine.item() == pytest.approx(float(g1 @ g3 / (g1.norm() * g3.norm())), abs=1e-5)


def test_gradient_layers_measure_those_student_layers_as_a_full_probe_does(traced, tmp_path):
    from layergeo.trace import alignment_tables

    full, some = tmp_path / "full", tmp_path / "some"
    for out, extra in ((full, ()), (some, ("trace.gradient_layers=[1]",))):
        assert _train(out, traced / "teacher", *SETTINGS, "trace.gradients=true", "trace.examples=6", *extra) == 0
    (full_layers, full_terms, full_first), (layers, terms, first) = alignment_tables(full), alignment_tables(some)
    assert set(full_layers.student_layer) == {1, 2} and set(layers.student_layer) == {1}
    pd.testing.assert_frame_equal(layers.reset_index(drop=True),
                                  full_layers[full_layers.student_layer == 1].reset_index(drop=True))
    pd.testing.assert_frame_equal(terms, full_terms)
    pd.testing.assert_frame_equal(first, full_first)


def test_the_rail_pull_of_the_gradient_probe_is_the_runs_own_draw(traced, tmp_path, monkeypatch):
    probes = []

    class Kept(train_module.GeometryTrace):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            probes.append(self)

    monkeypatch.setattr(train_module, "GeometryTrace", Kept)
    out = tmp_path / "rail"
    assert _train(out, traced / "teacher", *SETTINGS, "matching.strategy=rail", "matching.rail_draws=3",
                  "trace.gradients=true", "trace.examples=6") == 0
    draws = read_jsonl(out / "mapping.jsonl")
    assert len(draws) == 3
    rail = probes[0].gradients.mappings["rail"]
    for step in range(6):
        current = [d for d in draws if d["step"] <= step][-1]["pairs"]
        assert [list(p) for p in rail.pairs_at(0, step)["encoder"]] == current


@pytest.mark.parametrize("preset", ["causal-tiny", "seq2seq-tiny"])
def test_gradient_traces_of_the_other_families(tmp_path, preset):
    """A LoRA student (frozen embeddings, zero adapter B at step 0, a first layer copied onto its teacher layer)
    and an encoder-decoder student: every probe has its alignments, undefined cosines are null, explain reads them."""
    out = tmp_path / "run"
    settings = ("trace.gradients=true", "trace.examples=4", "trace.every=2", "train.max_steps=4", "teacher.train.max_steps=2")
    assert main(["train", "--preset", preset, "--out", str(out), *(a for item in settings for a in ("--set", item))]) == 0
    layers = pd.DataFrame(read_jsonl(out / "trace_layer_alignment.jsonl"))
    terms = pd.DataFrame(read_jsonl(out / "trace_term_alignment.jsonl"))
    steps = sorted(pd.DataFrame(read_jsonl(out / "trace_angles.jsonl")).step.unique())
    assert sorted(layers.step.unique()) == sorted(terms.step.unique()) == steps == [0, 2, 4]
    assert set(terms.term) == {"forward", "reverse", "all_to_one", "shuffle", "rail", "kl"}
    cosines = pd.concat([layers.cosine, terms.cosine_with_ce]).dropna()
    assert len(cosines) > 0.9 * (len(layers) + len(terms)) and cosines.abs().le(1 + 1e-6).all()
    assert main(["explain", "--run", str(out)]) == 0 and (out / "explain" / "explain.md").is_file()
