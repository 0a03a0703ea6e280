"""The ``layergeo`` command line: one entry point, one subcommand per task.

Callable as ``main(argv)`` for tests. Bad input raises :class:`LayergeoError`,
which becomes one line on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
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
  layergeo mapping --teacher-layers 6 --student-layers 3 --strategy rail --epoch 2
  layergeo mapping --teacher-layers 12 --student-layers 3 --strategy 1:4,2:8,3:12""",
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
    mapping.add_argument("--shuffle", choices=["fair", "any"], default="fair", help="shuffle: exclude forward/reverse orders (fair) or not")
    mapping.add_argument("--seed", type=int, default=0, help="seed of shuffle and rail")
    mapping.add_argument("--epoch", type=int, default=0, help="rail: the epoch whose draw to show")
    mapping.add_argument("--format", choices=["table", "json"], default="table")
    return parser


def run_training(args: argparse.Namespace) -> int:
    from layergeo.config import load_config
    from layergeo.runs import prepare_out_dir
    from layergeo.train import distil_student, fine_tune_teacher

    out = Path(args.out)
    preset = args.preset or (None if args.config else "default")
    if args.resume and not args.config and not args.overrides and not args.preset:
        config = load_config(out / "config.yaml") if (out / "config.yaml").is_file() else load_config(preset="default")
    else:
        config = load_config(args.config, preset, args.overrides)
    existed = out.exists()
    prepare_out_dir(out, args.resume, args.overwrite)
    try:
        if args.command == "teacher":
            results = fine_tune_teacher(config, out, resume=args.resume)
        else:
            results = distil_student(config, out, resume=args.resume)
    except LayergeoError:
        if not args.resume:  # leave nothing half-written behind
            shutil.rmtree(out, ignore_errors=True)
            if existed:
                out.mkdir()
        raise
    dev, test = results["dev"], results["test"]
    print(f"{args.command} run written to {out}: dev accuracy {dev['accuracy']:.4f}, test accuracy {test['accuracy']:.4f}, "
          f"{results['steps']} steps in {results['wall_time_s']:.0f} s")
    return 0


def run_mapping(args: argparse.Namespace) -> int:
    from layergeo.strategies import MappingOptions, build_mapper

    options = MappingOptions(strategy=args.strategy, embeddings=not args.no_embeddings, target=args.target, shuffle=args.shuffle)
    mapper = build_mapper(options, args.teacher_layers, args.student_layers, args.seed)
    pairs = mapper.pairs_at(args.epoch, 0)
    if args.format == "json":
        print(json.dumps({"strategy": mapper.name, "pairs": [list(p) for p in pairs]}))
        return 0
    print(f"strategy {mapper.name}: {args.teacher_layers}-layer teacher, {args.student_layers}-layer student"
          + (f" ({mapper.note})" if mapper.note else "") + (f", epoch {args.epoch} draw" if mapper.dynamic else ""))
    print("student  teacher")
    for s, t in pairs:
        print(f"S{s:<7} T{t}")
    if not pairs:
        print("(no pairs)")
    return 0


def _quiet_libraries() -> None:
    """Our own progress bar is enough: silence the per-file bars and notices of transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


COMMANDS = {"teacher": run_training, "train": run_training, "mapping": run_mapping}


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


if __name__ == "__main__":
    sys.exit(main())
