"""Distillation losses: CE on labels, KL to the teacher, masked hidden-state matching.

Total = alpha_ce * CE + alpha_kl * T^2 * KL(p_T^T || p_S^T) + alpha_hidden * L_hid, where

    L_hid = mean over matched pairs (s, t) of  mean over non-padding tokens and
            hidden units of (norm(P_s S_s) - norm(T_t))^2

P_s is the student->teacher projection (identity for equal widths) and ``norm``
is ``none``, ``layernorm`` (standardise the whole [tokens, d] tensor of a state,
as the authors' T5 code) or ``l2`` (unit length per token, as their LLM code).
By default, unlike the authors' code, the squared error is averaged over hidden
units (``loss.hidden_reduction: mean``): the same for every strategy, a rescaling of
alpha by the width. ``sum`` sums over units as they did; with per-token ``l2`` states
(their LLM recipe) a token's term is then 2 (1 - cos), on the scale of the CE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layergeo.config import HIDDEN_REDUCTIONS, NORMALIZATIONS
from layergeo.errors import LayergeoError


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_T/T) || softmax(z_S/T)), averaged over the batch. Logits: (B, C)."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t


def top_k_kl_to_teacher(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, teacher_indices: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """T^2 KL between next-token distributions coarsened to the teacher's top k tokens plus one tail bucket.

    What a store of the teacher's top-k log-probabilities at temperature T allows: ``teacher_log_probs``
    and ``teacher_indices`` are (N, k), the student's logits (N, V). The tail bucket holds the mass
    of every other token, for teacher and student alike, so both are distributions over k + 1
    outcomes; by the data-processing inequality the result is at most the exact KL, and equal to
    it when k = V. Averaged over the N positions.
    """
    t = temperature
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = F.log_softmax(student_logits.to(dtype) / t, dim=-1)
    log_p_top = teacher_log_probs.to(dtype)
    kl_top = (log_p_top.exp() * (log_p_top - log_q.gather(-1, teacher_indices))).sum(-1)
    if teacher_indices.shape[-1] == student_logits.shape[-1]:  # every token kept: no tail bucket
        return kl_top.mean() * t * t
    p_tail = (1.0 - log_p_top.exp().sum(-1)).clamp(min=0.0)
    log_q_tail = log_q.scatter(-1, teacher_indices, float("-inf")).logsumexp(-1)
    kl_tail = torch.special.xlogy(p_tail, p_tail) - p_tail * log_q_tail
    return (kl_top + kl_tail).mean() * t * t


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
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean over ``pairs`` of the masked squared error between projected student and teacher states.

    student_states[s]: (B, L, d_s); teacher_states[t]: (B, L, d_t); attention_mask: (B, L);
    ``project(s, x)`` maps (N, d_s) -> (N, d_t). ``reduction`` over the d_t hidden units of a token:
    ``mean`` (the MSE) or ``sum`` (the squared distance, as the authors' code: with ``l2`` it is
    2 (1 - cos) per token); tokens and pairs are always averaged.
    """
    if reduction not in HIDDEN_REDUCTIONS:
        raise LayergeoError(f"unknown loss.hidden_reduction {reduction!r}; choose one of {', '.join(HIDDEN_REDUCTIONS)}")
    if not pairs:
        return student_states[0].new_zeros(())
    keep = attention_mask.bool()
    losses = []
    for s, t in pairs:
        student = normalize_states(project(s, student_states[s][keep]).float(), normalize)
        teacher = normalize_states(teacher_states[t][keep].float(), normalize)
        losses.append(F.mse_loss(student, teacher) if reduction == "mean" else (student - teacher).square().sum(-1).mean())
    return torch.stack(losses).mean()
