"""What the geometry trace costs a run (``layergeo.trace``): its own time against the rest of the run's.

Trains copied 3-layer students of an embedded MiniLM teacher run with the default trace (16 dev examples,
step 0 + 10 probes; with ``--gradients`` also with ``trace.gradients``) at the given budgets (1,000 training
examples, 400 dev), and reads each run's env.json: ``trace.seconds`` (the probe
set's teacher states once, then every probe) against ``wall_time_s`` minus it (training, evaluations,
checkpoints). Both are measured in the same process, so the ratio holds on a loaded machine too.

    python benchmarks/bench_trace.py --teacher runs/classification/teachers/rotten_tomatoes-minilm \\
        --steps 32 320 --gradients --out benchmarks/results-trace-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from layergeo.cli import main as layergeo
from layergeo.config import TraceConfig
from layergeo.trace import probe_steps

BUDGETS = (32, 320)


def traced_run(teacher: Path, steps: int, gradients: bool, out: Path) -> dict:
    args = ["train", "--out", str(out), "--set", f"teacher.dir={teacher}", "--set", "data.max_train=1000",
            "--set", "data.max_eval=400", "--set", f"train.max_steps={steps}", "--set", f"trace.gradients={str(gradients).lower()}"]
    if layergeo(args) != 0:
        raise SystemExit(f"the run of {steps} steps failed")
    env = json.loads((out / "env.json").read_text())
    trace, wall = env["trace"]["seconds"], env["wall_time_s"]
    return {"steps": steps, "gradients": gradients, "trace_s": trace, "rest_of_run_s": round(wall - trace, 1), "ratio": round(trace / (wall - trace), 4),
            "probes": len(probe_steps(TraceConfig(), steps)), "examples": env["trace"]["examples"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True, help="a finished MiniLM teacher run (layergeo teacher)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--gradients", action="store_true", help="also measure runs with trace.gradients=true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [traced_run(args.teacher.resolve(), steps, gradients, Path(tmp) / f"steps{steps}-{gradients}")
                for steps in args.steps for gradients in ((False, True) if args.gradients else (False,))]
    result = {"device": "cpu", "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "runs": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
