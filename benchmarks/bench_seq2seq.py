"""Speed of seq2seq distillation against its floor, on the embedded bert2bert task.

Times, in one process on the same real batches (King James -> Basic English verses, source and
target cut at 40 tokens, batch 16), the median over ``--steps`` steps after ``--warmup`` steps:

  student step       3 + 3-layer student forward + token CE + backward + AdamW (the floor)
  distil (live)      the full step: live teacher forward, CE + T^2 KL over target tokens + hidden
                     matching of encoder and decoder pairs (forward strategy, embedding pairs)
  teacher forward    the 6 + 6-layer teacher alone, inference mode, all hidden states

The teacher is the warm start itself (its cross-attention untrained): timing does not depend on
what it has learned.

    python benchmarks/bench_seq2seq.py --out benchmarks/results-seq2seq-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import _median_time, batch_cycle, training_step  # noqa: E402


def seq2seq_benchmarks(steps: int, warmup: int, device: torch.device) -> dict:
    from layergeo import data
    from layergeo.config import load_config
    from layergeo.distil import copy_plan, distillation_losses, stack_depths
    from layergeo.families import get_family
    from layergeo.models import Student
    from layergeo.strategies import build_mapping

    family = get_family("seq2seq")
    config = load_config(preset="seq2seq", overrides=[f"data.max_train={16 * (steps + warmup)}"])
    task = family.load_task(config)
    teacher, tokenizer = family.load_pretrained("minilm", task)
    teacher.to(device).eval()
    encoded = family.encode(config, task, "train", tokenizer, teacher.config)
    loader = data.make_loader(encoded, tokenizer, 16, shuffle=False, seed=0, collate_fn=family.collator(tokenizer, teacher))
    batches = [{k: v.to(device) for k, v in b.items()} for b in loader]
    depths = stack_depths(family, teacher.config, config)
    mapping = build_mapping(config.matching, depths)
    torch.manual_seed(0)
    model = family.build_student(teacher, config.student, copy_plan(config, depths))
    student = Student(model, 384, mapping.student_states(), student_width=384).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    next_batch = batch_cycle(batches)
    student_step = training_step(optimizer, lambda batch: family.task_loss(student(**family.inputs(batch)).logits, batch),
                                 next_batch)
    losses = distillation_losses(student, teacher, mapping, config, family=family)
    distil_step = training_step(optimizer, lambda batch: losses(batch, 0, 0)["loss"], next_batch)

    @torch.inference_mode()
    def teacher_forward():
        teacher(**family.inputs(next_batch()), output_hidden_states=True)

    return {
        "source_tokens_per_batch": sum(int(b["attention_mask"].sum()) for b in batches) / len(batches),
        "target_tokens_per_batch": sum(int((b["labels"] != -100).sum()) for b in batches) / len(batches),
        "student_step_s": _median_time(student_step, steps, warmup, device),
        "distil_live_step_s": _median_time(distil_step, steps, warmup, device),
        "teacher_forward_s": _median_time(teacher_forward, steps, warmup, device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results-seq2seq.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    result = seq2seq_benchmarks(args.steps, args.warmup, device)
    result["distil_over_student"] = result["distil_live_step_s"] / result["student_step_s"]
    record = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
              "steps": args.steps, "warmup": args.warmup, "command": " ".join(sys.argv), **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
