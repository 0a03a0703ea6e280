"""The bad-input catalogue: every subcommand refuses nonsense with one line and exit 2, and touches nothing.

Each case runs ``main(argv)`` in-process inside a fresh folder (the working directory too, so default
outputs such as ``runs/`` land there) holding what the case needs: a copy of one tiny finished run, files
that are empty, truncated, not YAML, not UTF-8, grids, CSVs. It asserts

* exit code 2,
* stderr is exactly one non-empty line (``layergeo CMD: error: ...``) and nothing says "Traceback",
* the folder tree (every path, and every file's size and mtime) is the same after as before, and so is
  the tiny run every case copies from.

Rejections by argparse itself (a flag's type or choices, a missing required flag) are their own class,
``ARGPARSE``: argparse prints its usage and then one error line, and exits with SystemExit(2); those
cases assert exit 2, no traceback, the error as the last line, and the tree unchanged.

Nothing here may start real work: the training loop (``train.fit``), the hidden-state pass of the
analyses (``analyse.hidden_states``) and the subprocesses of a sweep are replaced by a trap that raises
:class:`ReachedWork`, so an input that is not refused fails fast, saying how far it got.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

import layergeo.analyse as analyse_module
import layergeo.sweep as sweep_module
import layergeo.distil as distil_module
import layergeo.teacher as teacher_module
from layergeo.cli import main

REPO = Path(__file__).resolve().parents[1]
COMMITTED_RESULTS = REPO / "figures" / "classification" / "tables" / "results_all.csv"
COMMITTED_ACUTE = REPO / "figures" / "classification" / "plots" / "acute_summary.csv"
TINY = ["--preset", "tiny"]


class ReachedWork(BaseException):
    """Raised by the traps: the input was not refused before the real work began.

    A BaseException, so that no ``except Exception`` on the way (e.g. the one that turns a failure after a
    run started into one line) can pass it off as a refusal.
    """


# --------------------------------------------------------------------------------------------
# The cases


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # "{name}" fields are materials built in the case's folder (see Materials)
    argparse: bool = False  # rejected by argparse itself: usage + one error line, SystemExit(2)


CASES: list[Case] = []


def case(id: str, *argv: str, argparse: bool = False) -> None:
    assert id not in {c.id for c in CASES}, f"duplicate case id {id}"
    CASES.append(Case(id, tuple(argv), argparse))


def argparse_case(id: str, *argv: str) -> None:
    case(f"ARGPARSE-{id}", *argv, argparse=True)


# --- train / teacher: --set values out of range (named by their full dotted key) -------------

OPTIM_BAD = {
    "batch_size": ["0", "-4", "2.5", "big", ".inf"],
    "lr": ["0", "-1e-4", "nan", ".nan", ".inf", "-.inf", "fast", "true"],
    "epochs": ["0", "-1", "1.5", "many"],
    "max_steps": ["0", "-3", "x"],
    "warmup_ratio": ["-0.1", "1", "1.5", "nan"],
    "grad_clip": ["0", "-1", "nan", ".inf"],
    "eval_every": ["0", "-1", "often"],
    "log_every": ["0", "-2"],
    "early_stop": ["0", "-1"],
    "weight_decay": ["-0.01", "nan", ".inf"],
    "random_init_lr": ["0", "-1", "nan", ".inf"],
    "random_init_epochs": ["0", "-1"],
    "cache_dtype": ["bfloat16", "7"],
}
for name, values in OPTIM_BAD.items():
    for value in values:
        case(f"train-set-train.{name}={value}", "train", *TINY, "--set", f"train.{name}={value}", "--out", "{tmp}/out")
TEACHER_OPTIM_BAD = {
    "batch_size": ["0", "-4"], "lr": ["0", "nan", ".inf", "-1"], "epochs": ["0", "-2"], "max_steps": ["0"],
    "warmup_ratio": ["1"], "grad_clip": ["0"], "eval_every": ["0"], "log_every": ["0"], "weight_decay": ["-1"],
}
for name, values in TEACHER_OPTIM_BAD.items():
    for value in values:
        case(f"teacher-set-teacher.train.{name}={value}", "teacher", *TINY, "--set", f"teacher.train.{name}={value}",
             "--out", "{tmp}/out")
        if value == values[0]:  # a student run also checks the section of the teacher it would train
            case(f"train-set-teacher.train.{name}={value}", "train", *TINY, "--set", f"teacher.train.{name}={value}",
                 "--out", "{tmp}/out")
OTHER_BAD = {
    "seed": ["-1", "4294967296", "abc", "1.5"],
    "data.max_length": ["0", "1", "-64", "long"],
    "data.max_train": ["0", "-1"],
    "data.max_eval": ["0", "-5"],
    "student.layers": ["0", "-1", "three"],
    "student.hidden_size": ["0", "-192"],
    "student.intermediate_size": ["0"],
    "student.num_heads": ["0", "-2"],
    "student.copy_layers": ["0,1", "-1,2", "a,b"],
    "student.init": ["pretrained"],
    "loss.temperature": ["0", "-1", "nan", ".inf"],
    "loss.alpha_ce": ["-1", "nan"],
    "loss.alpha_kl": ["-0.5", ".inf"],
    "loss.alpha_hidden": ["-3", "nan"],
    "loss.normalize": ["batchnorm"],
    "loss.hidden_reduction": ["max"],
    "loss.positions": ["prompt"],
    "student.lora.r": ["0", "-8"],
    "student.lora.dropout": ["1", "-0.1"],
    "student.lora.alpha": ["0"],
    "teacher.lora.r": ["0"],
    "matching.strategy": ["backwards"],
    "matching.rail_every_steps": ["0"],
    "matching.rail_draws": ["0", "-2"],
    "matching.target": ["-1"],
    "matching.shuffle": ["sometimes"],
    "matching.embeddings": ["maybe"],
    "trace.gradient_layers": ["0", "3", "1,a"],  # the tiny student has 2 layers
}
for key, values in OTHER_BAD.items():
    for value in values:
        case(f"train-set-{key}={value}", "train", *TINY, "--set", f"{key}={value}", "--out", "{tmp}/out")
for key, value in [("seed", "-1"), ("data.max_length", "0"), ("data.max_train", "0")]:
    case(f"teacher-set-{key}={value}", "teacher", *TINY, "--set", f"{key}={value}", "--out", "{tmp}/out")
case("train-set-lora-on-an-encoder", "train", *TINY, "--set", "student.lora.r=8", "--out", "{tmp}/out")
case("train-set-unknown-tracker", "train", *TINY, "--set", "train.log_with=tensorbored", "--out", "{tmp}/out")
case("train-set-tracker-not-installed", "train", *TINY, "--set", "train.log_with=aim", "--out", "{tmp}/out")
case("teacher-set-unknown-tracker", "teacher", *TINY, "--set", "teacher.train.log_with=[none]", "--out", "{tmp}/out")
case("train-set-all-alphas-zero", "train", *TINY, "--set", "loss.alpha_ce=0", "--set", "loss.alpha_kl=0",
     "--set", "loss.alpha_hidden=0", "--out", "{tmp}/out")

# --- train / teacher: keys and syntax of --set -----------------------------------------------

for item in ["bogus=1", "student.depth=3", "teacher.train.speed=2", "loss.alpah_kl=1", "student=3",
             "student.layers", "=3", "student.copy_layers=[2,4", "data.task={x"]:
    case(f"train-set-syntax-{item}", "train", *TINY, "--set", item.replace("{", "{{"), "--out", "{tmp}/out")
case("teacher-set-unknown-key", "teacher", *TINY, "--set", "teacher.colour=blue", "--out", "{tmp}/out")

# --- train / teacher: config files ------------------------------------------------------------

for name in ["cfg_missing", "cfg_empty", "cfg_comment", "cfg_truncated", "cfg_invalid", "cfg_list", "cfg_scalar",
             "cfg_latin1", "cfg_unknown", "cfg_section_scalar", "cfg_is_dir", "cfg_null_section"]:
    case(f"train-config-{name}", "train", "--config", f"{{{name}}}", "--out", "{tmp}/out")
for name in ["cfg_missing", "cfg_empty", "cfg_truncated", "cfg_invalid"]:
    case(f"teacher-config-{name}", "teacher", "--config", f"{{{name}}}", "--out", "{tmp}/out")
case("train-config-empty-with-preset", "train", *TINY, "--config", "{cfg_empty}", "--out", "{tmp}/out")
case("train-config-saved-with-bad-set", "train", "--config", "{cfg_saved}", "--set", "train.lr=nan", "--out", "{tmp}/out")
argparse_case("train-unknown-preset", "train", "--preset", "huge", "--out", "{tmp}/out")
argparse_case("teacher-unknown-preset", "teacher", "--preset", "huge", "--out", "{tmp}/out")
argparse_case("train-no-out", "train", *TINY)

# --- train / teacher: --out -------------------------------------------------------------------

case("train-out-is-a-file", "train", *TINY, "--out", "{afile}")
case("train-out-under-a-file", "train", *TINY, "--out", "{under_file}")
case("teacher-out-is-a-file", "teacher", *TINY, "--out", "{afile}")
case("teacher-out-under-a-file", "teacher", *TINY, "--out", "{under_file}")
case("train-resume-nothing-there", "train", *TINY, "--out", "{tmp}/nothing", "--resume")
case("train-resume-empty-folder", "train", *TINY, "--out", "{empty_dir}", "--resume")
case("train-resume-non-run-folder", "train", *TINY, "--out", "{nonrun}", "--resume")
case("teacher-resume-nothing-there", "teacher", *TINY, "--out", "{tmp}/nothing", "--resume")
case("train-resume-and-overwrite", "train", *TINY, "--out", "{run}", "--resume", "--overwrite")
case("teacher-resume-and-overwrite", "teacher", *TINY, "--out", "{teacher_run}", "--resume", "--overwrite")
case("train-out-not-empty", "train", *TINY, "--out", "{nonrun}")
case("train-out-holds-a-run", "train", *TINY, "--out", "{run}")
case("teacher-out-holds-a-run", "teacher", *TINY, "--out", "{teacher_run}")
case("train-resume-with-other-config", "train", *TINY, "--set", "train.lr=0.5", "--out", "{run_unfinished}", "--resume")
# --overwrite with bad input leaves the old run as it was
case("train-overwrite-bad-batch", "train", *TINY, "--set", "train.batch_size=0", "--out", "{run}", "--overwrite")
case("train-overwrite-nan-lr", "train", *TINY, "--set", "train.lr=nan", "--out", "{run}", "--overwrite")
case("train-overwrite-unknown-strategy", "train", *TINY, "--set", "matching.strategy=sideways", "--out", "{run}", "--overwrite")
case("train-overwrite-deeper-student", "train", *TINY, "--set", "student.layers=5", "--out", "{run}", "--overwrite")
case("train-overwrite-empty-config", "train", "--config", "{cfg_empty}", "--out", "{run}", "--overwrite")
case("train-overwrite-truncated-config", "train", "--config", "{cfg_truncated}", "--out", "{run}", "--overwrite")
case("teacher-overwrite-bad-lr", "teacher", *TINY, "--set", "teacher.train.lr=-1", "--out", "{teacher_run}", "--overwrite")

# --- train: what needs the teacher to check (layers, widths, lengths, data, device) -----------

T = ("--set", "teacher.dir={teacher_run}")  # the finished 4-layer tiny teacher: nothing to fine-tune first
for id, items in {
    "teacher-layer-out-of-range": ["matching.strategy=1:9"],
    "student-layer-out-of-range": ["matching.strategy=3:1"],
    "student-state-matched-twice": ["matching.strategy=1:1,1:2"],
    "negative-pair": ["matching.strategy=-1:2"],
    "pairs-not-readable": ["matching.strategy=1:x"],
    "explicit-without-pairs": ["matching.strategy=explicit"],
    "all-to-one-target-out-of-range": ["matching.strategy=all_to_one", "matching.target=7"],
    "student-deeper-than-teacher": ["student.layers=5"],  # the tiny teacher has 4 layers
    "copy-layers-out-of-range": ["student.copy_layers=1,5"],
    "copy-layers-wrong-count": ["student.copy_layers=1,2,2"],
    "copy-init-narrower": ["student.hidden_size=16"],
    "heads-do-not-divide-width": ["student.init=random", "student.hidden_size=7", "student.num_heads=2"],
    "max-length-above-model-limit": ["data.max_length=100000"],
    "unknown-task": ["data.task=no_such_task"],
    "missing-task-file": ["data.task={tmp}/missing.csv"],
    "device-bogus": ["device=bogus"],
    "teacher-dir-missing": ["teacher.dir={tmp}/no_teacher"],
    "teacher-dir-not-a-run": ["teacher.dir={nonrun}"],
}.items():
    sets = [arg for item in items for arg in ("--set", item)]
    case(f"train-{id}", "train", *TINY, *(T if not any(i.startswith("teacher.dir") for i in items) else ()),
         *sets, "--out", "{tmp}/out")
case("teacher-device-bogus", "teacher", *TINY, "--set", "device=bogus", "--out", "{tmp}/out")
case("teacher-unknown-model", "teacher", *TINY, "--set", "teacher.model=/nonexistent/model", "--out", "{tmp}/out")
case("teacher-max-length-above-model-limit", "teacher", *TINY, "--set", "data.max_length=100000", "--out", "{tmp}/out")
case("teacher-unknown-task", "teacher", *TINY, "--set", "data.task=no_such_task", "--out", "{tmp}/out")

# --- mapping ----------------------------------------------------------------------------------

M = ("mapping", "--teacher-layers", "12", "--student-layers", "3")
case("mapping-unknown-strategy", *M, "--strategy", "sideways")
case("mapping-explicit-without-pairs", *M, "--strategy", "explicit")
case("mapping-teacher-layer-out-of-range", *M, "--strategy", "1:13")
case("mapping-student-layer-out-of-range", *M, "--strategy", "4:4")
case("mapping-pairs-not-readable", *M, "--strategy", "1:a")
case("mapping-no-pairs", *M, "--strategy", ",")
case("mapping-student-state-twice", *M, "--strategy", "1:4,1:8")
case("mapping-rail-epoch-negative", *M, "--strategy", "rail", "--epoch", "-1")
case("mapping-target-out-of-range", *M, "--strategy", "all_to_one", "--target", "13")
case("mapping-target-negative", *M, "--strategy", "all_to_one", "--target", "-1")
case("mapping-seed-negative", *M, "--strategy", "shuffle", "--seed", "-1")
case("mapping-teacher-layers-0", "mapping", "--teacher-layers", "0", "--student-layers", "3")
case("mapping-teacher-layers-negative", "mapping", "--teacher-layers", "-12", "--student-layers", "3")
case("mapping-student-layers-0", "mapping", "--teacher-layers", "12", "--student-layers", "0")
case("mapping-student-deeper", "mapping", "--teacher-layers", "6", "--student-layers", "7")
argparse_case("mapping-teacher-layers-not-int", "mapping", "--teacher-layers", "twelve", "--student-layers", "3")
argparse_case("mapping-missing-student-layers", "mapping", "--teacher-layers", "12")
argparse_case("mapping-format-bogus", *M, "--format", "xml")
argparse_case("mapping-shuffle-bogus", *M, "--strategy", "shuffle", "--shuffle", "sometimes")

# --- angles and geometry ----------------------------------------------------------------------

for cmd in ("angles", "geometry"):
    case(f"{cmd}-run-missing", cmd, "--run", "{tmp}/missing")
    case(f"{cmd}-run-not-a-run", cmd, "--run", "{nonrun}")
    case(f"{cmd}-run-empty-folder", cmd, "--run", "{empty_dir}")
    case(f"{cmd}-run-is-a-file", cmd, "--run", "{afile}")
    case(f"{cmd}-run-is-a-teacher", cmd, "--run", "{teacher_run}")
    case(f"{cmd}-checkpoint-bogus", cmd, "--run", "{run}", "--checkpoint", "bogus")
    case(f"{cmd}-space-bogus", cmd, "--run", "{run}", "--space", "bogus")
    case(f"{cmd}-split-bogus", cmd, "--run", "{run}", "--split", "bogus")
    case(f"{cmd}-device-bogus", cmd, "--run", "{run}", "--device", "bogus")
    case(f"{cmd}-max-length-0", cmd, "--run", "{run}", "--max-length", "0")
    case(f"{cmd}-max-length-above-model-limit", cmd, "--run", "{run}", "--max-length", "100000")
    case(f"{cmd}-bins-0", cmd, "--run", "{run}", "--bins", "0")
    case(f"{cmd}-batch-size-0", cmd, "--run", "{run}", "--batch-size", "0")
    case(f"{cmd}-max-examples-0", cmd, "--run", "{run}", "--max-examples", "0")
    case(f"{cmd}-texts-missing", cmd, "--run", "{run}", "--texts", "{tmp}/missing.txt")
    case(f"{cmd}-texts-empty", cmd, "--run", "{run}", "--texts", "{texts_empty}")
    case(f"{cmd}-texts-not-utf8", cmd, "--run", "{run}", "--texts", "{texts_latin1}")
    case(f"{cmd}-out-is-a-file", cmd, "--run", "{run}", "--out", "{afile}")
    case(f"{cmd}-out-under-a-file", cmd, "--run", "{run}", "--out", "{under_file}")
    case(f"{cmd}-runs-empty-folder", cmd, "--runs", "{empty_dir}")
    case(f"{cmd}-runs-missing", cmd, "--runs", "{tmp}/missing")
    argparse_case(f"{cmd}-no-run", cmd)
    argparse_case(f"{cmd}-run-and-runs", cmd, "--run", "{run}", "--runs", "{run}")
    argparse_case(f"{cmd}-bins-not-int", cmd, "--run", "{run}", "--bins", "many")
case("angles-max-length-negative", "angles", "--run", "{run}", "--max-length", "-1")
case("angles-max-length-1", "angles", "--run", "{run}", "--max-length", "1")
case("angles-texts-max-length-above-model-limit", "angles", "--run", "{run}", "--texts", "{texts_ok}", "--max-length", "100000")
case("angles-bins-negative", "angles", "--run", "{run}", "--bins", "-5")
case("angles-batch-size-negative", "angles", "--run", "{run}", "--batch-size", "-1")
case("angles-max-examples-negative", "angles", "--run", "{run}", "--max-examples", "-3")
case("angles-texts-blank-lines-only", "angles", "--run", "{run}", "--texts", "{texts_blank}")
case("angles-texts-is-a-folder", "angles", "--run", "{run}", "--texts", "{empty_dir}")
case("angles-checkpoint-both-with-run", "angles", "--run", "{run}", "--checkpoint", "both")
case("angles-run-without-teacher", "angles", "--run", "{run_no_teacher}")
case("angles-run-unfinished", "angles", "--run", "{run_unfinished}")
case("angles-run-config-empty", "angles", "--run", "{run_config_empty}")
case("angles-run-config-truncated", "angles", "--run", "{run_config_truncated}")
case("angles-runs-not-a-run", "angles", "--runs", "{nonrun}")
case("angles-runs-checkpoint-bogus", "angles", "--runs", "{run}", "--checkpoint", "bogus")
case("angles-runs-out-is-a-file", "angles", "--runs", "{run}", "--out", "{afile}")

# --- sweep ------------------------------------------------------------------------------------

for name in ["grid_missing", "grid_empty", "grid_comment", "grid_invalid", "grid_list", "grid_latin1", "grid_is_dir",
             "grid_unknown_key", "grid_bad_config_key", "grid_bad_value", "grid_bad_base_value", "grid_empty_axis",
             "grid_axis_not_list", "grid_bad_preset", "grid_bad_strategy"]:
    case(f"sweep-{name.replace('_', '-')}", "sweep", f"{{{name}}}", "--out", "{tmp}/sweeps")
case("sweep-dry-run-bad-value", "sweep", "{grid_bad_value}", "--out", "{tmp}/sweeps", "--dry-run")
case("sweep-only-unknown-axis", "sweep", "{grid_ok}", "--out", "{tmp}/sweeps", "--only", "student.layers=1")
case("sweep-only-unknown-value", "sweep", "{grid_ok}", "--out", "{tmp}/sweeps", "--only", "seed=7")
case("sweep-only-no-equals", "sweep", "{grid_ok}", "--out", "{tmp}/sweeps", "--only", "seed")
case("sweep-only-bad-yaml", "sweep", "{grid_ok}", "--out", "{tmp}/sweeps", "--only", "seed=[0")
case("sweep-jobs-0", "sweep", "{grid_ok}", "--out", "{tmp}/sweeps", "--jobs", "0")
case("sweep-jobs-negative", "sweep", "{grid_ok}", "--out", "{tmp}/sweeps", "--jobs", "-1")
case("sweep-devices-with-jobs", "sweep", "{grid_ok}", "--out", "{tmp}/sweeps", "--devices", "0,1", "--jobs", "2")
case("sweep-devices-empty-item", "sweep", "{grid_ok}", "--out", "{tmp}/sweeps", "--devices", "0,,1")
case("sweep-out-is-a-file", "sweep", "{grid_ok}", "--out", "{afile}")
case("sweep-out-under-a-file", "sweep", "{grid_ok}", "--out", "{under_file}")
argparse_case("sweep-jobs-not-int", "sweep", "{grid_ok}", "--jobs", "two")
argparse_case("sweep-launcher-bogus", "sweep", "{grid_ok}", "--launcher", "cloud")
argparse_case("sweep-no-grid", "sweep")

# --- report and figures -----------------------------------------------------------------------

for cmd in ("report", "figures"):
    case(f"{cmd}-folder-missing", cmd, "{tmp}/missing")
    case(f"{cmd}-folder-empty", cmd, "{empty_dir}")
    case(f"{cmd}-folder-is-a-file", cmd, "{afile}")
    case(f"{cmd}-no-finished-runs", cmd, "{nonrun}")
    case(f"{cmd}-only-unfinished-run", cmd, "{sweep_unfinished}")
    case(f"{cmd}-damaged-results", cmd, "{sweep_damaged}")
    case(f"{cmd}-out-is-a-file", cmd, "{sweep_ok}", "--out", "{afile}")
    case(f"{cmd}-out-under-a-file", cmd, "{sweep_ok}", "--out", "{under_file}")
    argparse_case(f"{cmd}-no-folder", cmd)

# --- verdict ----------------------------------------------------------------------------------

V = ("verdict", "--out", "{tmp}/verdict")
case("verdict-folder-missing", "verdict", "{tmp}/missing")
case("verdict-folder-empty", "verdict", "{empty_dir}")
case("verdict-folder-is-a-file", "verdict", "{afile}")
case("verdict-no-acute-summary", "verdict", "{sweep_ok}")
case("verdict-nothing-given", "verdict")
case("verdict-results-without-acute", *V, "--results", "{csv_results}")
case("verdict-results-without-out", "verdict", "--results", "{csv_results}", "--acute", "{csv_acute}")
case("verdict-folder-and-results", "verdict", "{sweep_ok}", "--results", "{csv_results}", "--acute", "{csv_acute}",
     "--out", "{tmp}/verdict")
for which in ("results", "acute"):
    other = "acute" if which == "results" else "results"
    for bad in ("missing", "empty", "garbage", "header_only", "wrong_columns", "latin1", "is_dir"):
        case(f"verdict-{which}-{bad.replace('_', '-')}", *V, f"--{which}", f"{{csv_{bad}}}", f"--{other}", f"{{csv_{other}}}")
case("verdict-metric-bogus", *V, "--results", "{csv_results}", "--acute", "{csv_acute}", "--metric", "bogus")
case("verdict-sweep-metric-bogus", "verdict", "{sweep_with_acute}", "--metric", "bogus")
case("verdict-sweep-acute-empty", "verdict", "{sweep_acute_empty}")
case("verdict-out-is-a-file", "verdict", "--results", "{csv_results}", "--acute", "{csv_acute}", "--out", "{afile}")
case("verdict-out-under-a-file", "verdict", "--results", "{csv_results}", "--acute", "{csv_acute}", "--out", "{under_file}")

# --- reproduce --------------------------------------------------------------------------------

case("reproduce-jobs-0", "reproduce", "--out", "{tmp}/repro", "--jobs", "0")
case("reproduce-jobs-negative", "reproduce", "--out", "{tmp}/repro", "--jobs", "-1")
case("reproduce-out-is-a-file", "reproduce", "--out", "{afile}")
case("reproduce-out-under-a-file", "reproduce", "--out", "{under_file}")
case("reproduce-devices-with-jobs", "reproduce", "--out", "{tmp}/repro", "--devices", "0,1", "--jobs", "2")
argparse_case("reproduce-jobs-not-int", "reproduce", "--jobs", "many")

# --- the command line itself ------------------------------------------------------------------

argparse_case("no-command")
argparse_case("unknown-command", "distil", "--out", "{tmp}/out")


# --------------------------------------------------------------------------------------------
# Materials: what a case's "{name}" fields stand for, built on first use in the case's folder

GRID_OK = "name: g\npreset: tiny\ngrid:\n  seed: [0, 1]\n"
TEXT_FILES = {
    "cfg_empty": "",
    "cfg_comment": "# nothing but a comment\n\n",
    "cfg_invalid": "student: {layers: [\n",
    "cfg_list": "- 1\n- 2\n",
    "cfg_scalar": "just some words\n",
    "cfg_unknown": "student: {layerz: 2}\n",
    "cfg_section_scalar": "student: 3\n",
    "cfg_null_section": "data:\nteacher:\nstudent:\n",
    "texts_empty": "",
    "texts_blank": "\n   \n\t\n",
    "texts_ok": "a film\nanother film\n",
    "grid_ok": GRID_OK,
    "grid_empty": "",
    "grid_comment": "# a grid with nothing in it\n",
    "grid_invalid": "grid: {seed: [0, 1\n",
    "grid_list": "- seed\n- 0\n",
    "grid_unknown_key": GRID_OK + "colour: blue\n",
    "grid_bad_config_key": "name: g\npreset: tiny\ngrid:\n  student.depth: [2]\n",
    "grid_bad_value": "name: g\npreset: tiny\ngrid:\n  train.batch_size: [32, 0]\n",
    "grid_bad_base_value": "name: g\npreset: tiny\nbase:\n  train: {lr: .nan}\ngrid:\n  seed: [0]\n",
    "grid_empty_axis": "name: g\npreset: tiny\ngrid:\n  seed: []\n",
    "grid_axis_not_list": "name: g\npreset: tiny\ngrid:\n  seed: 0\n",
    "grid_bad_preset": "name: g\npreset: huge\ngrid:\n  seed: [0]\n",
    "grid_bad_strategy": "name: g\npreset: tiny\ngrid:\n  matching.strategy: [forward, sideways]\n",
    "csv_empty": "",
    "csv_header_only": "run,task,init,strategy,seed,test_accuracy\n",
    "csv_wrong_columns": "a,b,c\n1,2,3\n4,5,6\n",
}
BYTE_FILES = {
    "cfg_latin1": b"data: {task: caf\xe9}\n",
    "texts_latin1": b"un caf\xe9 tr\xe8s bon\nune cr\xe8me br\xfbl\xe9e\n",
    "grid_latin1": b"name: caf\xe9\ngrid:\n  seed: [0]\n",
    "csv_garbage": bytes(range(256)) * 8,
    "csv_latin1": b"run,task\ncaf\xe9,rotten_tomatoes\n",
}


class Materials(dict):
    """``"{run}".format_map(materials)``: builds the material in the case's folder on first use."""

    def __init__(self, root: Path, golden: Path):
        super().__init__(tmp=str(root))
        self.root, self.golden = root, golden

    def __missing__(self, key: str) -> str:
        path = self.build(key)
        self[key] = str(path)
        return str(path)

    def _copy_run(self, name: str) -> Path:
        target = self.root / name
        shutil.copytree(self.golden, target)
        return target

    def _sweep(self, name: str) -> Path:
        """A sweep folder holding one copy of the tiny run under runs/."""
        folder = self.root / name
        (folder / "runs").mkdir(parents=True)
        shutil.copytree(self.golden, folder / "runs" / "tiny_forward_seed0")
        return folder

    def build(self, key: str) -> Path:
        root = self.root
        if key in TEXT_FILES:
            path = root / f"{key}.{'txt' if key.startswith('texts') else 'csv' if key.startswith('csv') else 'yaml'}"
            path.write_text(TEXT_FILES[key])
            return path
        if key in BYTE_FILES:
            path = root / f"{key}.{'txt' if key.startswith('texts') else 'csv' if key.startswith('csv') else 'yaml'}"
            path.write_bytes(BYTE_FILES[key])
            return path
        if key in ("cfg_missing", "grid_missing", "csv_missing"):
            return root / f"{key}.{'csv' if key.startswith('csv') else 'yaml'}"
        if key in ("cfg_is_dir", "grid_is_dir", "csv_is_dir"):
            path = root / key
            path.mkdir()
            return path
        if key == "afile":
            path = root / "afile"
            path.write_text("a regular file, not a folder\n")
            return path
        if key == "under_file":
            return Path(self["afile"]) / "sub"
        if key == "empty_dir":
            path = root / "empty"
            path.mkdir()
            return path
        if key == "nonrun":
            path = root / "notarun"
            path.mkdir()
            (path / "notes.txt").write_text("my notes, not a run\n")
            return path
        if key == "run":
            return self._copy_run("run")
        if key == "teacher_run":
            return Path(self["run"]) / "teacher"
        if key == "cfg_saved":
            path = root / "saved.yaml"
            shutil.copy(self.golden / "config.yaml", path)
            return path
        if key == "cfg_truncated":  # a saved config cut after its teacher section
            text = (self.golden / "config.yaml").read_text()
            path = root / "truncated.yaml"
            path.write_text(text[: text.index("\nstudent:") + 1])
            return path
        if key == "run_no_teacher":
            run = self._copy_run("run_no_teacher")
            shutil.rmtree(run / "teacher")
            config = run / "config.yaml"
            config.write_text("\n".join(
                f"  dir: {root / 'gone'}" if line.startswith("  dir:") else line for line in config.read_text().splitlines()
            ) + "\n")
            return run
        if key == "run_unfinished":
            run = self._copy_run("run_unfinished")
            (run / "results.json").unlink()
            shutil.rmtree(run / "checkpoints" / "best")
            return run
        if key == "run_config_empty":
            run = self._copy_run("run_config_empty")
            (run / "config.yaml").write_text("")
            return run
        if key == "run_config_truncated":
            run = self._copy_run("run_config_truncated")
            text = (run / "config.yaml").read_text()
            (run / "config.yaml").write_text(text[: text.index("\nstudent:") + 1])
            return run
        if key == "sweep_ok":
            return self._sweep("sweep_ok")
        if key == "sweep_unfinished":
            folder = self._sweep("sweep_unfinished")
            (folder / "runs" / "tiny_forward_seed0" / "results.json").unlink()
            return folder
        if key == "sweep_damaged":
            folder = self._sweep("sweep_damaged")
            (folder / "runs" / "tiny_forward_seed0" / "results.json").write_text('{"kind": "student", "dev": {"acc')
            return folder
        if key in ("sweep_with_acute", "sweep_acute_empty"):  # after `layergeo figures`, as verdict wants it
            folder = self._sweep(key)
            (folder / "figures").mkdir()
            table = "" if key == "sweep_acute_empty" else (
                "run,checkpoint,frac_acute\ntiny_forward_seed0,init,0.9\ntiny_forward_seed0,best,0.8\n")
            (folder / "figures" / "acute_summary.csv").write_text(table)
            return folder
        if key == "csv_results":
            path = root / "results_all.csv"
            shutil.copy(COMMITTED_RESULTS, path)
            return path
        if key == "csv_acute":
            path = root / "acute_summary.csv"
            shutil.copy(COMMITTED_ACUTE, path)
            return path
        raise KeyError(f"no material {key!r}")


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under ``roots``: folders by name, files by size and modification time."""
    seen: dict[str, tuple] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames:
                seen[os.path.join(dirpath, name)] = ("dir",)
            for name in filenames:
                path = os.path.join(dirpath, name)
                info = os.lstat(path)
                seen[path] = ("file", info.st_size, info.st_mtime_ns)
    return seen


def describe_changes(before: dict[str, tuple], after: dict[str, tuple]) -> str:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    parts = [f"{label}: {paths[:5]}{' ...' if len(paths) > 5 else ''}"
             for label, paths in (("added", added), ("removed", removed), ("changed", changed)) if paths]
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    """One tiny finished student run (its teacher inside, under teacher/), copied by the cases that need one."""
    out = tmp_path_factory.mktemp("golden") / "run"
    argv = ["train", *TINY, "--set", "data.max_train=64", "--set", "data.max_eval=32", "--out", str(out)]
    assert main(argv) == 0, "the tiny run every case copies could not be built"
    return out


class _SubprocessTrap:
    """The subprocess module, but ``run`` (how a sweep starts a run in its own process) is a trap."""

    def __init__(self, run):
        self.run = run

    def __getattr__(self, name):
        return getattr(subprocess, name)


@pytest.fixture
def traps(monkeypatch):
    """Replace the real work by ReachedWork, so an input that is not refused fails at once."""

    def trap(what):
        def reached(*args, **kwargs):
            raise ReachedWork(f"reached {what}: the input was not refused before the work began")

        return reached

    monkeypatch.setattr(distil_module, "fit", trap("the training loop (loop.fit)"))
    monkeypatch.setattr(teacher_module, "fit", trap("the training loop (loop.fit)"))
    monkeypatch.setattr(analyse_module, "hidden_states", trap("the hidden-state pass (analyse.hidden_states)"))
    # only the sweep's own view of subprocess: the rest (e.g. git in env.json) keeps the real one
    monkeypatch.setattr(sweep_module, "subprocess", _SubprocessTrap(trap("a sweep subprocess (subprocess.run)")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("CI", "true")


# --------------------------------------------------------------------------------------------
# The test


def test_catalogue_is_large_and_covers_every_subcommand():
    assert len(CASES) >= 144
    commands = {c.argv[0] for c in CASES if c.argv}
    assert {"teacher", "train", "mapping", "angles", "geometry", "sweep", "report", "figures", "verdict",
            "reproduce"} <= commands


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_refused_in_one_line_and_changes_nothing(case, golden, traps, tmp_path, monkeypatch, capfd):
    root = tmp_path / "case"
    root.mkdir()
    materials = Materials(root, golden)
    argv = [arg.format_map(materials) for arg in case.argv]
    monkeypatch.chdir(root)
    before = snapshot(root, golden)
    capfd.readouterr()
    code, raised = None, None
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    except BaseException as exc:  # ReachedWork, or any exception the CLI let through
        raised = "".join(traceback.format_exception(exc)).rstrip().splitlines()
    out, err = capfd.readouterr()
    after = snapshot(root, golden)
    lines = [line for line in err.splitlines() if line.strip()]

    problems = []
    if raised is not None:
        where = [line.strip() for line in raised if "/layergeo/" in line and line.strip().startswith("File")]
        problems.append(f"raised instead of exit 2: {raised[-1]}" + (f" (last in layergeo: {where[-1]})" if where else ""))
    elif "ReachedWork" in out + err:
        problems.append("the real work began (a trap was reached) before the input was refused")
    elif code != 2:
        problems.append(f"exit {code}, not 2")
    if "Traceback" in out + err:
        problems.append("a traceback was printed")
    if case.argparse:
        if not lines or "error:" not in lines[-1]:
            problems.append("argparse did not end with an error line")
    elif raised is None and len(lines) != 1:
        problems.append(f"stderr has {len(lines)} non-empty lines, not 1")
    changes = describe_changes(before, after)
    if changes:
        problems.append(f"files changed: {changes}")
    if problems:
        shown = (raised[-6:] if raised else []) + ["--- stderr:"] + lines[:6] + ["--- stdout:"] + out.splitlines()[:3]
        pytest.fail(f"{' '.join(argv)}\n" + "\n".join(f"  * {p}" for p in problems) + "\n" + "\n".join(shown), pytrace=False)


def test_a_real_subprocess_prints_exactly_one_line(tmp_path):
    """The same as the in-process cases, through ``python -m layergeo.cli`` (real stderr, real exit code)."""
    done = subprocess.run([sys.executable, "-m", "layergeo.cli", "train", *TINY, "--set", "train.batch_size=-4",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["layergeo train: error: config key 'train.batch_size' got -4, which is out of range: "
                     "it must be an integer >= 1"]
    assert list(tmp_path.iterdir()) == []
