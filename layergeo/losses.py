"""Distillation losses: CE on labels, KL to the teacher, masked hidden-state matching.

Total = alpha_ce * CE + alpha_kl * T^2 * KL(p_T^T || p_S^T) + alpha_hidden * L_hid, where

    L_hid = mean over matched pairs (s, t) of  mean over non-padding tokens and
            hidden units of (norm(P_s S_s) - norm(T_t))^2

P_s is the student->teacher projection (identity for equal widths) and ``norm``
is ``none``, ``layernorm`` (standardise the whole [tokens, d] tensor of a state,
as the authors' T5 code) or ``l2`` (unit length per token, as their LLM code).
Unlike the authors' BERT code, the squared error is averaged over hidden units
and not divided by the batch size: the same for every strategy, a rescaling of alpha.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layergeo.config import NORMALIZATIONS
from layergeo.errors import LayergeoError


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_T/T) || softmax(z_S/T)), averaged over the batch. Logits: (B, C)."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t


def normalize_states(states: torch.Tensor, how: str) -> torch.Tensor:
    """(N, d) hidden states of the non-padding tokens of one layer."""
    if how == "none":
        return states
    if how == "layernorm":
        return F.layer_norm(states, states.shape)
    if how == "l2":
        return F.normalize(states, dim=-1)
    raise LayergeoError(f"unknown loss.normalize {how!r}; choose one of {', '.join(NORMALIZATIONS)}")


def hidden_matching_loss(
    student_states: tuple[torch.Tensor, ...],
    teacher_states: dict[int, torch.Tensor] | tuple[torch.Tensor, ...],
    pairs: list[tuple[int, int]],
    attention_mask: torch.Tensor,
    project,
    normalize: str = "none",
) -> torch.Tensor:
    """Mean over ``pairs`` of the masked MSE between projected student and teacher states.

    student_states[s]: (B, L, d_s); teacher_states[t]: (B, L, d_t); attention_mask: (B, L);
    ``project(s, x)`` maps (N, d_s) -> (N, d_t).
    """
    if not pairs:
        return student_states[0].new_zeros(())
    keep = attention_mask.bool()
    losses = []
    for s, t in pairs:
        student = normalize_states(project(s, student_states[s][keep]).float(), normalize)
        teacher = normalize_states(teacher_states[t][keep].float(), normalize)
        losses.append(F.mse_loss(student, teacher))
    return torch.stack(losses).mean()
