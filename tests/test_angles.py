"""``layergeo angles`` / ``geometry`` on tiny runs, checked against a from-scratch float64 recomputation."""

from __future__ import annotations

import json
import shutil
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from layergeo.analyse import summary_fractions
from layergeo.cli import main

SENTENCES = [
    "A quietly devastating film about grief.",
    "The plot is thin, the jokes are thinner.",
    "Nobody asked for a sequel, and it shows.",
    "Luminous performances lift a familiar story.",
    "Two hours I will never get back.",
    "Short.",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("angles")
    base = root / "forward"
    assert main(["train", "--preset", "tiny", "--out", str(base)]) == 0
    teacher = f"teacher.dir={base / 'teacher'}"
    made = {"forward": base}
    for name, extra in {"reverse": ["matching.strategy=reverse"],
                        "narrow": ["student.init=random", "student.hidden_size=32", "matching.strategy=reverse"]}.items():
        args = ["train", "--preset", "tiny", "--out", str(root / name), "--set", teacher]
        for item in extra:
            args += ["--set", item]
        assert main(args) == 0
        made[name] = root / name
    texts = root / "texts.txt"
    texts.write_text("\n".join(SENTENCES) + "\n\n")
    made["texts"] = texts
    return made


def brute_force(run: Path, texts: list[str], checkpoint: str, space: str) -> pd.DataFrame:
    """Plain transformers, one sentence at a time, numpy float64 loops over tokens and pairs."""
    teacher_dir = Path(yaml.safe_load((run / "config.yaml").read_text())["teacher"]["dir"])
    teacher = AutoModel.from_pretrained(teacher_dir / "checkpoints" / "best").eval()
    student_dir = run / "checkpoints" / checkpoint
    student = AutoModel.from_pretrained(student_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    projection_file = student_dir / "projections.safetensors"
    projections = {int(k): v.double().numpy() for k, v in load_file(projection_file).items()} if projection_file.exists() else {}
    cosines: dict[tuple[int, int, int], list[float]] = {}
    thales: dict[tuple[int, int, int], list[float]] = {}
    for text in texts:
        inputs = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            t_states = [h[0].double().numpy() for h in teacher(**inputs, output_hidden_states=True).hidden_states]
            s_states = [h[0].double().numpy() for h in student(**inputs, output_hidden_states=True).hidden_states]
        for l, s_l in enumerate(s_states):
            w = projections.get(l, np.eye(s_l.shape[1]))
            for tok in range(s_l.shape[0]):
                for i, k in combinations(range(len(t_states)), 2):
                    u_i, u_k = t_states[i][tok] - w @ s_l[tok], t_states[k][tok] - w @ s_l[tok]
                    if space == "student":
                        u_i, u_k = w.T @ u_i, w.T @ u_k
                    norms = np.linalg.norm(u_i) * np.linalg.norm(u_k)
                    cosines.setdefault((l, i, k), []).append(u_i @ u_k / norms if norms > 0 else np.nan)
                    if norms > 0:  # |S - midpoint| over half the pair's distance
                        thales.setdefault((l, i, k), []).append(np.linalg.norm(u_i + u_k) / np.linalg.norm(u_i - u_k))
    rows = []
    for (l, i, k), values in sorted(cosines.items()):
        c = np.array(values)
        valid = c[~np.isnan(c)]
        rows.append({"student_layer": l, "teacher_i": i, "teacher_k": k, "n_tokens": len(valid),
                     "n_degenerate": int(np.isnan(c).sum()), "mean_cos": valid.mean() if len(valid) else np.nan,
                     "frac_acute": (valid > 0).mean() if len(valid) else np.nan,
                     "thales": np.mean(thales[(l, i, k)]) if len(valid) else np.nan})
    return pd.DataFrame(rows)


def _angles(*args: str) -> int:
    return main(["angles", *args])


@pytest.mark.parametrize("name, checkpoint, space", [("forward", "best", "student"), ("forward", "init", "teacher"),
                                                     ("narrow", "best", "student"), ("narrow", "best", "teacher")])
def test_angles_equal_a_from_scratch_recomputation(runs, tmp_path, name, checkpoint, space):
    out = tmp_path / "out"
    assert _angles("--run", str(runs[name]), "--texts", str(runs["texts"]), "--checkpoint", checkpoint,
                   "--space", space, "--out", str(out)) == 0
    ours = pd.read_csv(out / "angles.csv")
    expected = brute_force(runs[name], SENTENCES, checkpoint, space)
    assert len(ours) == len(expected)
    merged = ours.merge(expected, on=["student_layer", "teacher_i", "teacher_k"], suffixes=("", "_ref"))
    assert (merged.n_tokens == merged.n_tokens_ref).all() and (merged.n_degenerate == merged.n_degenerate_ref).all()
    if checkpoint == "init" and name == "forward":  # a copied student starts with S0 = T0 exactly
        assert (merged[(merged.student_layer == 0) & (merged.teacher_i == 0)].n_degenerate > 0).all()
    np.testing.assert_allclose(merged.mean_cos, merged.mean_cos_ref, atol=1e-5)
    np.testing.assert_allclose(merged.frac_acute, merged.frac_acute_ref, atol=1e-9)
    assert (ours.space == space).all() and (ours.checkpoint == checkpoint).all()
    summary = json.loads((out / "summary.json").read_text())
    tokens = int((expected.n_tokens + expected.n_degenerate).iloc[0])
    assert summary["n_examples"] == len(SENTENCES) and summary["n_tokens"] == tokens
    acute = (expected.frac_acute * expected.n_tokens).sum() / expected.n_tokens.sum()
    assert summary["frac_acute_all"] == pytest.approx(acute, abs=1e-9)
    ratio = (expected.thales * expected.n_tokens).sum() / expected.n_tokens.sum()
    assert summary["thales_ratio_all"] == pytest.approx(ratio, rel=1e-5)
    deep = expected[(expected.student_layer >= 1) & (expected.teacher_i >= 1)]  # the authors' cells: the headline
    assert summary["frac_acute"] == pytest.approx(np.average(deep.frac_acute, weights=deep.n_tokens), abs=1e-9)
    assert summary["thales_ratio"] == pytest.approx(np.average(deep.thales, weights=deep.n_tokens), rel=1e-5)
    for stem in ("angles_frac_acute", "angles_mean_deg", "angle_hist"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.pdf").stat().st_size > 0


def test_equal_width_spaces_agree_and_default_location(runs):
    for space in ("student", "teacher"):
        assert _angles("--run", str(runs["reverse"]), "--space", space, "--max-examples", "8") == 0
    student = pd.read_csv(runs["reverse"] / "geometry" / "best-student-dev8" / "angles.csv")
    teacher = pd.read_csv(runs["reverse"] / "geometry" / "best-teacher-dev8" / "angles.csv")
    np.testing.assert_allclose(student.mean_cos, teacher.mean_cos, atol=1e-12)
    summary = json.loads((runs["reverse"] / "geometry" / "best-student-dev8" / "summary.json").read_text())
    assert summary["strategy"] == "reverse" and summary["matched_pairs"] == [[0, 0], [1, 4], [2, 2]]
    assert summary["forward_pairs"] == [[1, 2], [2, 4]]
    hist = pd.read_csv(runs["reverse"] / "geometry" / "best-student-dev8" / "angle_hist.csv")
    pairs_per_layer = 10  # C(5, 2) teacher pairs for a 4-layer teacher
    assert hist.groupby("student_layer")["count"].sum().eq(summary["n_tokens"] * pairs_per_layer).all()


def test_geometry_extras(runs, tmp_path):
    out = tmp_path / "geo"
    assert main(["geometry", "--run", str(runs["narrow"]), "--max-examples", "16", "--out", str(out)]) == 0
    tt = pd.read_csv(out / "distances_teacher_teacher.csv").pivot(index="teacher_a", columns="teacher_b", values="mean_l2")
    np.testing.assert_allclose(np.diag(tt.values), 0, atol=1e-4)
    np.testing.assert_allclose(tt.values, tt.values.T, rtol=1e-9)
    cka = pd.read_csv(out / "cka.csv")
    assert len(cka) == 5 * 3 and cka.cka_debiased.between(-0.5, 1.0 + 1e-9).all()
    ratio = pd.read_csv(out / "distance_ratio.csv")
    assert (ratio.distance_ratio > 0).all()
    for stem in ("distances_teacher_student", "distances_student_student", "transition_cosine", "cka"):
        assert (out / f"{stem}.png").is_file() and (out / f"{stem}.csv").is_file()


def test_compare_runs_writes_a_tidy_table(runs, tmp_path):
    out = tmp_path / "cmp"
    folder = runs["forward"].parent
    assert _angles("--runs", str(folder), "--checkpoint", "both", "--max-examples", "8", "--out", str(out)) == 0
    tidy = pd.read_csv(out / "angles_all.csv")
    assert {"run", "strategy", "init", "checkpoint"} <= set(tidy.columns)
    assert set(tidy.run) == {"forward", "reverse", "narrow"} and set(tidy.checkpoint) == {"init", "best"}
    assert set(tidy.strategy) == {"forward", "reverse"}
    summary = pd.read_csv(out / "acute_summary.csv")
    for (run, checkpoint), cells in tidy[tidy.n_tokens > 0].groupby(["run", "checkpoint"]):
        row = summary[(summary.run == run) & (summary.checkpoint == checkpoint)].iloc[0]
        assert row.thales_ratio_all == pytest.approx(np.average(cells.mean_thales_ratio, weights=cells.n_tokens), rel=1e-9)
        deep = cells[(cells.student_layer >= 1) & (cells.teacher_i >= 1)]
        assert row.thales_ratio == pytest.approx(np.average(deep.mean_thales_ratio, weights=deep.n_tokens), rel=1e-9)
        assert row.cells == "S1–S2, teacher pairs among T1–T4"
        folder = runs[run] / "geometry" / f"{checkpoint}-student-dev8"
        authors = pd.read_csv(folder / "authors_cosine_hist.csv")
        assert row.authors_frac_positive == pytest.approx(authors.loc[authors.bin_left >= 0, "count"].sum() / authors["count"].sum())
        assert json.loads((folder / "summary.json").read_text())["authors_frac_positive"] == pytest.approx(row.authors_frac_positive)
        assert (folder / "authors_cosine_hist.png").is_file()
    assert (out / "angles_by_strategy.png").is_file() and (out / "acute_fraction_by_strategy.pdf").is_file()


def _headline(angles: pd.DataFrame, column: str, everything: bool = False) -> float:
    """Brute force: the token-weighted mean of ``column`` over the authors' cells (every cell with ``everything``)."""
    keep = angles.n_tokens > 0
    if not everything:
        keep &= (angles.student_layer >= 1) & (angles.teacher_i >= 1)
    return float(np.average(angles[keep][column], weights=angles[keep].n_tokens))


def test_summary_fractions_equal_a_brute_force_filter_of_random_cells():
    rng = np.random.default_rng(0)
    cells = [(j, i, k) for j in range(4) for i, k in combinations(range(6), 2)]
    angles = pd.DataFrame(cells, columns=["student_layer", "teacher_i", "teacher_k"]).assign(
        n_tokens=rng.integers(0, 50, len(cells)), frac_acute=rng.uniform(0, 1, len(cells)),
        mean_thales_ratio=rng.uniform(0.5, 4, len(cells)))
    angles = angles.sample(frac=1, random_state=1)  # any order
    default, every = summary_fractions(angles), summary_fractions(angles, with_embeddings=True)
    assert default["frac_acute"] == pytest.approx(_headline(angles, "frac_acute"), rel=1e-12)
    assert default["thales_ratio"] == pytest.approx(_headline(angles, "mean_thales_ratio"), rel=1e-12)
    assert default["cells"] == "S1–S3, teacher pairs among T1–T5"
    for fractions in (default, every):
        assert fractions["frac_acute_all"] == pytest.approx(_headline(angles, "frac_acute", everything=True), rel=1e-12)
        assert fractions["thales_ratio_all"] == pytest.approx(_headline(angles, "mean_thales_ratio", everything=True), rel=1e-12)
    assert every["frac_acute"] == every["frac_acute_all"] and every["cells"] == "S0–S3, teacher pairs among T0–T5"
    # matched pairs: angles at S_s with T_t as one side, among the headline cells only ((0, 0) has none)
    matched = summary_fractions(angles, matched=[[0, 0], [2, 3]])["frac_acute_matched"]
    at = angles[(angles.student_layer == 2) & (angles.teacher_i >= 1) & ((angles.teacher_i == 3) | (angles.teacher_k == 3))]
    assert matched == pytest.approx(_headline(at, "frac_acute"), rel=1e-12)


def test_the_printed_line_and_the_summary_use_the_authors_cells_unless_asked(runs, tmp_path, capsys):
    for flag, everything in (([], False), (["--with-embeddings"], True)):
        out = tmp_path / ("all" if everything else "authors")
        assert _angles("--run", str(runs["reverse"]), "--max-examples", "8", "--out", str(out), *flag) == 0
        angles = pd.read_csv(out / "angles.csv")
        acute = _headline(angles, "frac_acute", everything)
        cells = "S0–S2, teacher pairs among T0–T4" if everything else "S1–S2, teacher pairs among T1–T4"
        printed = capsys.readouterr().out
        assert f"{acute:.1%} of the angles at the student are acute ({cells})" in printed
        summary = json.loads((out / "summary.json").read_text())
        authors = pd.read_csv(out / "authors_cosine_hist.csv")  # the same at either setting: the authors' cells
        positive = authors.loc[authors.bin_left >= 0, "count"].sum() / authors["count"].sum()
        assert (f"; the authors' per-token mean cosine is {summary['authors_mean_cos']:.2f} on average and positive at "
                f"{positive:.1%} of the tokens") in printed
        assert summary["frac_acute"] == pytest.approx(acute, rel=1e-12) and summary["cells"] == cells
        assert summary["frac_acute_all"] == pytest.approx(_headline(angles, "frac_acute", True), rel=1e-12)
        assert summary["options"]["with_embeddings"] is everything and "frac_acute_deep" not in summary


def test_a_comparison_of_runs_analysed_by_older_code_reads_the_cells(runs, tmp_path):
    """An older summary.json: frac_acute over every cell, frac_acute_deep over the authors' cells, no frac_acute_all."""
    run = tmp_path / "runs" / "reverse"
    shutil.copytree(runs["reverse"], run, ignore=shutil.ignore_patterns("geometry"))
    assert _angles("--runs", str(run), "--max-examples", "8", "--out", str(tmp_path / "first")) == 0
    (folder,) = (run / "geometry").iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    old = {k: v for k, v in summary.items() if not k.endswith("_all") and k != "cells"}
    old |= {"frac_acute": summary["frac_acute_all"], "frac_acute_deep": summary["frac_acute"],
            "thales_ratio": summary["thales_ratio_all"], "options": {k: v for k, v in summary["options"].items() if k != "with_embeddings"}}
    (folder / "summary.json").write_text(json.dumps(old))
    angles = pd.read_csv(folder / "angles.csv")
    for flag, everything in (([], False), (["--with-embeddings"], True)):
        out = tmp_path / ("all" if everything else "authors")
        assert _angles("--runs", str(run), "--max-examples", "8", "--out", str(out), *flag) == 0
        assert json.loads((folder / "summary.json").read_text()) == old  # reused, not measured again
        (row,) = pd.read_csv(out / "acute_summary.csv").itertuples()
        assert row.frac_acute == pytest.approx(_headline(angles, "frac_acute", everything), rel=1e-12)
        assert row.thales_ratio == pytest.approx(_headline(angles, "mean_thales_ratio", everything), rel=1e-12)
        assert row.frac_acute_all == pytest.approx(_headline(angles, "frac_acute", True), rel=1e-12)


def test_a_comparison_refuses_to_pool_unlike_runs_and_says_what_it_pooled(runs, tmp_path, capsys):
    short = tmp_path / "runs" / "forward-short"
    assert main(["train", "--preset", "tiny", "--set", f"teacher.dir={runs['forward'] / 'teacher'}",
                 "--set", "train.max_steps=3", "--out", str(short)]) == 0
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert _angles("--runs", str(runs["forward"]), str(short), "--max-examples", "8", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "forward (copy) runs on rotten_tomatoes differ in steps (8, 3)" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert _angles("--runs", str(runs["forward"]), str(runs["reverse"]), "--max-examples", "8", "--out", str(out)) == 0
    assert "comparing 2 runs; task: rotten_tomatoes (2)" in capsys.readouterr().out
    pooled = pd.read_csv(out / "pooled.csv")
    assert list(pooled.run) == ["forward", "reverse"] and set(pooled.steps) == {8}


@pytest.fixture
def broken(runs, tmp_path) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(runs["reverse"], copy, ignore=shutil.ignore_patterns("geometry"))
    return copy


def _fails(capsys, *args: str, message: str) -> None:
    assert _angles(*args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_bad_input(runs, broken, tmp_path, capsys):
    _fails(capsys, "--run", str(tmp_path), message="not a layergeo run directory")
    _fails(capsys, "--run", str(runs["forward"] / "teacher"), message="is a teacher run")
    _fails(capsys, "--run", str(runs["reverse"]), "--space", "sideways", message="unknown --space")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    _fails(capsys, "--run", str(runs["reverse"]), "--texts", str(empty), "--out", str(tmp_path / "o1"), message="empty")
    assert not (tmp_path / "o1").exists()
    shutil.rmtree(broken / "checkpoints" / "best")
    _fails(capsys, "--run", str(broken), message="no checkpoints/best")
    assert not (broken / "geometry").exists()


def test_mismatched_tokenizer_and_width(runs, broken, capsys):
    vocab = broken / "checkpoints" / "init" / "tokenizer.json"
    spec = json.loads(vocab.read_text())
    spec["model"]["vocab"]["zzzz-new-token"] = len(spec["model"]["vocab"])
    vocab.write_text(json.dumps(spec))
    _fails(capsys, "--run", str(broken), "--checkpoint", "init", message="different tokenizer")
    config = broken / "checkpoints" / "best" / "config.json"
    settings = json.loads(config.read_text())
    settings["hidden_size"] = 32
    config.write_text(json.dumps(settings))
    assert _angles("--run", str(broken)) == 2
    assert "Traceback" not in capsys.readouterr().err
