"""Gradient alignments against one torch.autograd.grad call per pull, in float64, on a tiny BERT student."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertModel

from layergeo.alignment import (batched_pulls, cosine_matrix, cosines_with, first_order_check, flat_gradient, layer_alignment,
                                strategy_pulls)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=16)
    model = BertModel(config).double().eval()  # no dropout: every forward pass is the same function
    projection = torch.nn.Linear(16, 24, bias=False).double()  # a narrower student: W maps 16 -> 24
    ids = torch.randint(0, 50, (3, 7))
    teacher = torch.randn(3 * 7, 5, 24, dtype=torch.float64)  # 4 teacher layers + embeddings
    params = [p for p in (*model.parameters(), *projection.parameters())]

    def states():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        return [projection(h.reshape(-1, 16)) for h in hidden]  # W S_j, (N, 24) each

    return states, teacher, params


def _pull(states, teacher, params, j, i):
    s = states()
    return flat_gradient(0.5 * ((s[j] - teacher[:, i]) ** 2).sum(), params)


def test_layer_alignment_equals_separate_gradients(tiny):
    states, teacher, params = tiny
    got = layer_alignment(states(), teacher, params, layers=[1, 2])
    for j in (1, 2):
        grads = torch.stack([_pull(states, teacher, params, j, i) for i in range(5)])
        expected = torch.nn.functional.cosine_similarity(grads[:, None], grads[None, :], dim=-1)
        torch.testing.assert_close(got[j], expected, rtol=1e-9, atol=1e-12)
        assert got[j].diagonal().allclose(torch.ones(5, dtype=torch.float64))


def test_strategy_pulls_are_sums_of_the_pair_gradients(tiny):
    states, teacher, params = tiny
    targets = {"forward": {1: 2, 2: 4}, "reverse": {1: 4, 2: 2}, "all_to_one": {1: 2, 2: 2}}
    got = strategy_pulls(states(), teacher, params, targets)
    for row, pairs in zip(got, targets.values()):
        expected = sum(_pull(states, teacher, params, j, t) for j, t in pairs.items())
        torch.testing.assert_close(row, expected, rtol=1e-9, atol=1e-12)


def test_cosines_with_a_reference_and_the_batched_pulls_shape(tiny):
    states, teacher, params = tiny
    s = states()
    reference = flat_gradient(s[2].pow(2).sum(), params).detach()
    grads = batched_pulls(s, [torch.randn(4, *x.shape, dtype=torch.float64) for x in s], params)
    assert grads.shape == (4, sum(p.numel() for p in params))
    expected = [float(np.dot(g, reference.numpy()) / (np.linalg.norm(g) * np.linalg.norm(reference.numpy()))) for g in grads.detach().numpy()]
    np.testing.assert_allclose(cosines_with(grads, reference).numpy(), expected, rtol=1e-10)
    # cosines are invariant to scaling a pull
    np.testing.assert_allclose(cosine_matrix(grads * torch.tensor([[1.0], [3.0], [0.5], [2.0]], dtype=torch.float64)),
                               cosine_matrix(grads), rtol=1e-10)


def test_first_order_check_param_view_matches_a_small_step_and_state_view_is_the_formula(tiny):
    states, teacher, params = tiny
    before = [p.detach().clone() for p in params]
    rows = pd.DataFrame(first_order_check(states, params, teacher, layers=[2], relative_step=1e-6))
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # restored
    assert len(rows) == 5 * 5 and set(rows.student_layer) == {2}
    # to first order the parameter view is the realised change (a tiny step: relative error well below 1e-3)
    np.testing.assert_allclose(rows.realised, rows.param_view, rtol=1e-3, atol=1e-12 * rows.realised.abs().max())
    # the state view is -2 eta (T_i - W S_j).(T_k - W S_j); its ratio to the parameter view's eta is fixed per k
    s = states()[2].detach()
    for k in range(5):
        got = rows[rows.toward == k].sort_values("teacher_layer").state_view.to_numpy()
        brute = np.array([-2 * ((teacher[:, i] - s) * (teacher[:, k] - s)).sum().item() for i in range(5)])
        np.testing.assert_allclose(got / got[k], brute / brute[k], rtol=1e-9)  # up to the step size eta


def test_a_state_outside_the_graph_adds_nothing_and_a_zero_pull_has_no_step(tiny):
    """A LoRA student's frozen embeddings: their state does not require grad. The batched pulls skip it (as
    separate gradients do), and a pull that is zero everywhere gets an all-zero row, NaN cosines, no first-order step."""
    states, teacher, params = tiny
    s = states()
    frozen = [s[0].detach(), *s[1:]]  # S_0 out of the graph
    cotangents = [torch.randn(3, *x.shape, dtype=torch.float64) for x in s]
    expected = batched_pulls(s[1:], cotangents[1:], params)
    torch.testing.assert_close(batched_pulls(frozen, cotangents, params), expected, rtol=1e-12, atol=1e-14)
    assert not batched_pulls([x.detach() for x in s], cotangents, params).any()
    on_target = teacher.clone()
    on_target[:, 3] = s[2].detach()  # W S_2 = T_3: the pull of S_2 toward T_3 is zero
    matrix = layer_alignment(states(), on_target, params, layers=[2])[2]
    assert matrix[3].isnan().all() and not matrix[[0, 1, 2, 4]][:, [0, 1, 2, 4]].isnan().any()
    rows = first_order_check(states, params, on_target, [2], relative_step=1e-6)
    assert {r["toward"] for r in rows} == {0, 1, 2, 4}
