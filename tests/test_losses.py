"""Tests for layergeo.losses against hand computations in float64 NumPy and explicit Python loops."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from layergeo.config import StudentConfig
from layergeo.errors import LayergeoError
from layergeo.losses import NORMALIZATIONS, hidden_matching_loss, kl_to_teacher, normalize_states
from layergeo.models import build_student

HUGE = 1e6  # what padding positions hold: including any of them would blow the loss up


# --- KL ---------------------------------------------------------------------------------------------

def kl_by_hand(student_logits: np.ndarray, teacher_logits: np.ndarray, t: float) -> float:
    total = 0.0
    for zs, zt in zip(student_logits, teacher_logits):
        ps = np.exp(zs / t) / np.exp(zs / t).sum()
        pt = np.exp(zt / t) / np.exp(zt / t).sum()
        total += sum(pt[c] * (math.log(pt[c]) - math.log(ps[c])) for c in range(len(pt)))
    return t * t * total / len(student_logits)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_to_teacher_matches_hand_computation(temperature):
    rng = np.random.default_rng(0)
    zs, zt = rng.normal(size=(5, 4)) * 2, rng.normal(size=(5, 4)) * 2
    got = kl_to_teacher(torch.tensor(zs, dtype=torch.float64), torch.tensor(zt, dtype=torch.float64), temperature)
    assert got.ndim == 0
    assert float(got) == pytest.approx(kl_by_hand(zs, zt, temperature), rel=1e-5, abs=1e-7)


def test_kl_temperature_squared_factor():
    rng = np.random.default_rng(1)
    zs, zt = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    s, t = torch.tensor(zs), torch.tensor(zt)
    at2 = float(kl_to_teacher(s, t, 2.0))
    # T^2 times the KL of the softened distributions, not the plain KL
    softened = kl_by_hand(zs, zt, 2.0) / 4.0
    assert at2 == pytest.approx(4.0 * softened, rel=1e-5)
    assert at2 != pytest.approx(softened, rel=1e-2)
    assert at2 != pytest.approx(float(kl_to_teacher(s, t, 1.0)), rel=1e-2)


def test_kl_zero_for_identical_and_positive_otherwise():
    z = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    assert float(kl_to_teacher(z, z.clone(), 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_to_teacher(z, z + 3.0, 2.0)) == pytest.approx(0.0, abs=1e-6)  # shift-invariant
    assert float(kl_to_teacher(z, z.flip(-1), 1.0)) > 1e-3


def test_kl_gradient_flows_to_student_only():
    g = torch.Generator().manual_seed(3)
    zs = torch.randn(3, 4, generator=g, requires_grad=True)
    zt = torch.randn(3, 4, generator=g)
    kl_to_teacher(zs, zt, 2.0).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0


# --- hidden matching ---------------------------------------------------------------------------------

def norm_by_hand(x: np.ndarray, how: str) -> np.ndarray:
    """x: (N, d) float64."""
    if how == "none":
        return x
    if how == "layernorm":
        mean = x.mean()
        var = ((x - mean) ** 2).mean()  # biased, over the whole [tokens, d] tensor
        return (x - mean) / math.sqrt(var + 1e-5)
    if how == "l2":
        return np.stack([row / np.sqrt((row**2).sum()) for row in x])
    raise AssertionError(how)


def hidden_loss_by_hand(student, teacher, pairs, mask, proj, how):
    """Explicit loops over pairs and non-padding tokens. proj[s]: (d_t, d_s) or None for identity."""
    per_pair = []
    for s, t in pairs:
        s_rows, t_rows = [], []
        for b in range(mask.shape[0]):
            for pos in range(mask.shape[1]):
                if mask[b, pos]:
                    x = student[s][b, pos]
                    s_rows.append(x if proj.get(s) is None else proj[s] @ x)
                    t_rows.append(teacher[t][b, pos])
        s_n = norm_by_hand(np.array(s_rows), how)
        t_n = norm_by_hand(np.array(t_rows), how)
        total = 0.0
        for i in range(len(s_n)):
            for k in range(s_n.shape[1]):
                total += (s_n[i, k] - t_n[i, k]) ** 2
        per_pair.append(total / (len(s_n) * s_n.shape[1]))
    return sum(per_pair) / len(per_pair)


def make_states(rng, n_states, batch, length, d, mask):
    states = []
    for _ in range(n_states):
        x = rng.normal(size=(batch, length, d)) * rng.uniform(0.5, 3.0) + rng.normal()
        x[~mask.astype(bool)] = HUGE
        states.append(x)
    return states


MASK = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
PAIRS = [(0, 0), (1, 4), (2, 2), (3, 1)]


@pytest.mark.parametrize("how", NORMALIZATIONS)
def test_hidden_loss_identity_projection(how):
    rng = np.random.default_rng(10)
    d = 8
    student = make_states(rng, 4, 3, 6, d, MASK)
    teacher = make_states(rng, 5, 3, 6, d, MASK)
    expected = hidden_loss_by_hand(student, teacher, PAIRS, MASK, {}, how)
    got = hidden_matching_loss(
        tuple(torch.tensor(x, dtype=torch.float64) for x in student),
        tuple(torch.tensor(x, dtype=torch.float64) for x in teacher),
        PAIRS, torch.tensor(MASK), lambda s, x: x, how,
    )
    assert got.ndim == 0
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert float(got) < 1e3  # no padding value leaked in


@pytest.mark.parametrize("how", NORMALIZATIONS)
def test_hidden_loss_random_projection(how):
    rng = np.random.default_rng(11)
    d_s, d_t = 5, 8
    student = make_states(rng, 4, 3, 6, d_s, MASK)
    teacher = make_states(rng, 5, 3, 6, d_t, MASK)
    proj = {s: rng.normal(size=(d_t, d_s)) for s in range(4)}
    weights = {s: torch.tensor(w) for s, w in proj.items()}
    expected = hidden_loss_by_hand(student, teacher, PAIRS, MASK, proj, how)
    teacher_dict = {t: torch.tensor(teacher[t]) for t in {t for _, t in PAIRS}}  # a teacher cache: a dict
    got = hidden_matching_loss(
        tuple(torch.tensor(x) for x in student), teacher_dict, PAIRS, torch.tensor(MASK),
        lambda s, x: x @ weights[s].T, how,
    )
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_hidden_loss_float32_inputs_and_mean_over_pairs():
    rng = np.random.default_rng(12)
    student = make_states(rng, 3, 3, 6, 4, MASK)
    teacher = make_states(rng, 3, 3, 6, 4, MASK)
    s = tuple(torch.tensor(x, dtype=torch.float32) for x in student)
    t = tuple(torch.tensor(x, dtype=torch.float32) for x in teacher)
    mask = torch.tensor(MASK)
    single = [float(hidden_matching_loss(s, t, [p], mask, lambda i, x: x)) for p in [(1, 1), (2, 0)]]
    both = float(hidden_matching_loss(s, t, [(1, 1), (2, 0)], mask, lambda i, x: x))
    assert both == pytest.approx(sum(single) / 2, rel=1e-5)
    assert both == pytest.approx(hidden_loss_by_hand(student, teacher, [(1, 1), (2, 0)], MASK, {}, "none"), rel=1e-4)


def test_hidden_loss_zero_when_equal():
    rng = np.random.default_rng(13)
    x = make_states(rng, 2, 3, 6, 4, MASK)
    states = tuple(torch.tensor(v) for v in x)
    teacher = tuple(torch.tensor(v) for v in x)
    for how in NORMALIZATIONS:
        assert float(hidden_matching_loss(states, teacher, [(0, 0), (1, 1)], torch.tensor(MASK), lambda s, v: v, how)) \
            == pytest.approx(0.0, abs=1e-10)


def test_hidden_loss_empty_pairs_is_zero():
    states = (torch.randn(2, 3, 4, requires_grad=True),)
    loss = hidden_matching_loss(states, (torch.randn(2, 3, 4),), [], torch.ones(2, 3), lambda s, x: x)
    assert loss.ndim == 0 and float(loss) == 0.0
    assert loss.dtype == states[0].dtype


def test_unknown_normalisation():
    states = (torch.randn(2, 3, 4),)
    with pytest.raises(LayergeoError, match="normalize"):
        hidden_matching_loss(states, states, [(0, 0)], torch.ones(2, 3), lambda s, x: x, "batchnorm")
    with pytest.raises(LayergeoError):
        normalize_states(torch.zeros(1, 1), "L2")


def test_normalize_states_properties():
    x = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 4 + 2
    ln = normalize_states(x, "layernorm")
    assert float(ln.mean()) == pytest.approx(0.0, abs=1e-10)
    assert float(ln.var(unbiased=False)) == pytest.approx(1.0, rel=1e-4)
    # the whole tensor is standardised, not each token
    assert not torch.allclose(ln.mean(dim=-1), torch.zeros(7, dtype=torch.float64), atol=1e-3)
    l2 = normalize_states(x, "l2")
    torch.testing.assert_close(l2.norm(dim=-1), torch.ones(7, dtype=torch.float64))
    assert normalize_states(x, "none") is x


# --- training signal ---------------------------------------------------------------------------------

def test_one_step_trains_the_projections():
    config = AutoConfig.for_model("bert", vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_config(config).eval()
    student = build_student(teacher, StudentConfig(layers=2, init="random", hidden_size=16), [0, 1, 2], [])
    assert len(student.projections) == 3
    student.train()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 99, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    before = {k: m.weight.detach().clone() for k, m in student.projections.items()}
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    with torch.no_grad():
        t_states = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    out = student(input_ids=ids, attention_mask=mask)
    loss = hidden_matching_loss(out.hidden_states, t_states, [(0, 0), (1, 2), (2, 4)], mask, student.project, "none")
    loss.backward()
    for key, module in student.projections.items():
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0, key
    optimizer.step()
    for key, module in student.projections.items():
        assert not torch.equal(module.weight.detach(), before[key]), key
    assert all(p.grad is None for p in teacher.parameters())


def test_summed_hidden_error_is_the_squared_distance_and_with_l2_states_two_one_minus_cos():
    torch.manual_seed(0)
    s, t = (torch.randn(2, 3, 5, dtype=torch.float64),), (torch.randn(2, 3, 5, dtype=torch.float64),)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    keep = mask.bool()
    mean = float(hidden_matching_loss(s, t, [(0, 0)], mask, lambda i, x: x))
    summed = float(hidden_matching_loss(s, t, [(0, 0)], mask, lambda i, x: x, reduction="sum"))
    assert summed == pytest.approx(5 * mean, rel=1e-6)  # the loss computes in float32
    cos = torch.nn.functional.cosine_similarity(s[0][keep], t[0][keep], dim=-1)
    l2 = float(hidden_matching_loss(s, t, [(0, 0)], mask, lambda i, x: x, "l2", reduction="sum"))
    assert l2 == pytest.approx(float((2 * (1 - cos)).mean()), rel=1e-6)
    with pytest.raises(LayergeoError, match="hidden_reduction"):
        hidden_matching_loss(s, t, [(0, 0)], mask, lambda i, x: x, reduction="max")
