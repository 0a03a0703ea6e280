"""How a run's metrics become table columns: one name per split and metric, fractions shown in %."""

from __future__ import annotations

PERCENT = ("accuracy", "macro_f1", "majority_rate", "exact_match")  # fractions in results.json, shown in %
SCORES = ("bleu", "chrf", "perplexity")  # sacrebleu's 0-100 scores, and the completion perplexity (results_all only)


def metric_columns(split: str, metrics: dict) -> dict:
    """A split's metrics as report columns: ``{split}_{metric}``, fractions in %, with the number of predicted classes."""
    columns = {f"{split}_{m}": (100 if m in PERCENT else 1) * metrics[m] for m in (*PERCENT, *SCORES) if m in metrics}
    if "predicted_classes" in metrics:
        columns[f"{split}_predicted_classes"] = metrics["predicted_classes"]
    return columns


def split_column(metric_column: str, metric: str) -> str:
    """The column of ``metric`` on the split of ``metric_column``: ("test_accuracy", "majority_rate") -> "test_majority_rate"."""
    return f"{metric_column.split('_')[0]}_{metric}"
