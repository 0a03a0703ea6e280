"""Results at several budgets from one run: the selection rule against brute force, the tiny run's logged
evaluations, the claims per budget, and the data seed that keeps one training subset for every seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from layergeo.budgets import collect_budget_results, run_budgets, selected_at_budgets
from layergeo.cli import main
from layergeo.config import load_config
from layergeo.errors import LayergeoError
from layergeo.teacher import family_of
from layergeo.report import collect_results, student_runs
from layergeo.runs import read_jsonl
from layergeo.verdict import budget_sentences, claims_by_budget, write_verdict


def _brute_force(steps, dev, test, budget):
    """The loop's rule, written out: walk the evaluations in order, keep one only when strictly better."""
    best_dev, chosen = -np.inf, None
    for step, d, t in sorted(zip(steps, dev, test)):
        if step <= budget and d > best_dev:
            best_dev, chosen = d, (step, d, t)
    return chosen


@pytest.mark.parametrize("seed", range(20))
def test_selection_at_each_budget_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    steps = rng.choice(np.arange(1, 200), size=12, replace=False)
    dev = rng.integers(0, 5, size=12).astype(float)  # few distinct values: ties happen, the first one wins
    test = rng.normal(size=12)
    frame = pd.DataFrame({"step": steps, "dev_accuracy": dev, "test_accuracy": test}).sample(frac=1, random_state=seed)
    budgets = sorted(rng.choice(np.arange(1, 220), size=5, replace=False))
    table = selected_at_budgets(frame, budgets, "accuracy").set_index("budget")
    for budget in budgets:
        expected = _brute_force(steps, dev, test, budget)
        if expected is None:
            assert budget not in table.index
            continue
        row = table.loc[budget]
        assert (row.selected_step, row.dev_accuracy, row.test_accuracy) == pytest.approx(expected)


@pytest.fixture(scope="module")
def budget_runs(tmp_path_factory) -> Path:
    """Two seeds x (none, forward) on the tiny preset, evaluated on dev and test at steps 1, 2 and the end (4)."""
    root = tmp_path_factory.mktemp("budgets")
    teacher = root / "teacher"
    assert main(["teacher", "--preset", "tiny", "--out", str(teacher)]) == 0
    for strategy in ("none", "forward"):
        for seed in (0, 1):
            out = root / "runs" / f"tiny_copy_{strategy}_seed{seed}"
            args = ["train", "--preset", "tiny", "--out", str(out), "--set", f"teacher.dir={teacher}",
                    "--set", f"matching.strategy={strategy}", "--set", f"seed={seed}", "--set", "train.max_steps=4",
                    "--set", "train.eval_steps=[1, 2]", "--set", "train.eval_test=true", "--set", "train.eval_every=100"]
            assert main(args) == 0
    return root


def test_a_run_logs_dev_and_test_at_its_budgets_and_the_end_is_its_best_checkpoint(budget_runs):
    run = budget_runs / "runs" / "tiny_copy_forward_seed0"
    evaluations = [r for r in read_jsonl(run / "metrics.jsonl") if "split" in r]
    assert [(r["step"], r["split"]) for r in evaluations] == [(1, "dev"), (1, "test"), (2, "dev"), (2, "test"),
                                                               (4, "dev"), (4, "test")]
    table = run_budgets(run)
    assert table.budget.tolist() == [1, 2, 4] and table.end.tolist() == [False, False, True]
    results = json.loads((run / "results.json").read_text())
    end = table.iloc[-1]
    assert end.selected_step == results["best_step"]
    assert end.dev_accuracy == pytest.approx(100 * results["dev"]["accuracy"])
    assert end.test_accuracy == pytest.approx(100 * results["test"]["accuracy"])
    # the test split never selects: the selected step is the best dev one, whatever test says
    dev = {r["step"]: r["accuracy"] for r in evaluations if r["split"] == "dev"}
    assert table.iloc[1].selected_step == max((s for s in dev if s <= 2), key=lambda s: (dev[s], -s))


def test_budget_results_report_and_verdict(budget_runs, tmp_path):
    results = collect_results(budget_runs)
    budgets = collect_budget_results(student_runs(budget_runs), results)
    assert len(budgets) == 4 * 3 and set(budgets.columns) >= {"run", "strategy", "seed", "budget", "selected_step", "test_accuracy"}
    assert main(["report", str(budget_runs), "--out", str(tmp_path / "report")]) == 0
    saved = pd.read_csv(tmp_path / "report" / "results_by_budget.csv")
    assert saved[["run", "budget", "test_accuracy"]].equals(budgets[["run", "budget", "test_accuracy"]])
    acute = pd.DataFrame({"run": results.run, "checkpoint": "best", "frac_acute": 0.9})
    write_verdict(results, pd.concat([acute, acute.assign(checkpoint="init")]), tmp_path / "verdict", budgets=budgets)
    text = (tmp_path / "verdict" / "verdict.md").read_text()
    assert "## At each training budget" in text and "**Step 2," in text and "Only 2 seeds" in text
    for name in ("claim_a_by_budget.csv", "claim_b_by_budget.csv", "budget_differences.png", "budget_differences.pdf"):
        assert (tmp_path / "verdict" / name).is_file(), name


def _budget_table(gap_at: dict[int, float], seeds: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for budget, gap in gap_at.items():
        base = 60 + rng.normal(0, 2, seeds)
        for strategy, shift in (("none", 0.0), ("forward", gap), ("reverse", 0.0)):
            for seed in range(seeds):
                rows.append({"run": f"{strategy}{seed}", "task": "t", "init": "copy", "strategy": strategy, "seed": seed,
                             "budget": budget, "test_accuracy": base[seed] + shift + rng.normal(0, 0.3)})
    return pd.DataFrame(rows)


def test_claims_by_budget_find_a_planted_gap_only_where_it_is():
    a, b = claims_by_budget(_budget_table({32: 0.0, 320: 5.0}), "test_accuracy")
    answers = a.set_index(["budget", "strategy"]).answer
    assert answers[(320, "forward")] == "better" and answers[(32, "forward")] == "not distinguishable"
    assert answers[(320, "reverse")] == "not distinguishable"
    assert a.columns[0] == "budget" and sorted(b.budget) == [32, 320]
    # Holm runs within each budget's table (2 comparisons; over both budgets' 4 the first level would be 1 - 0.05 / 4):
    # forward, rejected, was tested at 0.05 / 2, reverse after it at 0.05
    assert sorted(a[a.budget == 320].ci_level) == pytest.approx([0.95, 1 - 0.05 / 2])
    table = _budget_table({32: 0.0, 320: 5.0}).assign(test_predicted_classes=2)
    table.loc[(table.budget == 32) & (table.strategy == "forward") & (table.seed < 2), "test_predicted_classes"] = 1
    lines = budget_sentences(*claims_by_budget(table, "test_accuracy"), "test_accuracy", table)
    assert "**2 of 18 students predict a single class on test**: Forward seed 0, Forward seed 1;" in lines[0]
    assert lines[0].startswith("**Step 32, ") and " 0 of 18 students predict a single class on test." in lines[1]
    assert "single class" not in budget_sentences(a, b, "test_accuracy", table.drop(columns="test_predicted_classes"))[0]
    with pytest.raises(LayergeoError, match="none"):
        claims_by_budget(_budget_table({32: 0.0}).query("strategy != 'none'"), "test_accuracy")
    # a budget only the none runs reached (a partial sweep, or a run length of its own): no claim (a) there
    lone = _budget_table({32: 0.0, 320: 5.0, 981: 0.0}).query("budget != 981 or strategy == 'none'")
    a, b = claims_by_budget(lone, "test_accuracy")
    assert sorted(set(a.budget)) == [32, 320] and sorted(b.budget) == [32, 320]
    # none of one task beside the matching strategies of another, at one budget: nothing to compare there either
    other = _budget_table({32: 0.0}).assign(task=lambda t: np.where(t.strategy == "none", "a", "b"))
    with pytest.raises(LayergeoError, match="beside a matching strategy of the same task and init"):
        claims_by_budget(other, "test_accuracy")
    a, _ = claims_by_budget(pd.concat([other.assign(budget=981), _budget_table({32: 0.0})]), "test_accuracy")
    assert sorted(set(a.budget)) == [32]


def test_the_data_seed_keeps_one_training_subset_for_every_seed():
    def train_texts(*overrides):
        config = load_config(preset="tiny", overrides=["data.max_train=16", *overrides])
        return family_of(config).load_task(config).splits["train"]["text"].tolist()

    assert train_texts("seed=0") != train_texts("seed=1")  # the old rule: the subset follows the run's seed
    assert train_texts("seed=0", "data.seed=7") == train_texts("seed=1", "data.seed=7")
    assert train_texts("seed=7") == train_texts("seed=3", "data.seed=7")


@pytest.mark.parametrize("override, message", [
    ("train.eval_steps=[100, 32]", "increasing order"),
    ("train.eval_steps=[0, 5]", "step >= 1"),
    ("data.seed=-1", "data.seed"),
])
def test_bad_budget_settings_are_refused(override, message):
    with pytest.raises(LayergeoError, match=message):
        load_config(preset="tiny", overrides=[override])
