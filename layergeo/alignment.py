"""The angle the optimiser sees: alignments of parameter gradients of the pulls toward teacher layers.

For student layer j and teacher layer i, the pull is the loss ½ Σ_tokens |W S_j - T_i|² (W the trained
projection, or the identity at equal width); its parameter gradient is g_ji = J_j^T r_ji with
r_ji = W S_j - T_i (all probe tokens) and J_j the Jacobian of W S_j in the trainable parameters. Two
measures per probe:

- ``layer_alignment``: per j, the cosine matrix cos(g_ji, g_jk) over teacher layers i, k: whether a
  parameter step toward teacher layer k also lowers the distance to teacher layer i (the parameter-space
  counterpart of the angle at S_j between T_i - S_j and T_k - S_j).
- ``term_alignment``: the gradient of each strategy's whole hidden loss, Σ_j g_{j t(j)} for its
  targets t(j), and of the KL term, against the gradient of the cross-entropy on a held-out batch.

Every gradient of one family of pulls comes from one backward pass of the probe batch with the
cotangents batched (``torch.autograd.grad(..., is_grads_batched=True)``, which runs the vector-Jacobian
product under ``vmap``), not one backward per pair: memory is (teacher layers + 1) x trainable parameters
floats per student layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _flat(grads: Sequence[Tensor | None], params: Sequence[Tensor], batch: int) -> Tensor:
    """Batched gradients (one per parameter, (M, *shape) or None when unused) as one (M, P) matrix."""
    return torch.cat([(g if g is not None else torch.zeros(batch, *p.shape, dtype=p.dtype, device=p.device)).reshape(batch, -1)
                      for g, p in zip(grads, params)], 1)


def batched_pulls(states: Sequence[Tensor], cotangents: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """(M, P) parameter gradients of M pulls at once.

    ``states``: the student's projected states W S_j per layer j, each (N, d), in the graph of ``params``;
    ``cotangents``: per layer j, (M, N, d): the m-th pull's gradient with respect to W S_j (zeros where a
    pull does not touch layer j). Row m is Σ_j J_j^T cotangents[j][m].
    """
    m = cotangents[0].shape[0]
    reached = [(s, c) for s, c in zip(states, cotangents) if s.requires_grad]  # a frozen layer (a LoRA student's embeddings) adds 0
    if not reached:
        return _flat([None] * len(params), params, m)
    outputs, grad_outputs = zip(*reached)
    grads = torch.autograd.grad(list(outputs), list(params), grad_outputs=list(grad_outputs), is_grads_batched=True,
                                retain_graph=True, allow_unused=True)
    return _flat(grads, params, m)


def cosine_matrix(gradients: Tensor) -> Tensor:
    """(M, M) cosines between the rows of ``gradients`` (M, P), in float64; NaN for a zero gradient."""
    g = gradients.double()
    gram = g @ g.T
    norms = gram.diagonal().sqrt()
    return gram / (norms[:, None] * norms[None, :])


def layer_alignment(states: Sequence[Tensor], teacher: Tensor, params: Sequence[Tensor], layers: Sequence[int]) -> dict[int, Tensor]:
    """Per student layer j in ``layers``: the (L_T + 1, L_T + 1) matrix cos(g_ji, g_jk).

    ``states``: W S_j for every student layer (N, d) each; ``teacher``: (N, L_T + 1, d).
    """
    out = {}
    for j in layers:
        residuals = (states[j].detach()[None] - teacher.permute(1, 0, 2))  # (L_T + 1, N, d): r_ji = W S_j - T_i
        cotangents = [residuals if l == j else residuals.new_zeros(len(residuals), *s.shape) for l, s in enumerate(states)]
        out[j] = cosine_matrix(batched_pulls(states, cotangents, params))
    return out


def strategy_pulls(states: Sequence[Tensor], teacher: Tensor, params: Sequence[Tensor],
                   targets: dict[str, dict[int, int]]) -> Tensor:
    """(S, P): per strategy (targets {student layer j: teacher layer t}), the gradient of Σ_j ½|W S_j - T_t|²."""
    cotangents = []
    for l, s in enumerate(states):
        rows = [(s.detach() - teacher[:, pairs[l]]) if l in pairs else torch.zeros_like(s) for pairs in targets.values()]
        cotangents.append(torch.stack(rows))
    return batched_pulls(states, cotangents, params)


def cosines_with(gradients: Tensor, reference: Tensor) -> Tensor:
    """(M,) cosines of the rows of ``gradients`` (M, P) with ``reference`` (P,), in float64."""
    g, r = gradients.double(), reference.double()
    return (g @ r) / (g.norm(dim=1) * r.norm())


def flat_gradient(loss: Tensor, params: Sequence[Tensor]) -> Tensor:
    """(P,) gradient of a scalar ``loss`` in ``params`` (zeros for parameters it does not reach)."""
    grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def first_order_check(states_fn, params: Sequence[Tensor], teacher: Tensor, layers: Sequence[int],
                      relative_step: float = 1e-5) -> list[dict]:
    """Which view predicts what a small step toward one teacher layer does to the distance to another?

    For student layer j and teacher layer k, a parameter step θ' = θ - η g_jk (g_jk the gradient of
    ½ Σ|W S_j - T_k|², η set so that |η g_jk| = ``relative_step`` |θ|) changes D_i = Σ_tokens |W S_j - T_i|².
    Two first-order predictions of that change: the state-space view, as if the states moved along their own
    gradient, -2η Σ (T_i - W S_j)·(T_k - W S_j); the parameter-space view, -2η <g_ji, g_jk>. ``states_fn()``
    recomputes W S_j for every student layer ((N, d) each) from the current ``params``, which are stepped in
    place and restored. Returns rows: student_layer, toward (k), teacher_layer (i), realised, param_view,
    state_view (the state view shares the sign of the others only if the network moves states isotropically).
    The default step, 1e-5 of |θ|, is meant to keep the second-order term below the first in float32 (at 1e-3 the
    parameter view missed the realised sign on a tiny student in a one-off check; the test checks 1e-6 in float64).
    """
    saved = [p.detach().clone() for p in params]
    theta = torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params))
    targets = teacher.permute(1, 0, 2)                                         # (L_T + 1, N, d)
    rows = []
    for j in layers:
        states = states_fn()  # a fresh graph: the steps below change the parameters in place
        residuals = states[j].detach()[None] - targets                         # r_ji = W S_j - T_i
        cotangents = [residuals if l == j else residuals.new_zeros(len(residuals), *s.shape) for l, s in enumerate(states)]
        grads = batched_pulls(states, cotangents, params).double()             # (L_T + 1, P): g_ji
        before = (residuals.double() ** 2).sum((1, 2))
        for k in range(len(grads)):
            if not grads[k].norm() > 0:  # no step toward T_k moves the states (W S_j = T_k, or frozen)
                continue
            eta = relative_step * theta / grads[k].norm()
            param_view = -2 * eta * (grads @ grads[k])
            state_view = -2 * eta * (residuals.double() * residuals[k].double()).sum((1, 2))
            with torch.no_grad():
                offset = 0
                for p in params:
                    p -= (eta * grads[k, offset:offset + p.numel()]).reshape(p.shape).to(p.dtype)
                    offset += p.numel()
                after = ((states_fn()[j].detach()[None] - targets).double() ** 2).sum((1, 2))
                for p, original in zip(params, saved):
                    p.copy_(original)
            rows += [{"student_layer": j, "toward": k, "teacher_layer": i, "realised": float(after[i] - before[i]),
                      "param_view": float(param_view[i]), "state_view": float(state_view[i])} for i in range(len(grads))]
    return rows
