"""Streaming geometry accumulators against slow, obvious float64 numpy references."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from layergeo import geometry
from layergeo.errors import LayergeoError
from layergeo.geometry import (
    QUANTILES,
    AngleAccumulator,
    LinearCKA,
    MeanDistance,
    TransitionCosine,
    angle_vectors,
)

TOL = 1e-6


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 tokens, so that every multi-update test crosses chunk boundaries."""
    monkeypatch.setattr(geometry, "CHUNK_TOKENS", 16)


def tensor(array):
    return torch.from_numpy(np.ascontiguousarray(array))


def random_orthogonal(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ---------------------------------------------------------------- brute-force references


def brute_angles(batches, n_anchors, bins):
    """Per (anchor, i, k): dict of statistics from explicit loops; batches = [(anchor, (N, K, d))]."""
    k_targets = batches[0][1].shape[1]
    out = {}
    for a in range(n_anchors):
        for i in range(k_targets):
            for k in range(i + 1, k_targets):
                cos, thales, degenerate = [], [], 0
                for anchor, v in batches:
                    if anchor != a:
                        continue
                    for t in range(len(v)):
                        ui, uk = v[t, i], v[t, k]
                        ni, nk = np.linalg.norm(ui), np.linalg.norm(uk)
                        if ni == 0 or nk == 0:
                            degenerate += 1
                            continue
                        cos.append(np.clip(ui @ uk / (ni * nk), -1, 1))
                        if np.linalg.norm(ui - uk) > 0:
                            thales.append(np.linalg.norm(ui + uk) / np.linalg.norm(ui - uk))
                cos = np.array(cos)
                out[a, i, k] = {
                    "cos": np.sort(cos),
                    "n_tokens": len(cos),
                    "n_degenerate": degenerate,
                    "mean_cos": cos.mean() if len(cos) else np.nan,
                    "std_cos": cos.std() if len(cos) else np.nan,
                    "frac_acute": (cos > 0).mean() if len(cos) else np.nan,
                    "mean_angle_deg": np.degrees(np.arccos(cos)).mean() if len(cos) else np.nan,
                    "mean_thales_ratio": np.mean(thales) if thales else np.nan,
                    "hist": np.histogram(cos, bins=bins, range=(-1, 1))[0],
                }
    return out


def brute_distances(a, b):
    out = np.zeros((a.shape[1], b.shape[1]))
    for t in range(len(a)):
        for i in range(a.shape[1]):
            for j in range(b.shape[1]):
                out[i, j] += np.sqrt(np.sum((a[t, i] - b[t, j]) ** 2))
    return out / len(a)


def hsic_unbiased(k, l):
    n = len(k)
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    trace, ones_k, ones_l, ones_kl = np.trace(k @ l), one @ k @ one, one @ l @ one, one @ k @ l @ one
    return (trace + ones_k * ones_l / ((n - 1) * (n - 2)) - 2 / (n - 2) * ones_kl) / (n * (n - 3))


def hsic_biased(k, l):
    h = np.eye(len(k)) - 1 / len(k)
    return np.trace(k @ h @ l @ h)


def brute_cka(xs, ys, debiased):
    hsic = hsic_unbiased if debiased else hsic_biased
    kernels_a = [x @ x.T for x in xs]
    kernels_b = [y @ y.T for y in ys]
    return np.array(
        [[hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l)) for l in kernels_b] for k in kernels_a]
    )


def brute_transition(teacher, student):
    p = teacher.shape[1]
    total, count, degenerate = np.zeros((p, p)), np.zeros((p, p)), np.zeros((p, p))
    for t in range(len(teacher)):
        for a in range(p):
            for b in range(p):
                if a == b:
                    continue
                dt, ds = teacher[t, a] - teacher[t, b], student[t, a] - student[t, b]
                if np.linalg.norm(dt) == 0 or np.linalg.norm(ds) == 0:
                    degenerate[a, b] += 1
                    continue
                total[a, b] += dt @ ds / (np.linalg.norm(dt) * np.linalg.norm(ds))
                count[a, b] += 1
    with np.errstate(invalid="ignore"):
        return total / count, count, degenerate


# ---------------------------------------------------------------- angle_vectors


def test_angle_vectors_identity_projection_gives_t_minus_s():
    rng = np.random.default_rng(0)
    s, t = tensor(rng.normal(size=(7, 5))), tensor(rng.normal(size=(7, 3, 5)))
    plain = t - s[:, None, :]
    eye = torch.eye(5, dtype=torch.float64)
    for space in ("student", "teacher"):
        torch.testing.assert_close(angle_vectors(s, t, None, space), plain, rtol=0, atol=0)
        torch.testing.assert_close(angle_vectors(s, t, eye, space), plain, rtol=0, atol=1e-12)


def test_angle_vectors_random_projection_matches_loops():
    rng = np.random.default_rng(1)
    n, k, d_s, d_t = 6, 4, 3, 5
    s, t, w = rng.normal(size=(n, d_s)), rng.normal(size=(n, k, d_t)), rng.normal(size=(d_t, d_s))
    teacher_view, student_view = np.zeros((n, k, d_t)), np.zeros((n, k, d_s))
    for token in range(n):
        for target in range(k):
            u = t[token, target] - w @ s[token]
            teacher_view[token, target] = u
            student_view[token, target] = w.T @ u
    got_t = angle_vectors(tensor(s), tensor(t), tensor(w), "teacher").numpy()
    got_s = angle_vectors(tensor(s), tensor(t), tensor(w), "student").numpy()
    np.testing.assert_allclose(got_t, teacher_view, atol=1e-12)
    np.testing.assert_allclose(got_s, student_view, atol=1e-12)


def test_angle_vectors_errors():
    s, t = torch.zeros(2, 3), torch.zeros(2, 4, 5)
    with pytest.raises(LayergeoError, match="projection"):
        angle_vectors(s, t)
    with pytest.raises(LayergeoError, match="unknown space"):
        angle_vectors(s, t, torch.zeros(5, 3), space="middle")
    with pytest.raises(LayergeoError, match="shape"):
        angle_vectors(s, t, torch.zeros(3, 5))


# ---------------------------------------------------------------- AngleAccumulator


def make_angle_batches(rng, sizes, k, d, n_anchors):
    """Random (anchor, vectors) batches, with some zero vectors so that degenerate tokens occur."""
    batches = []
    for index, n in enumerate(sizes):
        v = rng.normal(size=(n, k, d)) + 0.3
        zero = rng.random(size=(n, k)) < 0.05
        v[zero] = 0
        batches.append((index % n_anchors, v))
    return batches


def check_against_brute(acc, batches, n_anchors, bins):
    ref = brute_angles(batches, n_anchors, bins)
    frame = acc.to_frame()
    assert len(frame) == n_anchors * len(acc.pairs)
    by_pair = acc.hist_frame(by_pair=True)
    for row in frame.itertuples():
        r = ref[row.anchor, row.teacher_i, row.teacher_k]
        assert row.n_tokens == r["n_tokens"] and row.n_degenerate == r["n_degenerate"]
        for column in ("mean_cos", "std_cos", "frac_acute", "mean_angle_deg", "mean_thales_ratio"):
            assert getattr(row, column) == pytest.approx(r[column], abs=TOL), column
        counts = by_pair.query(
            "anchor == @row.anchor and teacher_i == @row.teacher_i and teacher_k == @row.teacher_k"
        )["count"].to_numpy()
        np.testing.assert_array_equal(counts, r["hist"])
        for q in QUANTILES:
            order_statistic = r["cos"][math.ceil(q * r["n_tokens"]) - 1]
            assert abs(getattr(row, f"q{round(q * 100):02d}") - order_statistic) <= 2 / bins + 1e-12
    summed = acc.hist_frame()
    for a in range(n_anchors):
        expected = sum(ref[key]["hist"] for key in ref if key[0] == a)
        np.testing.assert_array_equal(summed.query("anchor == @a")["count"].to_numpy(), expected)


def test_angle_accumulator_matches_brute_force(small_chunks):
    rng = np.random.default_rng(2)
    n_anchors, k, d, bins = 2, 4, 6, 50
    batches = make_angle_batches(rng, [40, 17, 1, 33], k, d, n_anchors)
    acc = AngleAccumulator(n_anchors, k, bins=bins)
    for anchor, v in batches:
        acc.update(anchor, tensor(v))
    assert acc.pairs == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    check_against_brute(acc, batches, n_anchors, bins)


def test_angle_accumulator_default_chunk_boundary():
    rng = np.random.default_rng(3)
    batches = make_angle_batches(rng, [geometry.CHUNK_TOKENS + 70], k=3, d=4, n_anchors=1)
    acc = AngleAccumulator(1, 3)
    acc.update(0, tensor(batches[0][1]))
    check_against_brute(acc, batches, 1, 200)


def test_histogram_edges_and_cos_one():
    acc = AngleAccumulator(1, 2, bins=4)
    acc.update(0, torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[1.0, 0.0], [-1.0, 0.0]]], dtype=torch.float64))
    hist = acc.hist_frame()
    np.testing.assert_allclose(hist["bin_left"], [-1, -0.5, 0, 0.5])
    np.testing.assert_allclose(hist["bin_right"], [-0.5, 0, 0.5, 1])
    np.testing.assert_array_equal(hist["count"], [1, 0, 0, 1])


def test_angle_invariance_under_rotation_and_scaling():
    rng = np.random.default_rng(4)
    v = rng.normal(size=(300, 5, 7)) + 0.5
    transformed = 3.7 * v @ random_orthogonal(rng, 7).T
    frames = []
    for data in (v, transformed):
        acc = AngleAccumulator(1, 5)
        acc.update(0, tensor(data))
        frames.append(acc.to_frame())
    for column in ("mean_cos", "std_cos", "frac_acute", "mean_angle_deg", "mean_thales_ratio", "q50"):
        np.testing.assert_allclose(frames[0][column], frames[1][column], atol=1e-9, err_msg=column)


def test_degenerate_tokens_counted_without_nan():
    rng = np.random.default_rng(5)
    teachers = rng.normal(size=(20, 3, 4))
    student = rng.normal(size=(20, 4))
    student[:5] = teachers[:5, 1]            # anchor on teacher 1: pairs (0, 1) and (1, 2) degenerate
    teachers[5:8, 2] = teachers[5:8, 0]      # identical teachers 0 and 2: cos = 1, no Thales ratio
    vectors = angle_vectors(tensor(student), tensor(teachers))
    acc = AngleAccumulator(2, 3)
    acc.update(0, vectors)
    frame = acc.to_frame().set_index(["anchor", "teacher_i", "teacher_k"])
    assert frame.loc[(0, 0, 1), "n_degenerate"] == 5 and frame.loc[(0, 1, 2), "n_degenerate"] == 5
    assert frame.loc[(0, 0, 2), "n_degenerate"] == 0 and frame.loc[(0, 0, 1), "n_tokens"] == 15
    assert not frame.loc[0].isna().any().any()
    assert acc.state_tensors()["n_thales"][0, 1].item() == 17     # pair (0, 2): 3 tokens with u_0 = u_2
    np.testing.assert_allclose(frame.loc[(0, 0, 2), "mean_thales_ratio"], brute_angles(
        [(0, vectors.numpy())], 1, 200)[0, 0, 2]["mean_thales_ratio"], atol=TOL)
    # anchor 1 never updated: rows exist, counts zero, statistics NaN
    assert (frame.loc[1, "n_tokens"] == 0).all() and frame.loc[1, "mean_cos":].isna().all().all()
    for t in acc.state_tensors().values():
        assert not torch.isnan(t).any()


def test_acute_iff_outside_thales_ball():
    rng = np.random.default_rng(6)
    n, d = 2000, 3
    s, t = rng.normal(size=(n, d)), rng.normal(size=(n, 2, d))
    midpoint, radius = t.mean(1), np.linalg.norm(t[:, 0] - t[:, 1], axis=1) / 2
    outside = np.linalg.norm(s - midpoint, axis=1) > radius
    u = angle_vectors(tensor(s), tensor(t), space="teacher").numpy()
    acute = np.einsum("nd,nd->n", u[:, 0], u[:, 1]) > 0
    np.testing.assert_array_equal(acute, outside)
    assert 0.1 < outside.mean() < 0.9
    acc = AngleAccumulator(1, 2)
    acc.update(0, tensor(u))
    row = acc.to_frame().iloc[0]
    assert row.frac_acute == pytest.approx(outside.mean(), abs=1e-12)
    ratio = np.linalg.norm(s - midpoint, axis=1) / radius   # Thales ratio: distance to midpoint / radius
    assert row.mean_thales_ratio == pytest.approx(ratio.mean(), rel=1e-9)


def test_angle_merge_equals_concatenation(small_chunks):
    rng = np.random.default_rng(7)
    batches = make_angle_batches(rng, [25, 30, 9], k=4, d=3, n_anchors=2)
    whole, first, second = (AngleAccumulator(2, 4, bins=30) for _ in range(3))
    for index, (anchor, v) in enumerate(batches):
        whole.update(anchor, tensor(v))
        (first if index == 0 else second).update(anchor, tensor(v))
    first.merge(second)
    assert_states_close(first, whole)
    with pytest.raises(LayergeoError):
        first.merge(AngleAccumulator(2, 4, bins=31))


def assert_states_close(got, expected):
    got, expected = got.state_tensors(), expected.state_tensors()
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-12, msg=name)


# ---------------------------------------------------------------- MeanDistance


def test_mean_distance_matches_brute_force(small_chunks):
    rng = np.random.default_rng(8)
    batches = [(rng.normal(size=(n, 3, 5)) * 4, rng.normal(size=(n, 2, 5)) + 1) for n in (20, 37, 1)]
    batches[0][1][:4, 0] = batches[0][0][:4, 2]    # zero distances
    acc = MeanDistance(3, 2)
    for a, b in batches:
        acc.update(tensor(a), tensor(b))
    a_all, b_all = (np.concatenate(parts) for parts in zip(*batches))
    np.testing.assert_allclose(acc.mean(), brute_distances(a_all, b_all), rtol=0, atol=TOL)
    assert acc.mean().shape == (3, 2)


def test_mean_distance_merge_and_errors(small_chunks):
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(50, 2, 4)), rng.normal(size=(50, 3, 4))
    whole, first, second = MeanDistance(2, 3), MeanDistance(2, 3), MeanDistance(2, 3)
    whole.update(tensor(a), tensor(b))
    first.update(tensor(a[:21]), tensor(b[:21]))
    second.update(tensor(a[21:]), tensor(b[21:]))
    first.merge(second)
    assert_states_close(first, whole)
    assert np.isnan(MeanDistance(2, 3).mean()).all()
    with pytest.raises(LayergeoError):
        whole.update(tensor(a), tensor(b[:, :, :3]))


# ---------------------------------------------------------------- LinearCKA


def cka_data(rng, n, dims_a=(4, 6), dims_b=(5, 3)):
    base = rng.normal(size=(n, 4))
    xs = [base @ rng.normal(size=(4, d)) + 0.5 * rng.normal(size=(n, d)) + 2.0 for d in dims_a]
    ys = [base @ rng.normal(size=(4, d)) + rng.normal(size=(n, d)) - 1.0 for d in dims_b]
    ys[-1] = rng.normal(size=(n, dims_b[-1]))     # unrelated representation: CKA near 0
    return xs, ys


@pytest.mark.parametrize("debiased", [True, False])
def test_cka_matches_brute_force(small_chunks, debiased):
    rng = np.random.default_rng(10)
    xs, ys = cka_data(rng, 82)
    cka = LinearCKA([4, 6], [5, 3], debiased=debiased)
    for part in (slice(0, 30), slice(30, 75), slice(75, 82)):
        cka.update([tensor(x[part]) for x in xs], [tensor(y[part]) for y in ys])
    expected = brute_cka(xs, ys, debiased)
    np.testing.assert_allclose(cka.compute(), expected, rtol=0, atol=TOL)
    assert expected[:, 0].max() > 0.5 and np.abs(expected[:, 1]).max() < 0.1


@pytest.mark.parametrize("debiased", [True, False])
def test_cka_invariances(debiased):
    rng = np.random.default_rng(11)
    xs, ys = cka_data(rng, 80)
    results = []
    for transform in ("none", "rotate_scale", "translate"):
        cka = LinearCKA([4, 6], [5, 3], debiased=debiased)
        if transform == "rotate_scale":
            moved = ([2.5 * x @ random_orthogonal(rng, x.shape[1]) for x in xs],
                     [0.3 * y @ random_orthogonal(rng, y.shape[1]) for y in ys])
        elif transform == "translate":
            moved = ([x + rng.normal(size=x.shape[1]) for x in xs],
                     [y + rng.normal(size=y.shape[1]) for y in ys])
        else:
            moved = (xs, ys)
        cka.update([tensor(x) for x in moved[0]], [tensor(y) for y in moved[1]])
        results.append(cka.compute())
    np.testing.assert_allclose(results[1], results[0], atol=1e-9)
    np.testing.assert_allclose(results[2], results[0], atol=1e-9)


@pytest.mark.parametrize("debiased", [True, False])
def test_cka_of_a_representation_with_itself_is_one(debiased):
    x = tensor(np.random.default_rng(12).normal(size=(40, 5)))
    cka = LinearCKA([5], [5], debiased=debiased)
    cka.update([x], [x])
    assert cka.compute()[0, 0] == pytest.approx(1.0, abs=1e-12)


def test_cka_merge_and_errors(small_chunks):
    rng = np.random.default_rng(13)
    xs, ys = cka_data(rng, 60)
    whole, first, second = (LinearCKA([4, 6], [5, 3]) for _ in range(3))
    whole.update([tensor(x) for x in xs], [tensor(y) for y in ys])
    first.update([tensor(x[:25]) for x in xs], [tensor(y[:25]) for y in ys])
    second.update([tensor(x[25:]) for x in xs], [tensor(y[25:]) for y in ys])
    first.merge(second)
    assert_states_close(first, whole)
    np.testing.assert_allclose(first.compute(), whole.compute(), atol=1e-12)
    few = LinearCKA([4], [5])
    few.update([tensor(xs[0][:3])], [tensor(ys[0][:3])])
    with pytest.raises(LayergeoError, match="at least 4"):
        few.compute()
    with pytest.raises(LayergeoError):
        few.update([tensor(xs[0])], [tensor(ys[0][:10])])
    with pytest.raises(LayergeoError):
        first.merge(LinearCKA([4, 6], [5, 4]))


# ---------------------------------------------------------------- TransitionCosine


def test_transition_cosine_matches_brute_force(small_chunks):
    rng = np.random.default_rng(14)
    parts = []
    for n in (20, 33, 2):
        teacher = rng.normal(size=(n, 4, 5))
        student = teacher + 0.7 * rng.normal(size=(n, 4, 5))
        parts.append((teacher, student))
    parts[0][0][:3, 2] = parts[0][0][:3, 0]      # zero-length teacher transitions 0 <-> 2
    parts[1][1][:2, 3] = parts[1][1][:2, 1]      # zero-length student transitions 1 <-> 3
    acc = TransitionCosine(4)
    for teacher, student in parts:
        acc.update(tensor(teacher), tensor(student))
    teacher, student = (np.concatenate(p) for p in zip(*parts))
    expected, count, degenerate = brute_transition(teacher, student)
    got = acc.mean()
    assert np.isnan(np.diag(got)).all() and not np.isnan(got[~np.eye(4, dtype=bool)]).any()
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)
    np.testing.assert_array_equal(acc.state_tensors()["n"].numpy(), count)
    np.testing.assert_array_equal(acc.state_tensors()["n_degenerate"].numpy(), degenerate)
    assert degenerate[0, 2] == 3 and degenerate[1, 3] == 2


def test_transition_cosine_invariance_and_merge(small_chunks):
    rng = np.random.default_rng(15)
    teacher = rng.normal(size=(40, 3, 6))
    student = teacher + rng.normal(size=(40, 3, 6))
    q = random_orthogonal(rng, 6)
    plain, moved, first, second = (TransitionCosine(3) for _ in range(4))
    plain.update(tensor(teacher), tensor(student))
    moved.update(tensor(2 * teacher @ q.T), tensor(2 * student @ q.T))
    np.testing.assert_allclose(moved.mean(), plain.mean(), atol=1e-9)
    first.update(tensor(teacher[:13]), tensor(student[:13]))
    second.update(tensor(teacher[13:]), tensor(student[13:]))
    first.merge(second)
    assert_states_close(first, plain)
    with pytest.raises(LayergeoError):
        plain.update(tensor(teacher), tensor(student[:, :, :5]))


# ---------------------------------------------------------------- memory


def test_state_size_does_not_depend_on_token_count(small_chunks):
    rng = np.random.default_rng(16)
    sizes = {}
    for n in (10, 3000):
        angle = AngleAccumulator(2, 4, bins=20)
        angle.update(1, tensor(rng.normal(size=(n, 4, 3))))
        dist = MeanDistance(2, 3)
        dist.update(tensor(rng.normal(size=(n, 2, 3))), tensor(rng.normal(size=(n, 3, 3))))
        cka = LinearCKA([3], [4])
        cka.update([tensor(rng.normal(size=(n, 3)))], [tensor(rng.normal(size=(n, 4)))])
        trans = TransitionCosine(3)
        trans.update(tensor(rng.normal(size=(n, 3, 5))), tensor(rng.normal(size=(n, 3, 5))))
        states = [acc.state_tensors() for acc in (angle, dist, cka, trans)]
        assert all(t.dtype == torch.float64 for state in states for t in state.values())
        sizes[n] = [{name: tuple(t.shape) for name, t in state.items()} for state in states]
    assert sizes[10] == sizes[3000]
    assert sum(t.numel() for t in angle.state_tensors().values()) == 2 * 6 * (8 + 20)


def test_difference_gram_path_equals_the_vector_path():
    """Gram by expansion (states read once) gives the same statistics, degenerate tokens included."""
    from layergeo.geometry import difference_gram

    gen = torch.Generator().manual_seed(7)
    teachers = torch.randn(300, 5, 16, generator=gen, dtype=torch.float64) * 3
    student = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    student[:40] = teachers[:40, 0]          # S = T0 exactly: degenerate for every pair with T0
    student[40:60] = teachers[40:60, 2] + 1e-3
    by_vectors, by_gram = AngleAccumulator(1, 5, bins=50), AngleAccumulator(1, 5, bins=50)
    by_vectors.update(0, teachers - student[:, None, :])
    cross = (teachers * student[:, None, :]).sum(-1)
    gram, scale = difference_gram(teachers @ teachers.transpose(1, 2), cross, (student * student).sum(-1))
    by_gram.update_gram([0], gram[None], scale[None])
    a, b = by_vectors.to_frame(), by_gram.to_frame()
    assert (a.n_degenerate == b.n_degenerate).all() and a.n_degenerate.max() == 40
    assert (a.n_tokens == b.n_tokens).all()
    np.testing.assert_allclose(a[["mean_cos", "frac_acute", "mean_angle_deg", "mean_thales_ratio"]],
                               b[["mean_cos", "frac_acute", "mean_angle_deg", "mean_thales_ratio"]], rtol=1e-9, atol=1e-12)
    assert (by_vectors.hist_frame()["count"] == by_gram.hist_frame()["count"]).all()


def test_the_authors_token_mean_cosine_equals_a_float64_brute_force():
    """CosineFromStudent: per token the mean of cos(T_i - S_j, T_k - S_j) over j >= 1, 1 <= i < k; then histogrammed."""
    import itertools

    from layergeo.geometry import TokenMeanCosine

    g = torch.Generator().manual_seed(11)
    teacher, student = torch.randn(40, 5, 6, generator=g), torch.randn(40, 4, 6, generator=g)
    student[3, 2] = teacher[3, 1]  # a zero-length difference: the token has no mean
    around = 3 * torch.eye(6)[[0, 0, 1, 1]] * torch.tensor([1.0, -1, 1, -1])[:, None]  # T1..T4 = ±3e1, ±3e2 ...
    teacher[20:30, 1:] = around + 0.1 * torch.randn(10, 4, 6, generator=g)
    student[20:30, 1:] = 0.1 * torch.randn(10, 3, 6, generator=g)  # ... around the student: mean cosine near -1/3
    acc = TokenMeanCosine(bins=16)
    acc.update(teacher[:13], student[:13])
    acc.update(teacher[13:], student[13:])
    means = []
    for n in range(40):
        t, s = teacher[n].double().numpy(), student[n].double().numpy()
        if any(np.linalg.norm(t[i] - s[j]) == 0 for j in range(1, 4) for i in range(1, 5)):
            continue
        cos = [(t[i] - s[j]) @ (t[k] - s[j]) / np.linalg.norm(t[i] - s[j]) / np.linalg.norm(t[k] - s[j])
               for j in range(1, 4) for i, k in itertools.combinations(range(1, 5), 2)]
        means.append(np.mean(cos))
    assert acc.mean() == pytest.approx(np.mean(means), abs=1e-12)
    assert float(acc.state_tensors()["n_degenerate"]) == 1 and float(acc.state_tensors()["n"]) == 39
    assert (acc.hist_frame()["count"].to_numpy() == np.histogram(means, bins=16, range=(-1, 1))[0]).all()
    share = geometry.frac_positive(acc.hist_frame())
    assert 0 < share < 1 and share == pytest.approx(np.mean(np.array(means) > 0), abs=1e-12)
    # invariant to a common translation and rotation of all states
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    moved = TokenMeanCosine(bins=16)
    shift = torch.randn(6, generator=g, dtype=torch.float64)
    moved.update(teacher.double() @ q + shift, student.double() @ q + shift)
    assert moved.mean() == pytest.approx(acc.mean(), abs=1e-9)


def test_the_authors_positive_share_reads_the_bins_right_of_zero_and_needs_an_edge_there():
    from layergeo.geometry import TokenMeanCosine, frac_positive

    hist = pd.DataFrame({"bin_left": [-1.0, -0.5, 0.0, 0.5], "bin_right": [-0.5, 0.0, 0.5, 1.0], "count": [1, 2, 3, 4]})
    assert frac_positive(hist) == pytest.approx(0.7)
    edges = np.linspace(-1, 1, 99)  # 98 bins: the middle edge is -1.1e-16, not 0
    assert edges[49] < 0
    symmetric = pd.DataFrame({"bin_left": edges[:-1], "bin_right": edges[1:], "count": 1})
    assert frac_positive(symmetric) == pytest.approx(0.5)
    assert frac_positive(hist.assign(count=0)) is None and frac_positive(TokenMeanCosine(bins=8).hist_frame()) is None
    with pytest.raises(LayergeoError, match="even number of bins"):
        TokenMeanCosine(bins=15)
