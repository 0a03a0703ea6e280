"""Cost of decoder-only distillation and geometry, and what a top-k teacher store would lose, on a real run.

Given a finished causal run (e.g. ``layergeo train --preset causal``: SmolLM2-135M teacher, 30
layers, and a 10-layer LoRA student), in one process on the same real batches of its train split:

  student step       the LoRA student's forward + completion CE + backward + AdamW (the floor)
  distil (live)      the full step: live teacher forward, CE + KL + hidden matching of the run's strategy
  teacher forward    the 30-layer teacher alone, inference mode, all hidden states

(median over ``--steps`` steps after ``--warmup``); then the angle analysis against the forward
passes that produce its states, on ``--examples`` dev examples at every non-padding position
(``loss.positions=all``: 31 teacher states x 11 student states, hundreds of teacher pairs), the
same per-batch update ``layergeo angles`` runs (:class:`layergeo.analyse.RunGeometry`); and, for a
store of the teacher's top-k log-probabilities in place of full logits, the memory per 1,000
tokens and the relative error of the top-k + tail-bucket KL
(:func:`layergeo.losses.top_k_kl_to_teacher`) against the exact KL between the run's teacher and its
untrained (copied) student, at the completion positions and at all positions.

    python benchmarks/bench_causal.py --run RUN --out benchmarks/results-causal-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import _median_time, batch_cycle, training_step  # noqa: E402

TOP_K = (8, 32, 128, 512, 2048)


def step_benchmarks(run: Path, steps: int, warmup: int, device: torch.device) -> dict:
    from layergeo import data
    from layergeo.distil import copy_plan, distillation_losses, stack_depths
    from layergeo.models import Student
    from layergeo.runs import RunDir
    from layergeo.strategies import build_mapping
    from layergeo.teacher import family_of

    config = RunDir(run).config()
    family = family_of(config)
    teacher, tokenizer = family.load_checkpoint(RunDir(config.teacher.dir).checkpoint("best"))
    teacher.to(device).eval()
    task = family.load_task(config)
    encoded = family.encode(config, task, "train", tokenizer, teacher.config)
    loader = data.make_loader(encoded, tokenizer, config.train.batch_size, shuffle=False, seed=0,
                              collate_fn=family.collator(tokenizer, teacher))
    batches = [{k: v.to(device) for k, v in b.items()} for _, b in zip(range(steps + warmup), loader)]
    depths = stack_depths(family, teacher.config, config)
    mapping = build_mapping(config.matching, depths, config.seed)
    torch.manual_seed(0)
    model = family.build_student(teacher, config.student, copy_plan(config, depths))
    width = family.width(teacher.config)
    student = Student(model, width, mapping.student_states(), student_width=width).to(device)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    next_batch = batch_cycle(batches)
    student_step = training_step(optimizer, lambda b: family.task_loss(student(**family.inputs(b)).logits, b), next_batch)
    losses = distillation_losses(student, teacher, mapping, config, family=family)
    distil_step = training_step(optimizer, lambda b: losses(b, 0, 0)["loss"], next_batch)

    @torch.inference_mode()
    def teacher_forward():
        teacher(**family.inputs(next_batch()), output_hidden_states=True)

    result = {
        "tokens_per_batch": sum(int(b["attention_mask"].sum()) for b in batches) / len(batches),
        "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "student_step_s": _median_time(student_step, steps, warmup, device),
        "distil_live_step_s": _median_time(distil_step, steps, warmup, device),
        "teacher_forward_s": _median_time(teacher_forward, steps, warmup, device),
    }
    result["top_k_kl"] = top_k_errors(teacher, model, batches, family, config.loss.temperature)
    return result


@torch.inference_mode()
def top_k_errors(teacher, student, batches, family, temperature: float) -> dict:
    """Relative error of the top-k + tail KL against the exact KL, and the bytes per 1k tokens of each store."""
    from layergeo.losses import kl_to_teacher, top_k_kl_to_teacher

    student.eval()
    rows = {"completion": [], "all": []}
    for batch in batches:
        t_logits = teacher(**family.inputs(batch)).logits
        s_logits = student(**family.inputs(batch)).logits
        positions = {"completion": batch["distil_mask"].bool(), "all": batch["attention_mask"].bool()}
        for name, keep in positions.items():
            rows[name].append((s_logits[keep].float(), t_logits[keep].float()))
    out = {}
    for name, pairs in rows.items():
        s, t = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        exact = float(kl_to_teacher(s, t, temperature))
        log_p = torch.log_softmax(t / temperature, -1)
        entry = {"tokens": s.shape[0], "exact_kl": exact, "relative_error": {}}
        for k in TOP_K:
            top, idx = log_p.topk(k, dim=-1)
            entry["relative_error"][str(k)] = (exact - float(top_k_kl_to_teacher(s, top, idx, temperature))) / exact
        out[name] = entry
    vocabulary = t.shape[-1]
    out["bytes_per_1k_tokens"] = {"full_float16": 1000 * vocabulary * 2,
                                  **{f"top_{k}_float16_int32": 1000 * k * (2 + 4) for k in TOP_K}}
    return out


def angle_benchmark(run: Path, examples: int, device: torch.device) -> dict:
    """Seconds of the forward passes over ``examples`` dev examples and of the geometry updates on their states."""
    from layergeo.analyse import AngleOptions, RunGeometry
    from layergeo.collect import hidden_states, load_run, texts_loader

    loaded = load_run(run, "best")
    loaded.config.loss.positions = "all"  # every non-padding position: the heaviest case
    loader, n_examples, _ = texts_loader(loaded, "dev", None, examples)
    geometries = {stack: RunGeometry(loaded, AngleOptions(), view) for stack, view in loaded.stacks.items()}
    forward_s = geometry_s = 0.0
    tokens = 0
    states = hidden_states(loaded, loader, device)
    while True:
        start = time.perf_counter()
        batch = next(states, None)
        forward_s += time.perf_counter() - start
        if batch is None:
            break
        start = time.perf_counter()
        for stack, (teacher, student) in batch.items():
            geometries[stack].update(teacher, student)
            tokens += teacher.shape[0]
        geometry_s += time.perf_counter() - start
    view = next(iter(loaded.stacks.values()))
    return {"examples": n_examples, "tokens": tokens, "teacher_states": view.teacher_layers + 1,
            "student_states": view.student_layers + 1, "teacher_pairs": (view.teacher_layers + 1) * view.teacher_layers // 2,
            "forward_s": forward_s, "geometry_s": geometry_s, "geometry_over_forward": geometry_s / forward_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished causal student run directory")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--examples", type=int, default=64, help="dev examples for the angle timing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results-causal.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    result = step_benchmarks(args.run, args.steps, args.warmup, device)
    result["distil_over_student"] = result["distil_live_step_s"] / result["student_step_s"]
    result["distil_over_student_plus_teacher"] = result["distil_live_step_s"] / (result["student_step_s"] + result["teacher_forward_s"])
    result["angles"] = angle_benchmark(args.run, args.examples, device)
    record = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
              "run": str(args.run), "steps": args.steps, "warmup": args.warmup, "command": " ".join(sys.argv), **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
