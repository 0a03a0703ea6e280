"""Sweeps that survive being killed, reports recomputed independently, the paper's numbers as shipped."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import layergeo.distil as train_module
from layergeo.cli import main
from layergeo.report import paper_table, provenance

GRID = """
name: tiny-grid
preset: tiny
base:
  data: {max_train: 96, max_eval: 32}
  train: {max_steps: 3}
grid:
  matching.strategy: [none, forward, reverse]
  seed: [0, 1, 2]
"""


def _sweep(tmp_path: Path, out: str) -> int:
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    return main(["sweep", str(grid), "--out", str(tmp_path / out)])


def test_killed_sweep_resumes_and_reports_like_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    assert _sweep(tmp_path, "whole") == 0
    original = train_module.distillation_losses
    calls = {"n": 0}

    def dies_in_the_fourth_run(*args, **kwargs):
        calls["n"] += 1
        step_losses = original(*args, **kwargs)
        if calls["n"] != 4:
            return step_losses

        def crash(batch, epoch, step):
            if step == 1:
                raise KeyboardInterrupt
            return step_losses(batch, epoch, step)

        return crash

    monkeypatch.setattr(train_module, "distillation_losses", dies_in_the_fourth_run)
    assert _sweep(tmp_path, "cut") == 130
    runs = tmp_path / "cut" / "tiny-grid" / "runs"
    assert sum((r / "results.json").is_file() for r in runs.iterdir()) == 3
    monkeypatch.setattr(train_module, "distillation_losses", original)
    capsys.readouterr()
    assert main(["sweep", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "cut"), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert listing.count("[  done]") == 3 + 1 and listing.count("[resume]") == 1 and listing.count("[   new]") == 5
    assert _sweep(tmp_path, "cut") == 0
    assert sorted(p.name for p in runs.iterdir()) == sorted(p.name for p in (tmp_path / "whole" / "tiny-grid" / "runs").iterdir())
    for run in runs.iterdir():
        steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        assert steps == sorted(set(steps)), f"{run.name} logged a step twice"
    for root in ("whole", "cut"):
        assert main(["report", str(tmp_path / root / "tiny-grid")]) == 0
    whole = pd.read_csv(tmp_path / "whole" / "tiny-grid" / "report" / "summary.csv")
    cut = pd.read_csv(tmp_path / "cut" / "tiny-grid" / "report" / "summary.csv")
    pd.testing.assert_frame_equal(whole, cut)


def test_report_statistics_recomputed_from_results(tmp_path):
    assert _sweep(tmp_path, "s") == 0
    root = tmp_path / "s" / "tiny-grid"
    assert main(["report", str(root), "--paper"]) == 0
    values: dict[tuple[str, str], list[float]] = {}
    for results_file in root.rglob("results.json"):
        results = json.loads(results_file.read_text())
        if results["kind"] == "student":
            values.setdefault((results["strategy"], "test_accuracy"), []).append(100 * results["test"]["accuracy"])
    summary = pd.read_csv(root / "report" / "summary.csv")
    for (strategy, metric), numbers in values.items():
        row = summary[(summary.strategy == strategy) & (summary.metric == metric)].iloc[0]
        assert row["n"] == 3
        assert row["mean"] == pytest.approx(np.mean(numbers), abs=1e-9)
        assert row["std"] == pytest.approx(np.std(numbers, ddof=1), abs=1e-9)
    diffs = pd.read_csv(root / "report" / "diff_vs_none.csv")
    forward = diffs[(diffs.strategy == "forward") & (diffs.metric == "test_accuracy")].iloc[0]
    assert forward.ci_low <= forward.mean_diff <= forward.ci_high and forward.n_seeds == 3
    for suffix in ("csv", "md", "tex"):
        assert (root / "report" / f"main_table.{suffix}").stat().st_size > 0
    assert "The paper's published numbers" in (root / "report" / "report.md").read_text()


def test_main_table_of_a_partial_sweep_shows_a_dash_where_no_run_finished():
    from layergeo.report import main_table, summary_stats

    results = pd.DataFrame({"task": ["rotten_tomatoes"] * 3 + ["bbc_news"], "init": "copy",
                            "strategy": ["none", "none", "forward", "none"], "seed": [0, 1, 0, 0],
                            "test_accuracy": [70.0, 72.0, 75.0, 90.0], "student_layers": 3, "hidden_size": "teacher",
                            "normalize": "none", "alpha_hidden": 3.0})
    table = main_table(summary_stats(results, ["test_accuracy"]))
    forward = table[table["Layer selection"] == "Forward"].iloc[0]
    assert forward["Rotten Tomatoes test acc"] == "75.0 (1)" and forward["BBC News test acc"] is None
    assert "nan" not in table.to_markdown(index=False, missingval="–")
    assert table[table["Layer selection"] == "None"].iloc[0]["Rotten Tomatoes test acc"] == "71.0 ± 1.4 (2)"


def test_a_table_of_none_runs_only_has_an_empty_spread_and_no_mapping_groups():
    from layergeo.report import by_mapping, spread, summary_stats

    results = pd.DataFrame({"task": "bbc_news", "init": "copy", "strategy": "none", "seed": [0, 1],
                            "test_accuracy": [90.0, 91.0], "pairs": "-", "student_layers": 3})
    table = spread(summary_stats(results, ["test_accuracy"]))
    assert table.empty and {"spread", "best", "worst", "mean_seed_std"} <= set(table.columns)
    assert by_mapping(results, ["test_accuracy"]).empty


def test_shuffle_runs_are_grouped_by_the_permutation_they_trained():
    from layergeo.report import by_mapping

    results = pd.DataFrame({"task": "bbc_news", "init": "copy", "strategy": ["shuffle"] * 5 + ["forward"],
                            "seed": [0, 1, 2, 3, 4, 0], "pairs": ["S1>T4 S2>T2", "S1>T2 S2>T4", "S1>T4 S2>T2", "S1>T2 S2>T4", "-", "x"],
                            "test_accuracy": [90.0, 80.0, 94.0, 82.0, 50.0, 99.0], "student_layers": 2})
    table = by_mapping(results, ["test_accuracy", "dev_accuracy"]).set_index("pairs")
    assert list(table.index) == ["S1>T2 S2>T4", "S1>T4 S2>T2"]  # seed 4 logged no mapping: in no group
    assert table.loc["S1>T4 S2>T2", "seeds"] == "0, 2" and table.loc["S1>T4 S2>T2", "n"] == 2
    assert table.loc["S1>T4 S2>T2", "test_accuracy"] == pytest.approx(92.0)
    assert table.loc["S1>T2 S2>T4", "test_accuracy"] == pytest.approx(81.0) and "dev_accuracy" not in table
    assert by_mapping(results[results.strategy == "forward"], ["test_accuracy"]).empty


def test_shipped_paper_numbers_match_the_reference():
    table = paper_table().set_index(["Paper setting", "Init", "Layer selection"])
    glue = "BERT-base teacher, 3-layer students, GLUE test server"
    assert table.loc[(glue, "Randomly initialised", "None"), "MNLI-m accuracy"] == 63.2
    assert table.loc[(glue, "Randomly initialised", "All-to-one"), "MNLI-mm accuracy"] == 73.8
    assert table.loc[(glue, "Weights copied", "Forward"), "SST-2 accuracy"] == 92.3
    assert table.loc[(glue, "Weights copied", "Reverse"), "QQP f1"] == 68.3
    seq = "BART-large (DART) and T5-base (WMT16 En-Ro) teachers, seq2seq students"
    assert table.loc[(seq, "Randomly initialised", "None"), "WMT16 En-Ro bleu"] == 8.02
    assert table.loc[(seq, "Weights copied", "Reverse"), "DART bleu"] == 48.45
    reference = Path(__file__).resolve().parents[2] / "shared" / "reference" / "paper-notes.md"
    if reference.is_file():  # in CI the team's reference sits beside the clone: every README number must be shipped
        text = reference.read_text().split("## 5. Results")[1].split("### 5.4")[0]
        rows = "\n".join(line for line in text.splitlines() if line.startswith("|"))
        numbers = {float(x) for x in re.findall(r"\b\d+\.\d+\b", rows)}
        shipped = set(pd.read_csv(Path(__file__).resolve().parents[1] / "layergeo" / "resources" / "paper_results.csv").value)
        assert numbers <= shipped, sorted(numbers - shipped)


def test_sweep_through_submitit_local_executor(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.replace("seed: [0, 1, 2]", "seed: [0]").replace("[none, forward, reverse]", "[forward, rail]"))
    assert main(["sweep", str(grid), "--out", str(tmp_path / "s"), "--launcher", "local"]) == 0
    runs = tmp_path / "s" / "tiny-grid" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["forward_seed0", "rail_seed0"]
    assert all((p / "results.json").is_file() for p in runs.iterdir())
    assert any((tmp_path / "s" / "tiny-grid" / "submitit").rglob("*_result.pkl"))


def test_a_grid_of_blocks_is_the_union_of_their_products(tmp_path):
    from layergeo.errors import LayergeoError
    from layergeo.sweep import load_grid, plan, restrict

    grid = tmp_path / "blocks.yaml"
    grid.write_text(GRID.split("grid:")[0] + """grid:
  - {matching.strategy: [none], seed: [0, 1]}
  - {matching.strategy: [forward], loss.normalize: [none, l2], loss.alpha_hidden: [0.3, 3.0], seed: [0, 1]}
""")
    _, runs = plan(load_grid(grid), tmp_path / "out")
    assert len(runs) == 2 + 2 * 2 * 2
    by_name = {run.name: run.config for run in runs}
    assert {n for n in by_name if n.startswith("none_")} == {"none_seed0", "none_seed1"}
    forward = by_name["forward_l2_alpha_hidden0.3_seed1"]
    assert (forward.matching.strategy, forward.loss.normalize, forward.loss.alpha_hidden, forward.seed) == ("forward", "l2", 0.3, 1)
    assert by_name["none_seed0"].loss.normalize == "none"  # the preset's value: not crossed

    _, cut = plan(restrict(load_grid(grid), {"loss.normalize": ["l2"], "seed": [1]}), tmp_path / "out")
    assert sorted(run.name for run in cut) == ["forward_l2_alpha_hidden0.3_seed1", "forward_l2_alpha_hidden3.0_seed1"]
    with pytest.raises(LayergeoError, match="leaves no run"):
        restrict(load_grid(grid), {"loss.normalize": ["l2"], "matching.strategy": ["none"]})

    grid.write_text(GRID.split("grid:")[0] + "grid:\n  - {seed: [0]}\n  - {}\n")
    with pytest.raises(LayergeoError, match="non-empty lists"):
        load_grid(grid)
    grid.write_text(GRID + "  seed: [0\n")
    with pytest.raises(LayergeoError, match="grid file .* is not valid YAML"):
        load_grid(grid)


def test_a_layer_pair_in_a_grid_and_in_only_stays_a_string(tmp_path, capsys):
    from layergeo.sweep import load_grid

    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.replace("[none, forward, reverse]", "[forward, 1:3]"))  # YAML 1.1 would read 1:3 as 63
    assert load_grid(grid).blocks[0]["matching.strategy"] == ["forward", "1:3"]
    capsys.readouterr()
    assert main(["sweep", str(grid), "--out", str(tmp_path / "out"), "--only", "matching.strategy=1:3", "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "[   new] 1-3_seed0" in listing and "forward" not in listing and "3 runs, 0 finished" in listing


def test_a_slice_of_the_grid_runs_first_and_the_full_sweep_skips_it(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    out = tmp_path / "out"
    slice_args = ["--only", "seed=1", "--only", "matching.strategy=none,reverse"]
    assert main(["sweep", str(grid), "--out", str(out), *slice_args]) == 0
    runs = out / "tiny-grid" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["none_seed1", "reverse_seed1"]
    capsys.readouterr()
    assert main(["sweep", str(grid), "--out", str(out), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "[  done] none_seed1" in listing and "[  done] reverse_seed1" in listing and listing.count("[   new]") == 7

    assert main(["report", str(out / "tiny-grid")]) == 0
    record = json.loads((out / "tiny-grid" / "report" / "provenance.json").read_text())
    walls = [json.loads(f.read_text())["wall_time_s"] for f in runs.glob("*/results.json")]
    assert record["runs"] == {"student": 2, "teacher": 1}
    assert record["wall_time_s"]["student"] == pytest.approx(sum(walls), abs=0.1)
    assert record["first_start"] <= record["last_end"] and record["span_s"] >= 0
    assert len(record["git_commits"]) == 1 and len(record["versions"]) == 1

    for bad, message in [("data.task=sst2", "not an axis of grid 'tiny-grid'; its axes are matching.strategy, seed"),
                         ("seed=7", "seed=7: not a value of that axis; its values are 0, 1, 2"),
                         ("seed", "must look like axis=value"),
                         ("seed=[0", "--only 'seed=[0' has a value that is not valid YAML")]:
        capsys.readouterr()
        assert main(["sweep", str(grid), "--out", str(tmp_path / "bad"), "--only", bad]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_reproduce_runs_the_recipe_then_report_and_figures_and_times_it(tmp_path, monkeypatch):
    import layergeo.reproduce as reproduce_module

    analyses = tmp_path / "repo" / "analyses"
    analyses.mkdir(parents=True)
    (analyses / "classification.yaml").write_text(GRID.replace("reverse]", "reverse]\n  seed: [0]").replace("  seed: [0, 1, 2]\n", ""))
    monkeypatch.setattr(reproduce_module, "ANALYSES", analyses)
    assert main(["reproduce", "--out", str(tmp_path / "out")]) == 0
    root = tmp_path / "out" / "tiny-grid"
    assert len(list((root / "runs").glob("*/results.json"))) == 3
    assert (root / "report" / "summary.csv").is_file() and any((root / "figures").glob("*.png"))
    assert (root / "verdict" / "verdict.md").is_file() and (root / "verdict" / "verdict.png").is_file()
    assert set(pd.read_csv(root / "verdict" / "claim_a_beats_none.csv").strategy) == {"forward", "reverse"}
    init = pd.read_csv(root / "report" / "results_all.csv").init.iloc[0]
    authors = {p.name for p in (root / "figures").glob("authors_cosine_hist_*.png")}
    assert authors == {f"authors_cosine_hist_{init}_init.png", f"authors_cosine_hist_{init}_best.png"}
    for table in root.rglob("authors_cosine_hist.csv"):  # analyses made before the authors' statistic existed
        table.unlink()
    assert main(["figures", str(root), "--out", str(tmp_path / "older")]) == 0
    assert (tmp_path / "older" / "acute_summary.csv").is_file() and not any((tmp_path / "older").glob("authors_*"))
    assert pd.read_csv(tmp_path / "older" / "acute_summary.csv").authors_frac_positive.isna().all()
    record = json.loads((root / "reproduce.json").read_text())
    assert record["grid"] == "analyses/classification.yaml"
    assert record["start"] < record["end"] and record["wall_time_s"] > 0


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "analyses").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_a_valid_grid(recipe, tmp_path, capsys):
    assert main(["sweep", str(recipe), "--out", str(tmp_path), "--dry-run"]) == 0
    assert re.search(r"(\d+) runs, 0 finished", capsys.readouterr().out)


def test_a_block_sets_settings_of_its_own_runs_without_naming_them(tmp_path):
    from layergeo.errors import LayergeoError
    from layergeo.sweep import load_grid, plan, restrict

    grid = tmp_path / "grid.yaml"
    grid.write_text("name: g\npreset: tiny\nbase: {train: {epochs: 1}}\ngrid:\n"
                    "  - {data.task: [rotten_tomatoes], seed: [0, 1], set: {train: {epochs: 3}}}\n"
                    "  - {data.task: [bbc_news], seed: [0], set: {train: {epochs: 5, lr: 3.0e-4}}}\n")
    teachers, runs = plan(load_grid(grid), tmp_path / "out")
    assert [r.name for r in runs] == ["rotten_tomatoes_seed0", "rotten_tomatoes_seed1", "bbc_news_seed0"]
    assert [(r.config.train.epochs, r.config.train.lr) for r in runs] == [(3, 1e-3), (3, 1e-3), (5, 3e-4)]  # the preset lr, or the set one
    assert {config.teacher.train.epochs for config in teachers.values()} == {1}  # the preset's, not a block's
    _, sliced = plan(restrict(load_grid(grid), {"data.task": ["bbc_news"]}), tmp_path / "out")
    assert [(r.name, r.config.train.epochs) for r in sliced] == [("bbc_news_seed0", 5)]
    for text, message in (("set: {teacher: {train: {epochs: 2}}}", "teacher settings"), ("set: 3", "mapping of config"),
                          ("set: {train: {epochz: 2}}", "epochz")):
        grid.write_text(f"name: g\npreset: tiny\ngrid:\n  - {{seed: [0], {text}}}\n")
        with pytest.raises(LayergeoError, match=message):
            plan(load_grid(grid), tmp_path / "out")


def test_provenance_lists_the_commit_of_every_sitting(tmp_path):
    """A run resumed at another commit was made at both; env.json's top level holds only the last sitting's."""
    env = {"kind": "student", "start": "2026-12-03T19:01:00+00:00", "end": "2026-12-03T22:18:00+00:00",
           "wall_time_s": 10.0, "device": "cpu", "device_name": "x86_64", "threads": 1, "processes": 1,
           "platform": "Linux", "python": "3.11", "versions": {"torch": "2.13.0"}, "git_commit": "bbb", "command": "c",
           "sittings": [{"start": "2026-12-03T19:01:00+00:00", "git_commit": "aaa"},
                        {"start": "2026-12-03T22:17:00+00:00", "git_commit": "bbb"}]}
    old = {**env, "git_commit": "ccc", "sittings": [{"start": env["start"]}]}  # written before sittings kept commits
    for name, record in (("resumed", env), ("old", old)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "env.json").write_text(json.dumps(record))
    assert provenance(tmp_path)["git_commits"] == ["aaa", "bbb", "ccc"]
