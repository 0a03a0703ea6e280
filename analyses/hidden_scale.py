"""How large are the embedded teacher's raw hidden states, layer by layer?

The hidden-state loss is an MSE on raw states, so its size (and its gradient next to CE and KL)
follows their scale. Prints, for each teacher state T0..T_L of a teacher run, the mean token norm,
the mean per-unit variance and the mean squared distance to the next state, over the dev split.

    python analyses/hidden_scale.py runs/classification/teachers/rotten_tomatoes-minilm [--max-examples 400]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

from layergeo import data
from layergeo.models import load_checkpoint
from layergeo.runs import RunDir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher_run", type=Path)
    parser.add_argument("--max-examples", type=int, default=400)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    run = RunDir(args.teacher_run)
    config = run.config()
    model, tokenizer = load_checkpoint(run.checkpoint("best"))
    task = data.load_task(config.data.task, max_examples={"dev": args.max_examples}, seed=0)
    loader = data.make_loader(data.encode(task.splits["dev"], tokenizer, task.text_columns, config.data.max_length),
                              tokenizer, 32, shuffle=False, seed=0)
    sums: dict[str, torch.Tensor] = {}
    n = 0
    with torch.inference_mode():
        for batch in loader:
            keep = batch["attention_mask"].bool()
            states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True).hidden_states
            tokens = torch.stack([h[keep] for h in states]).double()            # (L+1, N, d)
            step = torch.cat([(tokens[1:] - tokens[:-1]).pow(2).sum(-1), torch.zeros_like(tokens[:1, :, 0])])
            for name, value in {"norm": tokens.norm(dim=-1), "unit_var": tokens.var(-1), "sq_step": step}.items():
                sums[name] = sums.get(name, 0) + value.sum(1)
            n += tokens.shape[1]
    table = pd.DataFrame({name: (total / n).numpy() for name, total in sums.items()})
    table.index = [f"T{i}" for i in range(len(table))]
    table.columns = ["mean token norm", "mean per-unit variance", "mean squared distance to next state"]
    print(f"{args.teacher_run} ({config.data.task} dev, {n} tokens)")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
