"""The verdict on the paper's claims: seed-blocked tests, Holm-corrected answers and rank correlation against brute force
(the statistics themselves are checked in test_stats.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from layergeo.cells import ALL_CELLS
from layergeo.cli import main
from layergeo.errors import LayergeoError
from layergeo import stats
from layergeo.report import STAT_COLUMNS, paired_differences
from layergeo.verdict import acute_vs_metric, beats_none, spread_vs_noise, write_verdict


def _results(diffs: dict[str, list[float]], base: list[float]) -> pd.DataFrame:
    rows = [{"run": f"none{s}", "task": "t", "init": "copy", "strategy": "none", "seed": s, "test_accuracy": v}
            for s, v in enumerate(base)]
    for strategy, deltas in diffs.items():
        rows += [{"run": f"{strategy}{s}", "task": "t", "init": "copy", "strategy": strategy, "seed": s,
                  "test_accuracy": base[s] + d} for s, d in enumerate(deltas)]
    frame = pd.DataFrame(rows)
    for key, value in {"student_layers": 3, "hidden_size": "teacher", "normalize": "none", "alpha_hidden": 3.0}.items():
        frame[key] = value
    return frame


def test_beats_none_answers_only_when_the_holm_interval_excludes_zero():
    base = [70.0, 72.0, 71.0, 69.0, 70.5]
    results = _results({"forward": [4, 5, 6, 5, 4], "reverse": [-3, -4, -2, -3, -5], "rail": [1, -1, 2, -2, 0]}, base)
    answers = beats_none(results, "test_accuracy").set_index("strategy")
    assert answers.loc["forward", "answer"] == "better" and answers.loc["forward", "mean_diff"] == pytest.approx(4.8)
    assert answers.loc["reverse", "answer"] == "worse"
    assert answers.loc["rail", "answer"] == "not distinguishable"
    # one family of 3: forward's p is the smallest, tested at 0.05 / 3, and its interval is the t interval at 1 - 0.05 / 3
    forward = np.array([4, 5, 6, 5, 4], float)
    assert answers.loc["forward", "p_holm"] == pytest.approx(3 * stats.paired_t(forward, np.zeros(5))["p"])
    assert answers.loc["forward", "ci_level"] == pytest.approx(1 - 0.05 / 3)
    q = sps.t.ppf(1 - 0.05 / 6, 4)
    half = q * forward.std(ddof=1) / np.sqrt(5)
    assert (answers.loc["forward", "ci_low"], answers.loc["forward", "ci_high"]) == pytest.approx((4.8 - half, 4.8 + half))
    assert answers.loc["forward", "d_z"] == pytest.approx(4.8 / forward.std(ddof=1)) and answers.n_seeds.eq(5).all()
    with pytest.raises(LayergeoError, match="none"):
        beats_none(results[results.strategy != "none"], "test_accuracy")


def test_a_called_difference_is_named_once_and_an_unmeasured_untrained_student_is_said_so(tmp_path):
    base = [70.0, 72.0, 71.0, 69.0, 70.5]
    results = _results({"forward": [4, 5, 6, 5, 4], "reverse": [-3, 4, -2, 3, -5], "rail": [1, -1, 2, -2, 0]}, base)
    acute = pd.DataFrame({"run": results.run, "checkpoint": "best", "frac_acute": np.linspace(0.8, 1.0, len(results))})
    paragraph = (write_verdict(results, acute, tmp_path) / "verdict.md").read_text().split("**t, weights copied**")[1]
    claim_a = paragraph.split(" (b) ")[0]
    assert "better 1, worse 0, not distinguishable 2**: Forward +4.8 points" in claim_a
    assert claim_a.count("Forward +4.8") == 1 and "Highest" not in claim_a     # forward is the highest, named as called
    assert "Lowest: Reverse -0.6 points" in claim_a
    assert "(c) Acute angles (every measured layer, embedding output included): untrained not measured, " in paragraph
    everything_called = _results({"forward": [4, 5, 6, 5, 4], "reverse": [-3, -4, -2, -3, -5]}, base)
    acute = acute[acute.run.isin(everything_called.run)]
    text = (write_verdict(everything_called, acute, tmp_path / "all") / "verdict.md").read_text()
    assert "Highest" not in text and "Lowest" not in text and text.count("Reverse -3.4 points") == 1


def test_the_same_gain_on_every_seed_is_tested_by_sign_flips_not_called_certain(tmp_path):
    results = _results({"forward": [0.5, 0.5, 0.5], "reverse": [-1, 0, 1]}, [70.0, 71.0, 72.0])
    forward = beats_none(results, "test_accuracy").set_index("strategy").loc["forward"]
    assert forward.p == pytest.approx(0.25) and forward.answer == "not distinguishable" and forward.ci_low == -np.inf
    acute = pd.DataFrame({"run": results.run, "checkpoint": "best", "frac_acute": np.linspace(0.8, 1.0, len(results))})
    text = (write_verdict(results, acute, tmp_path) / "verdict.md").read_text()
    assert ("Forward +0.5 points (d_z undefined; p = 0.25, Holm 0.5; 97.5% interval unbounded: the same difference on "
            "every seed, exact sign-flip test)") in text


def test_the_family_is_the_whole_table_and_report_and_verdict_agree():
    one = _results({"forward": [4, 5, 6, 5, 4], "reverse": [1, -1, 2, -2, 0]}, [70.0, 72.0, 71.0, 69.0, 70.5])
    other = one.assign(task="u", run=one.run + "u")
    results = pd.concat([one, other], ignore_index=True)
    a = beats_none(results, "test_accuracy")
    assert len(a) == 4 and a.ci_level.max() == pytest.approx(1 - 0.05 / 4)      # 4 comparisons, 2 tasks
    report = paired_differences(results.assign(dev_accuracy=results.test_accuracy + 1), "none", ["test_accuracy", "dev_accuracy"])
    report = report[report.metric == "test_accuracy"]                 # a second metric is a family of its own
    merged = a.merge(report, on=["task", "init", "strategy"], suffixes=("", "_report"))
    for column in STAT_COLUMNS:
        if column != "answer":
            np.testing.assert_allclose(merged[column].astype(float), merged[f"{column}_report"].astype(float), equal_nan=True)
    assert (merged.answer == merged.answer_report).all()


def test_two_seeds_make_no_call_and_the_verdict_says_so(tmp_path):
    results = _results({"forward": [4, 5], "reverse": [-3, -4]}, [70.0, 72.0])
    a = beats_none(results, "test_accuracy")
    assert (a.answer == "no call").all() and a.ci_low.isna().all() and a.p.isna().all()
    acute = pd.DataFrame({"run": results.run, "checkpoint": "best", "frac_acute": np.linspace(0.8, 1.0, len(results))})
    text = (write_verdict(results, acute, tmp_path) / "verdict.md").read_text()
    assert "Only 2 seeds: a paired interval needs at least 3, so **no call** is made for any of the 2 matching strategies" in text


def test_claim_b_is_tested_within_seeds():
    rng = np.random.default_rng(1)
    seeds = rng.normal(0, 8, size=5)                                  # large seed effect, small consistent gap
    results = _results({"forward": list(seeds + 2 + rng.normal(0, 0.3, 5)), "reverse": list(seeds + rng.normal(0, 0.3, 5)),
                        "rail": list(seeds + rng.normal(0, 0.3, 5))}, [70.0] * 5)
    b = spread_vs_noise(results, "test_accuracy").iloc[0]
    table = results[results.strategy != "none"].pivot(index="seed", columns="strategy", values="test_accuracy")
    want = stats.blocked_spread_test(table.to_numpy())
    for column in ("spread", "p_permutation", "friedman_p", "spread_ci_low", "spread_ci_high", "null_spread_mean"):
        assert b[column] == pytest.approx(want[column])
    assert b.best == "forward" and b.n_seeds == 5 and b.p_permutation < 0.05 and b.friedman_p < 0.05


def test_report_tables_can_be_rewritten_from_results_all(tmp_path, capsys):
    results = _results({"forward": [4, 5, 6], "reverse": [-1, 0, 1]}, [70.0, 71.0, 72.0])
    results.to_csv(tmp_path / "results_all.csv", index=False)
    assert main(["report", "--results", str(tmp_path / "results_all.csv")]) == 0
    diff = pd.read_csv(tmp_path / "diff_vs_none.csv").set_index("strategy")
    assert diff.loc["forward", "answer"] == "better" and diff.loc["forward", "p_holm"] == pytest.approx(
        2 * stats.paired_t(np.array([4.0, 5, 6]), np.zeros(3))["p"])
    assert (tmp_path / "diff_vs_forward.md").is_file() and (tmp_path / "report.md").is_file()
    assert not (tmp_path / "results_all.md").exists() and not (tmp_path / "provenance.json").exists()
    assert "Holm-corrected" in (tmp_path / "report.md").read_text()
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    for argv, message in ((["report"], "give either RUNS_DIR"), (["report", str(tmp_path), "--results", "x.csv"], "give either"),
                          (["report", "--results", str(tmp_path / "missing.csv")], "missing.csv does not exist"),
                          (["report", "--results", str(empty)], "cannot be read as a CSV")):
        capsys.readouterr()
        assert main(argv) != 0 and message in capsys.readouterr().err


@pytest.mark.parametrize("column, prefix", [("frac_acute", "acute"), ("thales_ratio", "ratio")])
def test_geometry_means_and_spearman_match_a_brute_force_rank_correlation(column, prefix):
    rng = np.random.default_rng(3)
    results = _results({s: list(rng.normal(size=5)) for s in ("forward", "reverse", "shuffle")}, list(rng.normal(70, 2, size=5)))
    n = len(results)
    acute = pd.concat([pd.DataFrame({"run": results.run, "checkpoint": "init", "frac_acute": rng.uniform(0.95, 1, n),
                                     "thales_ratio": rng.uniform(3, 6, n)}),
                       pd.DataFrame({"run": results.run, "checkpoint": "best", "frac_acute": rng.uniform(0.8, 0.95, n),
                                     "thales_ratio": rng.uniform(1, 3, n)})])
    row = acute_vs_metric(results, acute, "test_accuracy").iloc[0]
    matching = results[results.strategy != "none"].merge(acute[acute.checkpoint == "best"], on="run")
    x, y = matching[column].to_numpy(), matching.test_accuracy.to_numpy()
    ranks = [np.argsort(np.argsort(v)).astype(float) for v in (x, y)]
    assert row[f"{prefix}_spearman_rho"] == pytest.approx(np.corrcoef(*ranks)[0, 1], abs=1e-12)
    assert row.n_students == 15
    untrained = acute[(acute.checkpoint == "init") & acute.run.isin(matching.run)][column].mean()
    assert row[f"{prefix}_untrained"] == pytest.approx(untrained) and row[f"{prefix}_trained"] == pytest.approx(x.mean())


def test_an_acute_table_without_the_thales_ratio_still_gives_claim_c():
    results = _results({"forward": [1, 2, 3], "reverse": [0, 1, -1]}, [70.0, 71.0, 72.0])
    acute = pd.DataFrame({"run": list(results.run) * 2, "checkpoint": ["init"] * 9 + ["best"] * 9,
                          "frac_acute": np.linspace(0.8, 1.0, 18)})
    c = acute_vs_metric(results, acute, "test_accuracy")
    assert "acute_spearman_rho" in c and not any(name.startswith("ratio_") for name in c)


def test_claim_c_gives_the_authors_statistic_of_the_matching_students_beside_ours(tmp_path):
    results = _results({"forward": [4, 5, 6], "reverse": [-1, 0, 1]}, [70.0, 71.0, 72.0])
    mean_cos, positive = np.linspace(0.2, 0.6, 18), np.linspace(0.9, 1.0, 18)
    acute = pd.DataFrame({"run": list(results.run) * 2, "checkpoint": ["init"] * 9 + ["best"] * 9,
                          "frac_acute": np.linspace(0.8, 1.0, 18), "authors_mean_cos": mean_cos, "authors_frac_positive": positive})
    row = acute_vs_metric(results, acute, "test_accuracy").iloc[0]
    matching = ~acute.run.str.startswith("none")
    for column, values in (("authors_mean_cos", mean_cos), ("authors_frac_positive", positive)):
        assert row[f"{column}_untrained"] == pytest.approx(values[(acute.checkpoint == "init") & matching].mean())
        assert row[f"{column}_trained"] == pytest.approx(values[(acute.checkpoint == "best") & matching].mean())
    write_verdict(results, acute, tmp_path / "v")
    assert (f"the authors' per-token mean cosine {row.authors_mean_cos_untrained:.2f} untrained, "
            f"{row.authors_mean_cos_trained:.2f} trained, positive at {100 * row.authors_frac_positive_untrained:.1f}% and "
            f"{100 * row.authors_frac_positive_trained:.1f}% of tokens") in (tmp_path / "v" / "verdict.md").read_text()
    assert "authors_mean_cos_trained" not in acute_vs_metric(results, acute.drop(columns=["authors_mean_cos"]), "test_accuracy")


def test_claim_c_names_the_cells_its_acute_table_covers(tmp_path):
    results = _results({"forward": [4, 5, 6], "reverse": [-1, 0, 1]}, [70.0, 71.0, 72.0])
    acute = pd.DataFrame({"run": list(results.run) * 2, "checkpoint": ["init"] * 9 + ["best"] * 9,
                          "frac_acute": np.linspace(0.8, 1.0, 18)})
    write_verdict(results, acute.assign(cells="S1–S3, teacher pairs among T1–T6"), tmp_path / "v")
    assert "(c) Acute angles (S1–S3, teacher pairs among T1–T6): " in (tmp_path / "v" / "verdict.md").read_text()
    assert set(pd.read_csv(tmp_path / "v" / "claim_c_acute.csv").cells) == {"S1–S3, teacher pairs among T1–T6"}
    write_verdict(results, acute, tmp_path / "old")  # written before the cells column: its frac_acute covered every cell
    assert f"(c) Acute angles ({ALL_CELLS}): " in (tmp_path / "old" / "verdict.md").read_text()


def test_claim_c_is_made_per_stack_for_encoder_decoder_students(tmp_path):
    results = _results({"forward": [4, 5, 6], "reverse": [-1, 0, 1]}, [70.0, 71.0, 72.0])
    runs, checkpoints = list(results.run) * 2, ["init"] * 9 + ["best"] * 9
    acute = pd.concat([pd.DataFrame({"run": runs, "checkpoint": checkpoints, "stack": "encoder", "frac_acute": np.linspace(0.9, 1.0, 18)}),
                       pd.DataFrame({"run": runs, "checkpoint": checkpoints, "stack": "decoder", "frac_acute": np.linspace(0.5, 0.6, 18)})], ignore_index=True)
    c = acute_vs_metric(results, acute, "test_accuracy").set_index("stack")
    matching = ~acute.run.str.startswith("none")
    for stack in ("encoder", "decoder"):
        one = acute[(acute["stack"] == stack) & matching]
        assert c.loc[stack, "acute_trained"] == pytest.approx(one[one.checkpoint == "best"].frac_acute.mean())
        assert c.loc[stack, "acute_untrained"] == pytest.approx(one[one.checkpoint == "init"].frac_acute.mean())
        assert c.loc[stack, "n_students"] == 6
    assert c.loc["encoder", "acute_trained"] > 0.9 > 0.6 > c.loc["decoder", "acute_trained"]
    text = (write_verdict(results, acute, tmp_path / "v") / "verdict.md").read_text()
    assert f"(c) Acute angles, encoder stack ({ALL_CELLS}): {100 * c.loc['encoder', 'acute_untrained']:.1f}% untrained" in text
    assert f"(c) Acute angles, decoder stack ({ALL_CELLS}): {100 * c.loc['decoder', 'acute_untrained']:.1f}% untrained" in text
    with pytest.raises(LayergeoError, match="more than one row for a run and checkpoint and no stack column"):
        acute_vs_metric(results, acute.drop(columns="stack"), "test_accuracy")


def test_claim_c_keeps_one_stack_runs_beside_encoder_decoder_runs(tmp_path):
    one = _results({"forward": [4, 5, 6], "reverse": [-1, 0, 1]}, [70.0, 71.0, 72.0])
    two = one.assign(task="u", run=one.run + "u")
    results = pd.concat([one, two], ignore_index=True)
    checkpoints = ["init"] * 9 + ["best"] * 9
    acute = pd.concat([pd.DataFrame({"run": list(one.run) * 2, "checkpoint": checkpoints, "frac_acute": np.linspace(0.8, 1.0, 18)}),
                       *[pd.DataFrame({"run": list(two.run) * 2, "checkpoint": checkpoints, "stack": stack,
                                       "frac_acute": np.linspace(0.5, 0.6, 18)}) for stack in ("encoder", "decoder")]],
                      ignore_index=True)                          # the one-stack task's rows have no stack (NaN)
    c = acute_vs_metric(results, acute, "test_accuracy")
    assert sorted(zip(c.task, c["stack"].fillna("-"))) == [("t", "-"), ("u", "decoder"), ("u", "encoder")]
    assert c[c.task == "t"].acute_trained.iloc[0] == pytest.approx(acute[acute.run.isin(["forward1", "forward2", "forward0",
        "reverse0", "reverse1", "reverse2"]) & (acute.checkpoint == "best")].frac_acute.mean())
    text = (write_verdict(results, acute, tmp_path / "mixed") / "verdict.md").read_text()
    assert f"(c) Acute angles ({ALL_CELLS})" in text and "(c) Acute angles, decoder stack" in text
    only_one = acute[acute.run.isin(one.run)].assign(stack=np.nan)  # a stack column with nothing in it
    assert "stack" not in acute_vs_metric(one, only_one, "test_accuracy").dropna(axis=1, how="all")
    write_verdict(one, only_one, tmp_path / "empty_stack")


def test_a_common_difference_is_said_once_and_a_called_sign_flip_result_says_so(tmp_path):
    results = _results({"forward": [1.0] * 7, "reverse": [1.0] * 7}, [70.0, 71.0, 72.0, 69.0, 70.0, 73.0, 71.0])
    acute = pd.DataFrame({"run": results.run, "checkpoint": "best", "frac_acute": np.linspace(0.8, 1.0, len(results))})
    claim_a = (write_verdict(results, acute, tmp_path) / "verdict.md").read_text().split(" (b) ")[0]
    assert "**better 2, worse 0, not distinguishable 0**. Every one of them: the same difference, +1.0 points" in claim_a
    assert claim_a.count("+1.0 points") == 1
    assert "interval +1.0 to +1.0: the same difference on every seed, exact sign-flip test)" in claim_a


def test_verdict_files_and_cli_errors(tmp_path, capsys):
    results = _results({"forward": [4, 5, 6], "reverse": [-1, 0, 1]}, [70.0, 71.0, 72.0])
    acute = pd.DataFrame({"run": list(results.run) * 2, "checkpoint": ["init"] * 9 + ["best"] * 9,
                          "frac_acute": np.linspace(0.8, 1.0, 18), "thales_ratio": np.linspace(4.0, 1.0, 18)})
    results.to_csv(tmp_path / "results.csv", index=False)
    acute.to_csv(tmp_path / "acute.csv", index=False)
    assert main(["verdict", "--results", str(tmp_path / "results.csv"), "--acute", str(tmp_path / "acute.csv"),
                 "--out", str(tmp_path / "v")]) == 0
    printed = capsys.readouterr().out
    assert ("2 matching strategies against none, 3 seeds, paired t-tests Holm-corrected over the 2 comparisons of this "
            "table: **better 1, worse 0, not distinguishable 1**") in printed  # forward +4..+6, reverse -1..+1
    assert "Thales ratio 3.03 untrained, 1.44 trained" in printed  # linspace(4, 1, 18): rows 3-8 (init) and 12-17 (best) are matching
    for name in ("claim_a_beats_none.csv", "claim_b_spread.csv", "claim_c_acute.csv", "verdict.md", "verdict.png", "verdict.pdf"):
        assert (tmp_path / "v" / name).is_file()
    spread = spread_vs_noise(results, "test_accuracy").iloc[0]
    assert spread.spread == pytest.approx(5.0) and spread.best == "forward"
    assert main(["verdict", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["verdict", "--results", str(tmp_path / "results.csv")]) == 2
    assert main(["verdict", "--results", str(tmp_path / "results.csv"), "--acute", str(tmp_path / "acute.csv"),
                 "--out", str(tmp_path / "w"), "--metric", "bleu"]) == 2
    assert "no column 'bleu'" in capsys.readouterr().err
    write_verdict(results, acute, tmp_path / "again")
    assert (tmp_path / "again" / "claim_a_beats_none.csv").read_text() == (tmp_path / "v" / "claim_a_beats_none.csv").read_text()


def test_evaluation_records_the_majority_rate_and_collapsed_students():
    import torch
    from types import SimpleNamespace

    from layergeo.families import get_family

    class Constant(torch.nn.Module):
        """Always answers class 1 of 3."""

        config = SimpleNamespace(num_labels=3)

        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(logits=torch.tensor([0.0, 1.0, 0.0]).expand(len(input_ids), 3))

    labels = torch.tensor([0, 1, 1, 2, 1, 0, 1])
    loader = [{"input_ids": torch.ones(4, 2, dtype=torch.long), "attention_mask": torch.ones(4, 2), "labels": labels[:4]},
              {"input_ids": torch.ones(3, 2, dtype=torch.long), "attention_mask": torch.ones(3, 2), "labels": labels[4:]}]
    metrics = get_family("encoder").evaluate(Constant(), loader, torch.device("cpu"), config=None, tokenizer=None)
    assert metrics["accuracy"] == pytest.approx(4 / 7) and metrics["majority_rate"] == pytest.approx(4 / 7)
    assert metrics["predicted_classes"] == 1 and metrics["n"] == 7


def test_the_verdict_says_how_many_students_collapsed_to_one_class(tmp_path):
    results = _results({"forward": [4, 5, 6]}, [70.0, 71.0, 72.0])
    results["test_predicted_classes"] = [2, 1, 2, 1, 1, 2]
    results["test_majority_rate"] = 60.0
    acute = pd.DataFrame({"run": list(results.run), "checkpoint": "best", "frac_acute": np.linspace(0.8, 1.0, 6)})
    text = (write_verdict(results, acute, tmp_path) / "verdict.md").read_text()
    assert ("**3 of 6 students predict a single class on test** (majority-class rate 60.0%): Forward seed 0, "
            "Forward seed 1, None seed 1") in text
    results = results.drop(columns=["test_predicted_classes"])
    text = (write_verdict(results, acute, tmp_path) / "verdict.md").read_text()
    assert "does not record how many classes each student predicts on test" in text
