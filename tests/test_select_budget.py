"""The random-init budget is chosen from the none and forward students only."""

from __future__ import annotations

import importlib.util
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
