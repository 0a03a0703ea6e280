"""The ``layergeo`` command line: one entry point, one subcommand per task.

Callable as ``main(argv)`` for tests. Bad input raises :class:`LayergeoError`,
which becomes one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from layergeo.errors import LayergeoError

EXAMPLES = {
    "teacher": """examples:
  layergeo teacher --out runs/teacher                      # MiniLM fine-tuned on Rotten Tomatoes
  layergeo teacher --set data.task=bbc_news --out runs/teacher-bbc
  layergeo teacher --preset tiny --out /tmp/t              # tiny random teacher, seconds""",
    "train": """examples:
  layergeo train --preset tiny --out /tmp/run              # smoke test: teacher + student in seconds
  layergeo train --out runs/forward                        # the default: MiniLM teacher, 3-layer copy student
  layergeo train --set teacher.dir=runs/teacher --set matching.strategy=reverse --out runs/reverse
  layergeo train --set student.init=random --set student.hidden_size=192 --out runs/narrow
  layergeo train --config runs/reverse/config.yaml --out runs/reverse-again   # reproduce a run
  layergeo train --config runs/reverse/config.yaml --out runs/reverse --resume""",
    "mapping": """examples:
  layergeo mapping --teacher-layers 12 --student-layers 3 --strategy reverse --format json
  layergeo mapping --teacher-layers 6 --student-layers 3 --strategy rail --draw 2   # RAIL's third draw
  layergeo mapping --teacher-layers 12 --student-layers 3 --strategy 1:4,2:8,3:12
  layergeo mapping --family seq2seq --teacher-layers 6 --student-layers 3 --strategy shuffle
  layergeo mapping --family seq2seq --teacher-layers 6 --student-layers 3 --strategy encoder:1:2,decoder:1:6
  layergeo mapping --family causal --teacher-layers 36 --student-layers 9 --strategy all_to_one --no-embeddings""",
    "angles": """examples:
  layergeo angles --run runs/reverse                       # trained student, dev split, student space
  layergeo angles --run runs/reverse --checkpoint init     # the untrained student (the paper's view)
  layergeo angles --run runs/narrow --space teacher        # T_i - W S_l instead of W^T(T_i - W S_l)
  layergeo angles --run runs/reverse --texts my_sentences.txt --max-examples 500
  layergeo angles --runs runs/ --checkpoint both --out runs/comparison   # every run under runs/""",
    "geometry": """examples:
  layergeo geometry --run runs/reverse                     # angles + distances, distance ratio, CKA, transitions
  layergeo geometry --runs runs/forward runs/reverse --out runs/comparison""",
    "sweep": """examples:
  layergeo sweep analyses/classification.yaml --dry-run      # list the runs and what is finished
  layergeo sweep analyses/classification.yaml --out runs     # run (or resume) every run
  layergeo sweep analyses/width.yaml --devices 0,1           # one run per GPU at a time
  layergeo sweep analyses/verdict.yaml --only data.task=bbc_news --only seed=0,1   # a slice first""",
    "report": """examples:
  layergeo report runs/classification                        # tables in runs/classification/report/
  layergeo report runs/classification --paper                # with the paper's published numbers beside
  layergeo report --results figures/classification/tables/results_all.csv --paper   # rewrite a saved report's tables""",
    "figures": """examples:
  layergeo figures runs/classification                       # figures in runs/classification/figures/""",
    "explain": """examples:
  layergeo train --preset tiny --out /tmp/run && layergeo explain --run /tmp/run     # /tmp/run/explain/
  layergeo train --preset tiny --set trace.gradients=true --out /tmp/grad && layergeo explain --run /tmp/grad
  layergeo explain --runs runs/explain/runs --out runs/explain/compare             # strategies side by side""",
    "verdict": """examples:
  layergeo verdict runs/classification                       # after report/figures: runs/classification/verdict/
  layergeo verdict runs/classification --metric dev_accuracy
  layergeo verdict --results figures/classification/tables/results_all.csv \\
                   --acute figures/classification/plots/acute_summary.csv --out /tmp/verdict""",
    "lm-eval": """examples (needs `pip install 'layergeo[lm-eval]'` and a network for the tasks' datasets):
  layergeo lm-eval --run runs/llm-forward --tasks hellaswag,coqa          # the authors' two tasks, zero-shot
  layergeo lm-eval --run runs/llm-forward --tasks hellaswag --limit 200 --checkpoint init""",
    "reproduce": """examples:
  layergeo reproduce                                         # embedded recipe: Rotten Tomatoes, 2 seeds
  layergeo reproduce --full                                  # + BBC News: the committed results
  layergeo reproduce --out /tmp/repro --jobs 2""",
}


def _config_args(parser: argparse.ArgumentParser) -> None:
    from layergeo.config import preset_names

    parser.add_argument("--config", metavar="FILE", help="a YAML config (e.g. a run's config.yaml)")
    parser.add_argument("--preset", choices=preset_names(), help="a named preset (default: 'default' unless --config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set matching.strategy=reverse (repeatable)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the run directory to write")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")


def build_parser() -> argparse.ArgumentParser:
    from layergeo.strategies import strategy_names

    parser = argparse.ArgumentParser(
        prog="layergeo",
        description="Distil students under every layer-matching strategy and measure why the order hardly matters.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    teacher = sub.add_parser("teacher", help="fine-tune a teacher on a task", epilog=EXAMPLES["teacher"], formatter_class=fmt,
                             description="Fine-tune a pretrained encoder (config sections data, teacher) and save it.")
    _config_args(teacher)

    train = sub.add_parser("train", help="distil a student into a run directory", epilog=EXAMPLES["train"], formatter_class=fmt,
                           description="Distil a student from a fine-tuned teacher (trained first into <out>/teacher "
                                       "when teacher.dir is empty) under one layer-matching strategy.")
    _config_args(train)

    mapping = sub.add_parser("mapping", help="print the layer pairs of a strategy", epilog=EXAMPLES["mapping"],
                             formatter_class=fmt, description="Print which teacher state each student state is matched "
                             "to (index 0 = embedding output, k = output of layer k).")
    mapping.add_argument("--teacher-layers", type=int, required=True)
    mapping.add_argument("--student-layers", type=int, required=True)
    mapping.add_argument("--strategy", default="forward", help=f"{', '.join(strategy_names())}, or pairs like 1:4,2:8,3:12")
    mapping.add_argument("--target", type=int, help="all_to_one target teacher layer (default: the middle one)")
    mapping.add_argument("--no-embeddings", action="store_true", help="leave out the S0->T0 embedding pair")
    mapping.add_argument("--shuffle", choices=["distinct", "fair", "any"], default="distinct",
                         help="shuffle: neither forward nor reverse and distinct across seeds 0..N-1 (distinct, the "
                              "default), neither forward nor reverse drawn per seed (fair), or any order (any)")
    mapping.add_argument("--seed", type=int, default=0, help="seed of shuffle and rail")
    mapping.add_argument("--draw", "--epoch", dest="draw", type=int, default=0,
                         help="rail: which draw to show, from 0; draw k trains from step k x ceil(steps / matching.rail_draws) "
                              "(rail_draws 10 by default, so at most 10 draws: 8 in a 32-step run), or from epoch k "
                              "with rail_draws null")
    mapping.add_argument("--family", default="encoder",
                         help="model family, encoder (default), seq2seq or causal: each of its stacks gets the mapping "
                         "(seq2seq: encoder and decoder, each with its own shuffle and rail draws; causal: the decoder, "
                         "matched without the embedding pair in the authors' LLM recipe, so add --no-embeddings)")
    mapping.add_argument("--format", choices=["table", "json"], default="table")
    for name, extras in (("angles", "the angles"), ("geometry", "angles, distances, the distance ratio, "
                                                               "debiased linear CKA and the structured cosine of layer transitions (transition_cosine.*)")):
        cmd = sub.add_parser(name, help=f"measure {extras} of the teacher's layers seen from the student",
                             epilog=EXAMPLES[name], formatter_class=fmt,
                             description=f"Run the teacher and the student of a run over texts and measure {extras}, "
                             "for every student state S_l and teacher pair (T_i, T_k): cos(T_i - S_l, T_k - S_l) "
                             "over non-padding tokens. Acute (cos > 0) means pulling S_l toward one teacher layer "
                             "also brings it closer to the other.")
        where = cmd.add_mutually_exclusive_group(required=True)
        where.add_argument("--run", metavar="DIR", help="one student run directory")
        where.add_argument("--runs", nargs="+", metavar="DIR", help="several runs, or a folder holding runs: one tidy table")
        cmd.add_argument("--checkpoint", default="best", help="best (trained, default), init (untrained) or both (with --runs)")
        cmd.add_argument("--space", default="student", help="student: W^T(T_i - W S_l), the pull the student feels "
                                                              "(default); teacher: T_i - W S_l")
        cmd.add_argument("--split", default="dev", help="dataset split of the run to use (default dev)")
        cmd.add_argument("--texts", metavar="FILE", help="your own sentences, one per line, instead of a split")
        cmd.add_argument("--max-examples", type=int, metavar="N",
                         help="analyse at most N examples (default: every example of the split or file; the run's "
                              "dev accuracy uses its data.max_eval cap, recorded beside it in summary.json)")
        cmd.add_argument("--max-length", type=int, metavar="N",
                         help="truncate at N tokens (default: the run's data.max_length; for --texts the model maximum)")
        cmd.add_argument("--bins", type=int, default=200, help="histogram bins on [-1, 1] (default 200)")
        cmd.add_argument("--batch-size", type=int, default=32)
        cmd.add_argument("--device", default="auto", help="auto, cpu or cuda")
        cmd.add_argument("--with-embeddings", action="store_true",
                         help="include the embedding output S0 and teacher pairs with T0 in the headline numbers and "
                              "figures (default: student layers >= 1 and teacher pairs among layers >= 1, as the paper's "
                              "authors measure; angles.csv and angle_hist.csv always hold every cell)")
        cmd.add_argument("--out", metavar="DIR", help="output folder (default: <run>/geometry/<checkpoint>-<space>-<source>/; "
                                                      "with --runs: ./angles-comparison)")
    sweep = sub.add_parser("sweep", help="run every combination of a grid file", epilog=EXAMPLES["sweep"],
                           formatter_class=fmt, description="Run the Cartesian product of a grid (see analyses/*.yaml) "
                           "as independent runs under OUT/<grid name>/runs/. Finished runs are skipped, interrupted "
                           "ones resumed: kill and restart freely.")
    sweep.add_argument("grid", metavar="GRID.yaml")
    sweep.add_argument("--out", default="runs", metavar="DIR", help="parent folder (default: runs)")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and their status, run nothing")
    sweep.add_argument("--jobs", type=int, default=1, help="parallel runs on this machine (default 1)")
    sweep.add_argument("--devices", help="comma-separated GPU ids: one run per GPU at a time, e.g. 0,1,2,3")
    sweep.add_argument("--launcher", choices=["here", "slurm", "local"], default="here",
                       help="here (default): this machine; slurm: submit through submitit; local: submitit's local executor")
    sweep.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                       help="submitit executor parameter, e.g. --slurm slurm_partition=gpu --slurm gpus_per_node=1 "
                            "--slurm timeout_min=120 (repeatable)")
    sweep.add_argument("--only", action="append", default=[], metavar="AXIS=V1,V2",
                       help="run only the grid points with these values of an axis (repeatable; blocks that do not "
                            "cross the axis are left out). Run names stay those of the full grid, so a later full "
                            "sweep skips what the slice finished")

    report = sub.add_parser("report", help="tables of a sweep: mean ± std, paired differences, spread",
                            epilog=EXAMPLES["report"], formatter_class=fmt,
                            description="Aggregate the finished runs under RUNS_DIR into the paper's layout (CSV, "
                            "Markdown, LaTeX): rows init x strategy, columns task x metric, mean ± std over seeds.")
    report.add_argument("runs_dir", metavar="RUNS_DIR", nargs="?", help="a sweep folder")
    report.add_argument("--results", metavar="CSV", help="instead of RUNS_DIR: a saved report's results_all.csv, whose "
                        "tables are rewritten from it (no run folders needed; results_all and provenance.json stay)")
    report.add_argument("--out", metavar="DIR", help="default: RUNS_DIR/report, or the folder of --results")
    report.add_argument("--paper", action="store_true", help="add the paper's published numbers (their setting) beside ours")

    figures = sub.add_parser("figures", help="comparison figures of a sweep", epilog=EXAMPLES["figures"],
                             formatter_class=fmt, description="Metric per strategy with seed spread, angle heatmaps "
                             "faceted by strategy, acute fractions untrained vs trained, cosine histograms, loss terms. "
                             "Angles over student layers >= 1 and teacher pairs among layers >= 1, as the paper's authors "
                             "measure (the histograms: student layers >= 1, every teacher pair).")
    figures.add_argument("runs_dir", metavar="RUNS_DIR")
    figures.add_argument("--out", metavar="DIR", help="default: RUNS_DIR/figures")

    explain = sub.add_parser("explain", help="one page of why a run's matching did what it did, from its geometry trace",
                             epilog=EXAMPLES["explain"], formatter_class=fmt, description=textwrap.fill(
                                 "Reads the geometry trace a run wrote while it trained (trace.examples dev examples, "
                                 "probed at step 0 and trace.probes times; no checkpoint is loaded) and draws: (a) the "
                                 "acute fraction and Thales ratio at the student over training (student layers >= 1, teacher "
                                 "pairs among layers >= 1), (b) the distance to the "
                                 "matched and to the other teacher layers, (c) one token in the plane of a teacher pair "
                                 "with the student's trajectory and the pair's Thales ball; for runs trained with "
                                 "trace.gradients=true, (d) the parameter-gradient alignment of pulls toward two teacher "
                                 "layers at start, middle and end and (e) each strategy's hidden-loss gradient and the "
                                 "KL gradient against the task's CE gradient over training (opt-in: measured at 1.7 x the rest of a 32-step "
                                 "MiniLM run's time, a median 2.3 x on the explain study's 96-step runs and 0.77 x on its 320-step ones, "
                                 "2.3 x on its 100-step SmolLM2 LoRA runs probed at three student layers (trace.gradient_layers), "
                                 "0.86 x on its 100-step seq2seq runs probed at S3 of each stack, against 0.045 x "
                                 "for the default trace; BENCHMARKS.md). Writes explain.png/.pdf, "
                                 "explain.md (the numbers in sentences) and the tables as CSV.", 100))
    which = explain.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", metavar="DIR", help="a student run directory: its page")
    which.add_argument("--runs", nargs="+", metavar="DIR", help="runs (or folders of runs) of one setting: their traces "
                       "compared, a line per strategy (mean over seeds) and init; --out required")
    explain.add_argument("--out", metavar="DIR", help="default: DIR/explain (with --run)")
    explain.add_argument("--stack", metavar="NAME", help="for runs with several stacks (seq2seq: encoder, decoder): the "
                         "one the text, the token plane, the gradient matrices and --runs' comparison read (default: "
                         "the first traced; the page's panels (a) and (b) draw every stack)")

    verdict = sub.add_parser("verdict", help="the paper's three claims answered with intervals and tests",
                             epilog=EXAMPLES["verdict"], formatter_class=fmt,
                             description=textwrap.fill("(a) does every matching strategy beat none (paired differences on the same "
                             "seeds, paired t-test Holm-corrected over the table, better/worse only when the Holm "
                             "interval excludes 0, no call below 3 seeds)? (b) do the matching strategies differ by more "
                             "than seed noise (within-seed permutation test of the spread and Friedman's test, seeds as "
                             "blocks; the spread with a seed-bootstrap interval from 5 seeds)? (c) how acute are the angles (over the "
                             "cells the acute table names; layergeo figures writes student layers >= 1 and teacher pairs "
                             "among layers >= 1; each stack of an encoder-decoder student on its own) untrained "
                             "vs trained, and does the trained fraction, or the trained Thales ratio (distance from a "
                             "teacher pair's midpoint over half the pair's distance), predict the metric (Spearman)? "
                             "Beside them the authors' own statistic (per-token mean cosine, its share of positive "
                             "tokens), untrained and trained. "
                             "Reads a sweep after `layergeo figures`, or the two saved tables. Writes claim_a/b/c CSVs, "
                             "verdict.md and verdict.png/.pdf; when the runs evaluated test along training "
                             "(train.eval_steps, train.eval_test), also (a) and (b) at each training budget "
                             "(claim_a/b_by_budget.csv, budget_differences.png).", 100))
    verdict.add_argument("runs_dir", metavar="RUNS_DIR", nargs="?", help="a sweep folder (with figures/acute_summary.csv)")
    verdict.add_argument("--results", metavar="CSV", help="instead of RUNS_DIR: a saved report/results_all.csv ...")
    verdict.add_argument("--acute", metavar="CSV", help="... and its figures/acute_summary.csv")
    verdict.add_argument("--budgets", metavar="CSV", help="... and (optional) its report/results_by_budget.csv: the claims "
                         "at each training budget (runs trained with train.eval_steps and train.eval_test)")
    verdict.add_argument("--metric", default="test_accuracy", help="test_accuracy (default), dev_accuracy, test_macro_f1")
    verdict.add_argument("--out", metavar="DIR", help="default: RUNS_DIR/verdict (required with --results)")

    lm_eval = sub.add_parser("lm-eval", help="score a decoder-only student with lm-evaluation-harness (optional extra)",
                             epilog=EXAMPLES["lm-eval"], formatter_class=fmt, description=textwrap.fill(
                                 "Runs lm-evaluation-harness (the `hf` model) on the merged student of a decoder-only "
                                 "run, as the authors scored their Qwen3 students on HellaSwag and CoQA, and writes "
                                 "RUN/lm_eval/<checkpoint>.json: the harness's results per task, its version and these "
                                 "settings. The harness fetches each task's dataset from the Hugging Face hub.", 100))
    lm_eval.add_argument("--run", required=True, metavar="DIR", help="a decoder-only (teacher.family: causal) run directory")
    lm_eval.add_argument("--tasks", required=True, metavar="T1,T2", help="harness task names, comma-separated")
    lm_eval.add_argument("--checkpoint", default="best", choices=["best", "init"],
                         help="the trained student (best, default) or the untrained copy (init)")
    lm_eval.add_argument("--limit", type=int, metavar="N", help="at most N examples per task (default: all)")
    lm_eval.add_argument("--num-fewshot", type=int, metavar="K", help="default: each task's own (zero-shot for both)")
    lm_eval.add_argument("--batch-size", type=int, default=8, help="default: 8")
    lm_eval.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1 (default: cpu)")

    reproduce = sub.add_parser("reproduce", help="the embedded recipe end to end: teacher, grid, geometry, report, figures, verdict",
                               epilog=EXAMPLES["reproduce"], formatter_class=fmt,
                               description="Run analyses/classification.yaml (or classification-full.yaml with --full) "
                               "then the report, the figures and the verdict. Resumable: run it again after an interruption. "
                               "Without --full it is the quick version (Rotten Tomatoes, 2 seeds, 1,000 training examples, "
                               "under 30 minutes on 2 cores): a check that everything runs, too few seeds for the verdict "
                               "to call any strategy better or worse.")
    reproduce.add_argument("--full", action="store_true", help="3 seeds on both embedded datasets (Rotten Tomatoes and BBC News): the committed results")
    reproduce.add_argument("--out", default="runs", metavar="DIR", help="parent folder (default: runs)")
    reproduce.add_argument("--jobs", type=int, default=1, help="runs at a time on the CPU (default 1; --jobs 2 on "
                           "2 cores gives the committed numbers exactly, each run on one thread)")
    reproduce.add_argument("--devices", help="comma-separated GPU ids: one run per GPU at a time, e.g. 0,1")
    return parser


def _grid_slice(items: list[str]) -> dict[str, list]:
    """``["seed=0,1", "data.task=bbc_news"]`` -> ``{"seed": [0, 1], "data.task": ["bbc_news"]}`` (YAML values)."""
    from layergeo.config import command_line_value, split_key_value

    only: dict[str, list] = {}
    for item in items:
        key, values = split_key_value(item, "--only", "axis=value[,value...], e.g. --only seed=0,1")
        only.setdefault(key, []).extend(command_line_value(v, item, "--only") for v in values.split(","))
    return only


def _slots(args: argparse.Namespace) -> list[str] | None:
    """The GPU ids of ``--devices`` (None without it), after checking ``--jobs`` and ``--devices`` together."""
    if args.jobs < 1:
        raise LayergeoError(f"--jobs {args.jobs}: give at least 1 (runs at a time on this machine)")
    if args.devices and args.jobs != 1:
        raise LayergeoError("give either --devices (one run per GPU) or --jobs (runs at a time on the CPU), not both")
    devices = args.devices.split(",") if args.devices else None
    if devices and not all(d.strip() for d in devices):
        raise LayergeoError(f"--devices {args.devices!r} has an empty item; give GPU ids like 0,1,2,3")
    return devices


def run_sweep(args: argparse.Namespace) -> int:
    from layergeo.runs import RunDir, check_output_path
    from layergeo.sweep import execute

    devices = _slots(args)
    if not args.dry_run:
        check_output_path(Path(args.out))
    only = _grid_slice(args.only)
    if args.launcher != "here" and not args.dry_run:
        from layergeo.config import command_line_value, split_key_value
        from layergeo.sweep import submit

        parameters = {}
        for item in args.slurm:
            key, value = split_key_value(item, "--slurm", "key=value, e.g. slurm_partition=gpu")
            parameters[key] = command_line_value(value, item, "--slurm")
        runs = submit(args.grid, Path(args.out), launcher=args.launcher, slurm=parameters, only=only)
    else:
        runs = execute(args.grid, Path(args.out), jobs=args.jobs, devices=devices, dry_run=args.dry_run, only=only)
    if not args.dry_run:
        finished = sum(RunDir(r.out).finished for r in runs)
        left = f"; {len(runs) - finished} not finished (another sweep may be running them)" if finished < len(runs) else ""
        print(f"{finished} of {len(runs)} runs finished under {runs[0].out.parent if runs else args.out}{left}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from layergeo.report import tables_from_results, write_report
    from layergeo.runs import check_output_path

    if bool(args.runs_dir) == bool(args.results):
        raise LayergeoError("give either RUNS_DIR (a sweep folder) or --results CSV (a saved report's results_all.csv)")
    if args.out:
        check_output_path(Path(args.out))
    if args.results:
        out = tables_from_results(Path(args.results), Path(args.out) if args.out else None, paper=args.paper)
    else:
        out = write_report(args.runs_dir, Path(args.out) if args.out else None, paper=args.paper)
    print((out / "report.md").read_text())
    print(f"tables (CSV, Markdown, LaTeX) in {out}")
    return 0


def run_figures(args: argparse.Namespace) -> int:
    from layergeo.figures import write_figures
    from layergeo.runs import check_output_path

    if args.out:
        check_output_path(Path(args.out))
    out = write_figures(args.runs_dir, Path(args.out) if args.out else None)
    print(f"figures (PNG and PDF) in {out}")
    return 0


def run_explain(args: argparse.Namespace) -> int:
    from layergeo.explain import explain_run, explain_runs
    from layergeo.runs import check_output_path

    if args.out:
        check_output_path(Path(args.out))
    if args.runs:
        if not args.out:
            raise LayergeoError("--runs needs --out DIR: the comparison belongs to no single run")
        out = explain_runs(args.runs, Path(args.out), args.stack)
        print((out / "compare.md").read_text().strip())
        print(f"comparison (PNG and PDF) and compare.csv in {out}")
        return 0
    out = explain_run(args.run, Path(args.out) if args.out else None, args.stack)
    print((out / "explain.md").read_text().strip())
    print(f"page (PNG and PDF) and tables in {out}")
    return 0


def run_verdict(args: argparse.Namespace) -> int:
    from layergeo.runs import check_output_path
    from layergeo.report import read_table
    from layergeo.verdict import verdict_from_sweep, write_verdict

    if args.out:
        check_output_path(Path(args.out))
    if args.runs_dir and not (args.results or args.acute or args.budgets):
        out = verdict_from_sweep(Path(args.runs_dir), Path(args.out) if args.out else None, args.metric)
    elif args.results and args.acute and args.out and not args.runs_dir:
        names = ("results", "acute", "budgets") if args.budgets else ("results", "acute")
        tables = {name: read_table(Path(getattr(args, name)), f"--{name}") for name in names}
        out = write_verdict(tables["results"], tables["acute"], Path(args.out), args.metric, tables.get("budgets"))
    else:
        raise LayergeoError("give either RUNS_DIR, or --results CSV --acute CSV [--budgets CSV] --out DIR")
    print((out / "verdict.md").read_text().split("\n## ")[0].strip())
    print(f"tables and figure in {out}")
    return 0


def run_reproduce(args: argparse.Namespace) -> int:
    from layergeo.reproduce import reproduce
    from layergeo.runs import check_output_path

    devices = _slots(args)
    check_output_path(Path(args.out))
    out = reproduce(Path(args.out), full=args.full, jobs=args.jobs, devices=devices)
    version = ("the 3-seed recipe on both embedded datasets" if args.full else
               "the quick version (2 seeds: a check that everything runs; see --full and analyses/verdict.yaml)")
    print(f"report, figures and verdict of {version} in {out}")
    return 0


def run_angles(args: argparse.Namespace) -> int:
    from layergeo.analyse import AngleOptions, analyse_run, compare_runs

    checkpoints = ["init", "best"] if args.checkpoint == "both" else [args.checkpoint]
    if args.run and len(checkpoints) > 1:
        raise LayergeoError("--checkpoint both needs --runs; with --run choose init or best")
    options = AngleOptions(checkpoint=checkpoints[0], space=args.space, split=args.split, texts=args.texts,
                           max_examples=args.max_examples, max_length=args.max_length, bins=args.bins,
                           batch_size=args.batch_size, device=args.device, extras=args.command == "geometry",
                           with_embeddings=args.with_embeddings)
    options.check()
    if args.run:
        out = analyse_run(args.run, options, Path(args.out) if args.out else None)
        summary = json.loads((out / "summary.json").read_text())
        per_stack = summary.get("stacks", {"": summary})
        for stack, part in per_stack.items():
            acute = ("no angle at the student measured" if part["frac_acute"] is None
                     else f"{part['frac_acute']:.1%} of the angles at the student are acute")
            authors = ("" if part.get("authors_frac_positive") is None else
                       f"; the authors' per-token mean cosine is {part['authors_mean_cos']:.2f} on average and positive at "
                       f"{part['authors_frac_positive']:.1%} of the tokens")
            print(f"{stack + ' stack: ' if stack else ''}{part['n_tokens']} tokens of {summary['n_examples']} examples: "
                  f"{acute} ({part['cells']}){authors}")
        print(f"tables and figures in {out}" + (f" ({', '.join(f'{s}/' for s in per_stack)} per stack)" if len(per_stack) > 1 else ""))
        return 0
    out = Path(args.out or "angles-comparison")
    table = compare_runs(args.runs, options, checkpoints, out)
    print(table[["run", "strategy", "init", "checkpoint", "frac_acute", "thales_ratio"]].to_string(index=False))
    print(f"tidy table and figures in {out}")
    return 0


def run_training(args: argparse.Namespace) -> int:
    from layergeo.config import load_config
    from layergeo.lifecycle import AlreadyFinished, execute_run
    from layergeo.runs import CONFIG

    out = Path(args.out)
    given = bool(args.config or args.overrides or args.preset)
    if args.resume and not given and (out / CONFIG).is_file():
        config = load_config(out / CONFIG)  # the saved configuration, as it was
    else:
        config = load_config(args.config, args.preset or (None if args.config else "default"), args.overrides)
    try:
        results = execute_run(args.command, config, out, resume=args.resume, overwrite=args.overwrite)
    except AlreadyFinished:
        print(f"{args.command} run {out} is already finished (results.json); nothing to resume")
        return 0
    from accelerate import PartialState

    if not PartialState().is_main_process:  # one of several launched processes: the main one reports
        return 0
    from layergeo.families import get_family

    family = get_family(config.teacher.family)
    dev, test = family.describe_metrics(results["dev"]), family.describe_metrics(results["test"])
    print(f"{args.command} run written to {out}: dev {dev}, test {test}, {results['steps']} steps in "
          f"{results['wall_time_s']:.0f} s")
    return 0


def run_mapping(args: argparse.Namespace) -> int:
    from layergeo.families import get_family
    from layergeo.strategies import MappingOptions, build_mapping

    for flag, value in (("--teacher-layers", args.teacher_layers), ("--student-layers", args.student_layers)):
        if value < 1:
            raise LayergeoError(f"{flag} {value}: give a number of layers of at least 1")
    if args.draw < 0:
        raise LayergeoError(f"--draw {args.draw}: draws count from 0")
    if args.seed < 0:
        raise LayergeoError(f"--seed {args.seed}: give a seed of at least 0")
    if args.student_layers > args.teacher_layers:
        raise LayergeoError(f"the student ({args.student_layers} layers) is deeper than its teacher "
                            f"({args.teacher_layers} layers); choose --student-layers <= {args.teacher_layers}")
    options = MappingOptions(strategy=args.strategy, embeddings=not args.no_embeddings, target=args.target, shuffle=args.shuffle)
    stacks = get_family(args.family).stacks
    mapping = build_mapping(options, {stack: (args.teacher_layers, args.student_layers) for stack in stacks}, args.seed)
    per_stack = mapping.pairs_at(args.draw, 0)
    if args.format == "json":
        logged = mapping.logged(args.draw, 0)
        pairs = [list(p) for p in logged] if isinstance(logged, list) else {k: [list(p) for p in v] for k, v in logged.items()}
        print(json.dumps({"strategy": mapping.name, "pairs": pairs}))
        return 0
    each = " per stack" if len(stacks) > 1 else ""
    print(f"strategy {mapping.name}: {args.teacher_layers}-layer teacher, {args.student_layers}-layer student{each}"
          + (f" ({mapping.note})" if mapping.note else "") + (f", draw {args.draw}" if mapping.dynamic else ""))
    for stack, pairs in per_stack.items():
        print(("" if len(stacks) == 1 else f"{stack}\n") + "student  teacher")
        for s, t in pairs:
            print(f"S{s:<7} T{t}")
        if not pairs:
            print("(no pairs)")
    return 0


def _quiet_libraries() -> None:
    """Our own progress bar is enough: silence the per-file bars and notices of transformers."""
    from transformers.utils import logging as hf_logging

    from huggingface_hub.utils import logging as hub_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()  # no warning per retry of an unreachable hub


def run_lm_eval(args: argparse.Namespace) -> int:
    from layergeo.lmeval import evaluate_run

    if args.limit is not None and args.limit < 1:
        raise LayergeoError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise LayergeoError(f"--batch-size must be at least 1, got {args.batch_size}")
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        raise LayergeoError("--tasks names no task; e.g. --tasks hellaswag,coqa")
    path = evaluate_run(Path(args.run), args.checkpoint, tasks, args.limit, args.batch_size, args.device, args.num_fewshot)
    print(f"lm-eval results of {args.checkpoint} in {path}")
    return 0


COMMANDS = {"teacher": run_training, "train": run_training, "mapping": run_mapping, "angles": run_angles,
            "geometry": run_angles, "sweep": run_sweep, "report": run_report, "figures": run_figures,
            "explain": run_explain, "verdict": run_verdict, "reproduce": run_reproduce,
            "lm-eval": run_lm_eval}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except LayergeoError as exc:
        print(f"layergeo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"layergeo {args.command}: interrupted; continue with --resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output went into a pipe that closed early (| head): nothing to report
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's final flush does not fail again
        return 0


if __name__ == "__main__":
    sys.exit(main())
