"""The CUDA code path, checked on a CPU-only machine: what differs on CUDA is chosen in one place
(layergeo.device), and each CUDA setting runs here on the CPU where torch allows it: the bf16
autocast step (same code, CPU autocast) and the fused AdamW kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import layergeo.distil as train_module
from layergeo.families import get_family
from layergeo.teacher import encode_splits, fine_tune_teacher
from layergeo import data
from layergeo.config import load_config
from layergeo.device import StepSettings, precision, step_settings
from layergeo.models import build_student, load_checkpoint
from layergeo.runs import RunDir
from layergeo.strategies import forward_targets

ENCODER = get_family("encoder")

SMALL = ["data.max_train=64"]


def test_cuda_gets_bf16_autocast_pinned_memory_and_fused_adamw():
    cuda, cpu = step_settings(torch.device("cuda")), step_settings(torch.device("cpu"))
    assert cuda == StepSettings(autocast_dtype=torch.bfloat16, pin_memory=True, fused_adamw=True)
    assert cuda.optimizer_kwargs == {"fused": True}
    assert cpu == StepSettings(autocast_dtype=None, pin_memory=False, fused_adamw=False)
    assert cpu.optimizer_kwargs == {}
    assert (precision(torch.device("cuda")), precision(torch.device("cpu"))) == ("bf16-autocast", "fp32")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("device") / "teacher"
    fine_tune_teacher(load_config(preset="tiny", overrides=SMALL), out)
    return out


@pytest.mark.parametrize("strategy", ["forward", "reverse", "none"])
def test_the_bf16_autocast_step_runs_and_stays_close_to_float32(teacher_dir, strategy):
    """The CUDA step is the float32 step inside bf16 autocast; run that on the CPU. bf16 keeps 8
    significant bits (relative rounding 2^-8 ~ 4e-3 per value), so every loss term must agree with
    float32 to a few percent, stay float32 (the losses upcast), and give finite gradients."""
    config = load_config(preset="tiny", overrides=[*SMALL, f"teacher.dir={teacher_dir}", f"matching.strategy={strategy}"])
    mapper, _ = train_module.validate_student_config(config, teacher_dir)
    teacher, tokenizer = load_checkpoint(RunDir(teacher_dir).checkpoint("best"))
    teacher.eval()
    encoded = encode_splits(config, ENCODER, ENCODER.load_task(config), tokenizer, None)["train"]
    torch.manual_seed(0)
    student = build_student(teacher, config.student, mapper.student_states(), forward_targets(4, config.student.layers))
    student.eval()
    batch = next(iter(data.make_loader(encoded, tokenizer, 16, shuffle=False, seed=0)))
    step = train_module.distillation_losses(student, teacher, mapper, config)
    reference = {k: v.detach() for k, v in step(batch, 0, 0).items()}
    bf16 = StepSettings(autocast_dtype=torch.bfloat16, pin_memory=False, fused_adamw=False)
    with bf16.autocast(torch.device("cpu")):
        mixed = step(batch, 0, 0)
    assert mixed.keys() == reference.keys() and len(mixed) >= 3
    for term, value in mixed.items():
        assert value.dtype == torch.float32, term
        assert torch.isfinite(value) and value.item() == pytest.approx(reference[term].item(), rel=0.05, abs=1e-3), term
    mixed["loss"].backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_fused_adamw_takes_the_same_steps_as_the_default_kernel():
    torch.manual_seed(0)
    weights = [torch.randn(32, 16), torch.randn(16)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(5)]
    results = []
    for settings in (step_settings(torch.device("cpu")), StepSettings(None, False, fused_adamw=True)):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, **settings.optimizer_kwargs)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            optimizer.step()
        results.append([p.detach() for p in params])
    for plain, fused in zip(*results):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
