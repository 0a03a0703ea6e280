"""`layergeo explain`: the page, the summary's numbers against the trace tables, and its refusals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from layergeo.cli import main
from layergeo.explain import deep_geometry, token_plane
from layergeo.runs import read_jsonl
from layergeo.trace import alignment_tables, trace_tables


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    run = tmp_path_factory.mktemp("explain") / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--set", "train.max_steps=4", "--set", "trace.every=2",
                 "--set", "trace.examples=6", "--set", "trace.gradients=true", "--set", "matching.strategy=reverse"]) == 0
    assert main(["explain", "--run", str(run)]) == 0
    return run


def test_the_page_and_its_tables(explained):
    out = explained / "explain"
    for name in ("explain.png", "explain.pdf", "explain.md", "geometry_over_training.csv", "distances_over_training.csv"):
        assert (out / name).is_file(), name
    layers, terms, _ = alignment_tables(explained)  # the numbers behind panels (d) and (e), as traced
    pd.testing.assert_frame_equal(pd.read_csv(out / "pull_alignment.csv"), layers, check_dtype=False)
    pd.testing.assert_frame_equal(pd.read_csv(out / "pulls_vs_task.csv"), terms, check_dtype=False)
    text = (out / "explain.md").read_text()
    assert "Strategy Reverse" in text and "probes at steps 0, 2, 4" in text and "CE, held-out batch" in text


def test_deep_geometry_is_the_token_weighted_mean_over_layers_and_pairs_from_one(explained):
    angles, _ = trace_tables(explained)
    table = deep_geometry(angles).set_index("step")
    for step, rows in angles.groupby("step"):
        deep = rows[(rows.student_layer >= 1) & (rows.teacher_i >= 1) & (rows.n_tokens > 0)]
        assert table.loc[step, "frac_acute"] == pytest.approx((deep.frac_acute * deep.n_tokens).sum() / deep.n_tokens.sum())
    text = (explained / "explain" / "explain.md").read_text()
    assert f"{100 * table.frac_acute.iloc[0]:.1f}% acute at step 0" in text


def test_the_token_plane_keeps_distances_in_the_plane():
    rng = np.random.default_rng(0)
    teacher, student = rng.normal(size=(4, 6)), rng.normal(size=(3, 6))
    rows = [{"step": 0, "stack": "encoder", "who": "teacher", "layer": i, "state": list(t)} for i, t in enumerate(teacher)]
    rows += [{"step": s, "stack": "encoder", "who": "student", "layer": 2, "state": list(x)} for s, x in enumerate(student)]
    plane = token_plane(pd.DataFrame(rows), "encoder", 2, (3, 1))
    t, s = plane["teacher"], plane["student"]
    assert np.allclose(t[3], 0) and np.isclose(np.linalg.norm(t[1] - t[3]), np.linalg.norm(teacher[1] - teacher[3]))
    # the last student state lies in the plane: its distances to T3 and T1 are exact, and so is its side of the ball
    for k in (3, 1):
        assert np.isclose(np.linalg.norm(s[-1] - t[k]), np.linalg.norm(student[-1] - teacher[k]))
    inside = np.linalg.norm(s[-1] - plane["centre"]) < plane["radius"]
    cos = (teacher[3] - student[-1]) @ (teacher[1] - student[-1])
    assert inside == (cos < 0)  # Thales: inside the ball exactly when the angle is obtuse


def test_a_run_without_a_trace_is_refused(explained, tmp_path, capsys):
    run = tmp_path / "untraced"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--set", f"teacher.dir={explained / 'teacher'}",
                 "--set", "train.max_steps=2", "--set", "trace.examples=0"]) == 0
    capsys.readouterr()
    assert main(["explain", "--run", str(run)]) == 2
    assert "no geometry trace" in capsys.readouterr().err and not (run / "explain").exists()


def test_runs_compared_side_by_side(explained, tmp_path, capsys):
    other = tmp_path / "runs" / "forward"
    assert main(["train", "--preset", "tiny", "--out", str(other), "--set", f"teacher.dir={explained / 'teacher'}",
                 "--set", "train.max_steps=4", "--set", "trace.every=2", "--set", "trace.examples=6"]) == 0
    assert main(["explain", "--runs", str(explained), str(other), "--out", str(tmp_path / "compare")]) == 0
    table = pd.read_csv(tmp_path / "compare" / "compare.csv")
    assert set(table.strategy) == {"reverse", "forward"} and sorted(table.step.unique()) == [0, 2, 4]
    assert table[table.strategy == "forward"].own_pull_vs_ce.isna().all()  # traced without gradients
    assert table[table.strategy == "reverse"].own_pull_vs_ce.notna().all()
    # the parameter-space twin of the acute fraction and the first-order signs, from the gradient tables by hand
    layers = pd.DataFrame(read_jsonl(explained / "trace_layer_alignment.jsonl"))
    cases = pd.DataFrame(read_jsonl(explained / "trace_first_order.jsonl"))
    cases = cases[cases.toward != cases.teacher_layer]
    reverse = table[table.strategy == "reverse"].set_index("step")
    for step in (0, 2, 4):
        cosines = layers[layers.step == step].cosine.dropna()
        assert reverse.pulls_aligned[step] == pytest.approx(np.mean(cosines > 0))
        at = cases[cases.step == step]
        assert reverse.state_sign[step] == pytest.approx(np.mean(np.sign(at.state_view) == np.sign(at.realised)))
    assert table[table.strategy == "forward"].pulls_aligned.isna().all()
    pulls = pd.read_csv(tmp_path / "compare" / "pulls_vs_ce.csv").set_index(["init", "strategy"])
    terms = pd.DataFrame(read_jsonl(explained / "trace_term_alignment.jsonl"))
    assert list(pulls.index) == [("copy", "reverse")]  # the forward run traced no gradients
    for term, value in pulls.loc[("copy", "reverse")].items():
        assert value == pytest.approx(terms[terms.term == term].cosine_with_ce.mean())
    text = (tmp_path / "compare" / "compare.md").read_text()
    assert "| copy | Reverse | 1 |" in text and "| copy | Forward | 1 |" in text and "– → –" in text
    assert "aligned (cos > 0; at S1–S2)" in text  # the student layers whose pulls were measured
    assert (tmp_path / "compare" / "compare.png").is_file()
    capsys.readouterr()
    assert main(["explain", "--runs", str(other)]) == 2 and "--out" in capsys.readouterr().err


def test_a_seq2seq_run_is_explained_on_the_stack_asked_for(tmp_path, capsys):
    run = tmp_path / "run"
    settings = ("trace.gradients=true", "trace.examples=4", "trace.every=2", "train.max_steps=4", "teacher.train.max_steps=2",
                "matching.strategy=reverse")
    assert main(["train", "--preset", "seq2seq-tiny", "--out", str(run), *(a for s in settings for a in ("--set", s))]) == 0
    geometry = deep_geometry(trace_tables(run)[0]).set_index(["stack", "step"])
    assert main(["explain", "--run", str(run), "--stack", "decoder", "--out", str(tmp_path / "page")]) == 0
    text = (tmp_path / "page" / "explain.md").read_text()
    first = geometry.loc[("decoder", 0)]
    assert "decoder stack" in text and f"{100 * first.frac_acute:.1f}% acute at step 0" in text
    assert main(["explain", "--runs", str(run), "--stack", "decoder", "--out", str(tmp_path / "compare")]) == 0
    table = pd.read_csv(tmp_path / "compare" / "compare.csv").set_index("step")
    assert set(table["stack"]) == {"decoder"}
    for step in (0, 2, 4):
        assert table.frac_acute[step] == pytest.approx(geometry.loc[("decoder", step)].frac_acute)
    compared = (tmp_path / "compare" / "compare.md").read_text()
    assert "; decoder stack." in compared and "the same table on each stack's comparison" in compared
    capsys.readouterr()
    assert main(["explain", "--run", str(run), "--stack", "middle", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "traced the stacks encoder, decoder, not 'middle'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "none").exists()
