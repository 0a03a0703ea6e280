"""Speed and memory of distillation and of the angle analysis against their floors.

Times, in one process on the same real batches (Rotten Tomatoes, max length 64, batch 32),
the median over ``--steps`` steps after ``--warmup`` warm-up steps:

  student step       student forward + CE + backward + AdamW (the floor of any distillation step)
  distil (live)      the full distillation step with a live teacher forward
  distil (cache)     the same step reading the teacher from the teacher cache
  teacher forward    the teacher alone, inference mode, all hidden states

and the angle analysis per 10k tokens (streaming accumulator vs a naive per-pair broadcast
like the authors' analysis), each with its peak RSS growth measured in a fresh subprocess
at two token counts. Timing: time.perf_counter (with torch.cuda.synchronize on GPU);
memory: peak RSS (VmHWM on Linux; CPU) or torch.cuda.max_memory_allocated (GPU).

    python benchmarks/bench.py --out benchmarks/results-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ANGLE_BATCH_TOKENS = 2048


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def batch_cycle(batches: list[dict]):
    """A function returning the next batch, round and round."""
    cycle = {"i": 0}

    def next_batch():
        cycle["i"] = (cycle["i"] + 1) % len(batches)
        return batches[cycle["i"]]

    return next_batch


def training_step(optimizer, loss_of_batch, next_batch):
    """One timed unit: loss of the next batch, backward, optimiser step."""

    def step():
        loss = loss_of_batch(next_batch())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def training_benchmarks(steps: int, warmup: int, device: torch.device) -> dict:
    from layergeo import data
    from layergeo.config import RunConfig
    from layergeo.distil import distillation_losses
    from layergeo.families import get_family
    from layergeo.models import build_student, load_pretrained
    from layergeo.strategies import build_mapping, forward_targets

    model_inputs = get_family("encoder").inputs

    config = RunConfig()
    teacher, tokenizer = load_pretrained("minilm", 2)
    teacher.to(device).eval()
    task = data.load_task("rotten_tomatoes", max_examples={"train": 32 * (steps + warmup)}, seed=0)
    encoded = data.encode(task.splits["train"], tokenizer, task.text_columns, 64)
    batches = [{k: v if k == "index" else v.to(device) for k, v in b.items()} for b in data.make_loader(encoded, tokenizer, 32, shuffle=False, seed=0)]
    mapper = build_mapping(config.matching, {"encoder": (6, 3)})
    student = build_student(teacher, config.student, mapper.student_states(), forward_targets(6, 3)).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    next_batch = batch_cycle(batches)
    student_step = training_step(
        optimizer, lambda batch: F.cross_entropy(student(**model_inputs(batch)).logits, batch["labels"]), next_batch)
    live_losses = distillation_losses(student, teacher, mapper, config)

    def distil_step(step_losses):
        return training_step(optimizer, lambda batch: step_losses(batch, 0, 0)["loss"], next_batch)

    @torch.inference_mode()
    def teacher_forward():
        teacher(**model_inputs(next_batch()), output_hidden_states=True)

    tokens_per_batch = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
    result = {
        "tokens_per_batch": tokens_per_batch,
        "student_step_s": _median_time(student_step, steps, warmup, device),
        "distil_live_step_s": _median_time(distil_step(live_losses), steps, warmup, device),
        "teacher_forward_s": _median_time(teacher_forward, steps, warmup, device),
    }
    with tempfile.TemporaryDirectory() as root:
        cached = _cached_losses(student, teacher, mapper, config, encoded, tokenizer, task, Path(root))
        result["distil_cache_step_s"] = _median_time(distil_step(cached), steps, warmup, device)

    @torch.inference_mode()
    def both_forwards():
        batch = model_inputs(next_batch())
        teacher(**batch, output_hidden_states=True)
        student(**batch)

    result["forward_states_s"] = _median_time(both_forwards, steps, warmup, device)
    return result


def _cached_losses(student, teacher, mapper, config, encoded, tokenizer, task, root: Path):
    """The distillation step reading the teacher from a float16 teacher cache built in ``root``."""
    from layergeo.cache import TeacherCache
    from layergeo.models import embedded_teacher_path
    from layergeo.distil import distillation_losses

    cache = TeacherCache.open_or_build(
        teacher, tokenizer, encoded, checkpoint=Path(embedded_teacher_path()), task=task.name, split="train",
        max_length=64, layers=mapper.teacher_states()["encoder"], dtype="float16", root=root,
    )
    return distillation_losses(student, teacher, mapper, config, cache=cache)


def peak_rss_kib() -> int:
    """This process's peak resident memory in KiB.

    Linux: VmHWM of /proc/self/status, which starts afresh at exec. ``ru_maxrss`` does not: a
    child inherits its parent's peak across fork and exec, so a worker started by a process that
    held the models would report no growth at all. Elsewhere: ``ru_maxrss``.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def angle_worker(method: str, n_tokens: int) -> dict:
    """Run one angle analysis over ``n_tokens`` synthetic MiniLM-shaped states; report time and peak RSS growth."""
    from layergeo.geometry import AngleAccumulator, update_angles

    generator = torch.Generator().manual_seed(0)
    n_teacher, n_student, width = 7, 4, 384
    baseline = peak_rss_kib()
    accumulator = AngleAccumulator(n_student, n_teacher)
    pooled: list[list[float]] = [[] for _ in range(n_student)]
    elapsed, done = 0.0, 0
    while done < n_tokens:
        n = min(ANGLE_BATCH_TOKENS, n_tokens - done)
        teacher = torch.randn(n, n_teacher, width, generator=generator)
        student = torch.randn(n, n_student, width, generator=generator)
        start = time.perf_counter()
        if method == "streaming":  # exactly what layergeo angles runs per batch
            update_angles(accumulator, teacher, student, list(range(n_student)), [None] * n_student)
        else:  # the authors' style: one broadcast per pair, every cosine kept in a Python list
            for l in range(n_student):
                for i in range(n_teacher):
                    for k in range(i + 1, n_teacher):
                        u, v = teacher[:, i] - student[:, l], teacher[:, k] - student[:, l]
                        pooled[l] += (torch.sum(u * v, -1) / (u.norm(dim=-1) * v.norm(dim=-1) + 1e-6)).tolist()
        elapsed += time.perf_counter() - start
        done += n
    if method == "streaming":
        accumulator.to_frame()
    peak_growth_kib = peak_rss_kib() - baseline
    return {"method": method, "n_tokens": n_tokens, "seconds": elapsed, "seconds_per_10k_tokens": elapsed * 1e4 / n_tokens,
            "peak_rss_growth_mib": peak_growth_kib / 1024}


def angle_benchmarks(token_counts: list[int]) -> list[dict]:
    """Each (method, token count) in a fresh worker, twice: as a user runs it (time, peak RSS), and
    with glibc's mmap threshold fixed at 1 MiB (peak RSS only). glibc raises that threshold after
    freeing a large block, so later per-batch temporaries come from the heap and fragment it: the
    high-water mark then drifts with the number of batches although nothing is kept. The second
    measurement shows what the algorithm itself holds."""
    fixed = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    rows = []
    for method in ("streaming", "naive"):
        for n_tokens in token_counts:
            command = [sys.executable, __file__, "--angle-worker", method, str(n_tokens)]
            row = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            again = json.loads(subprocess.run(command, capture_output=True, text=True, check=True, env=fixed).stdout.strip().splitlines()[-1])
            row["peak_rss_growth_mib_fixed_mmap_threshold"] = again["peak_rss_growth_mib"]
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tokens", type=int, nargs=2, default=[20_000, 200_000], help="two token counts for the angle analysis")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results.json"))
    parser.add_argument("--angle-worker", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.angle_worker:
        print(json.dumps(angle_worker(args.angle_worker[0], int(args.angle_worker[1]))))
        return
    import transformers

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    train = training_benchmarks(args.steps, args.warmup, device)
    angles = angle_benchmarks(args.tokens)
    streaming = {r["n_tokens"]: r for r in angles if r["method"] == "streaming"}
    naive = {r["n_tokens"]: r for r in angles if r["method"] == "naive"}
    small, large = args.tokens
    forward_per_10k = train["forward_states_s"] * 1e4 / train["tokens_per_batch"]
    ratios = {
        "distil_live / (student + teacher forward)": train["distil_live_step_s"] / (train["student_step_s"] + train["teacher_forward_s"]),
        "distil_cache / student": train["distil_cache_step_s"] / train["student_step_s"],
        "angles per 10k tokens / forwards producing them": streaming[large]["seconds_per_10k_tokens"] / forward_per_10k,
        "streaming peak, 10x tokens / 1x": streaming[large]["peak_rss_growth_mib"] / streaming[small]["peak_rss_growth_mib"],
        "streaming peak, 10x / 1x, fixed mmap threshold": streaming[large]["peak_rss_growth_mib_fixed_mmap_threshold"]
        / streaming[small]["peak_rss_growth_mib_fixed_mmap_threshold"],
        "naive peak, 10x tokens / 1x": naive[large]["peak_rss_growth_mib"] / naive[small]["peak_rss_growth_mib"],
    }
    record = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "command": " ".join(sys.argv),
        "training": train,
        "angles": angles,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False) as handle:
        json.dump(record, handle, indent=2)
    Path(handle.name).replace(args.out)
    print(f"device {record['machine']['device']}, {train['tokens_per_batch']:.0f} real tokens per batch of 32")
    for key in ("student_step_s", "distil_live_step_s", "distil_cache_step_s", "teacher_forward_s", "forward_states_s"):
        if key in train:
            print(f"  {key:<22} {train[key] * 1000:8.1f} ms")
    for row in angles:
        print(f"  angles {row['method']:<9} {row['n_tokens']:>7} tokens: {row['seconds_per_10k_tokens'] * 1000:7.1f} ms / 10k tokens, "
              f"peak RSS +{row['peak_rss_growth_mib']:.1f} MiB "
              f"(+{row['peak_rss_growth_mib_fixed_mmap_threshold']:.1f} MiB with a fixed mmap threshold)")
    for name, value in ratios.items():
        print(f"  {name:<48} {value:8.3f}")
    print(f"raw numbers in {args.out}")


if __name__ == "__main__":
    main()
