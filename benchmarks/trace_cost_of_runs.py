"""What the geometry trace cost the finished runs of real sweeps: ``trace.seconds`` against the rest of each run.

Every student run times its own trace in ``env.json`` (``trace.seconds``: the probe set's teacher states once,
then every probe) beside its whole wall time, in the same process, so the ratio holds on a loaded machine too.
This reads those two numbers from every finished student run under the given sweep folders and summarises the
ratio trace / (wall time - trace) per sweep, family, init and gradient setting (min, median, max over runs).

    python benchmarks/trace_cost_of_runs.py /work/sweeps/verdict-full /work/sweeps/llm /work/sweeps/explain \\
        --out benchmarks/results-trace-runs-cpu.json

``--update`` keeps the rows of the sweeps already in ``--out`` that are not given again (their run folders may be
gone: sweeps live outside the repository and do not outlive a machine).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from layergeo.report import student_runs
from layergeo.runs import RunDir, read_json


def run_costs(sweep: Path) -> pd.DataFrame:
    """One row per finished student run of ``sweep``: its steps, settings, trace seconds and wall time."""
    rows = []
    for run, results in student_runs(sweep).items():
        run_dir = RunDir(run)
        env, config = read_json(run_dir.env_file), run_dir.config()
        if not env.get("trace", {}).get("used"):
            continue
        trace, wall = env["trace"]["seconds"], env["wall_time_s"]
        rows.append({"sweep": sweep.name, "run": run.name, "family": config.teacher.family, "init": results["init"],
                     "gradients": config.trace.gradients, "steps": results["steps"],
                     "sittings": len(env.get("sittings", [])), "threads": env["threads"], "trace_s": trace,
                     "rest_of_run_s": round(wall - trace, 1), "ratio": trace / (wall - trace)})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", type=Path, nargs="+", help="sweep folders (OUT/<grid name>)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--update", action="store_true", help="keep --out's rows of the sweeps not given")
    args = parser.parse_args()
    runs = pd.concat([run_costs(sweep) for sweep in args.sweeps], ignore_index=True)
    if args.update and args.out.is_file():
        kept = pd.DataFrame(json.loads(args.out.read_text())["runs"])
        runs = pd.concat([kept[~kept.sweep.isin(runs.sweep)], runs], ignore_index=True)
    groups = runs.groupby(["sweep", "family", "init", "gradients"])
    summary = groups.agg(runs=("run", "size"), steps_min=("steps", "min"), steps_max=("steps", "max"),
                         ratio_min=("ratio", "min"), ratio_median=("ratio", "median"), ratio_max=("ratio", "max"),
                         trace_s_median=("trace_s", "median"), rest_of_run_s_median=("rest_of_run_s", "median")).reset_index()
    result = {"note": "trace.seconds / (wall_time_s - trace.seconds) of each finished student run, from its env.json",
              "summary": summary.round(4).to_dict("records"), "runs": runs.round(4).to_dict("records")}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(summary.round(4).to_string(index=False))


if __name__ == "__main__":
    main()
