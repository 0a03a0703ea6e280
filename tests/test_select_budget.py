"""The random-init budget is chosen from the none and forward students only."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd

spec = importlib.util.spec_from_file_location("select_budget", Path(__file__).parents[1] / "analyses" / "select_budget.py")
select_budget = importlib.util.module_from_spec(spec)
spec.loader.exec_module(select_budget)


def _row(strategy, normalize, acc, seed=0, lr=1e-4):
    return {"strategy": strategy, "seed": seed, "dev_accuracy": acc, "loss.normalize": normalize, "loss.alpha_hidden": 3.0,
            "train.random_init_lr": lr, "train.random_init_epochs": 1, "train.warmup_ratio": 0.1}


def test_selection_ignores_every_other_strategy():
    table = pd.DataFrame([
        _row("none", "none", 70), _row("none", "none", 72, seed=1),      # none at lr 1e-4: 71
        _row("forward", "none", 60), _row("forward", "none", 62, seed=1),  # (71 + 61) / 2 = 66
        _row("forward", "l2", 67),                                         # (71 + 67) / 2 = 69: the winner
        _row("reverse", "none", 99), _row("all_to_one", "l2", 99),         # would win on a strategy gap: ignored
        _row("forward", "layernorm", 90, lr=5e-4),                         # no none student at this lr: not eligible
    ])
    ranking = select_budget.select(table)
    assert ranking.iloc[0]["loss.normalize"] == "l2" and ranking.iloc[0]["score"] == 69
    assert ranking["score"].tolist() == [69, 66]
    assert set(ranking["loss.normalize"]) == {"l2", "none"}
    # the none students' hidden-loss knobs do not matter (they have no hidden loss)
    table.loc[table.strategy == "none", "loss.normalize"] = "layernorm"
    assert select_budget.select(table)["score"].tolist() == [69, 66]


TINY_BUDGET = """
name: tiny-budget
preset: tiny
base:
  data: {max_train: 64, max_eval: 32}
  student: {init: random}
  train: {max_steps: 2, log_every: 1, term_grad_norms: true}
grid:
  - matching.strategy: [none]
    train.random_init_lr: [1.0e-3]
    seed: [0]
  - matching.strategy: [forward]
    loss.normalize: [none, l2]
    train.random_init_lr: [1.0e-3]
    seed: [0]
"""


def test_selection_writes_ranking_choice_majority_rate_and_loss_figure(tmp_path):
    from layergeo import data
    from layergeo.cli import main

    grid = tmp_path / "budget.yaml"
    grid.write_text(TINY_BUDGET)
    assert main(["sweep", str(grid), "--out", str(tmp_path / "runs")]) == 0
    out = tmp_path / "selection"
    assert select_budget.main([str(tmp_path / "runs" / "tiny-budget"), "--out", str(out)]) == 0
    ranking = pd.read_csv(out / "ranking.csv")
    assert sorted(ranking["loss.normalize"]) == ["l2", "none"]
    chosen = json.loads((out / "selection.json").read_text())
    assert chosen["chosen"]["loss.normalize"] == ranking.iloc[0]["loss.normalize"]
    assert chosen["dev_accuracy"]["forward"] == round(ranking.iloc[0]["forward"], 2)
    labels = data.load_task("rotten_tomatoes", max_examples={"dev": 32}, seed=0).splits["dev"]["label"].tolist()
    assert chosen["dev_majority_class_rate"] == round(100 * max(labels.count(v) for v in set(labels)) / len(labels), 2)
    assert (out / "loss_terms.png").stat().st_size > 0 and (out / "loss_terms.pdf").is_file()
    curves = select_budget.setting_curves(tmp_path / "runs" / "tiny-budget", select_budget.runs_table(tmp_path / "runs" / "tiny-budget"), ranking.iloc[0])
    assert set(curves.strategy) == {"none", "forward, none, α=3", "forward, l2, α=3"}
    assert {"ce", "kl", "hidden", "grad_norm_hidden"} <= set(curves.term)
