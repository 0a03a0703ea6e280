"""Geometry of teacher layers as seen from student representations: pure tensor maths.

For one token with student state s (d_s), teacher states t_0..t_{K-1} (d_t) and a
student->teacher projection W (d_t, d_s), the teacher-space view of target k is
u_k = t_k - W s and the student-space view is g_k = W^T (t_k - W s). The angle between
targets i and k seen from the anchor is acute iff s lies outside the ball with diameter
t_i t_k; the Thales ratio rho_ik = |u_i + u_k| / |u_i - u_k| is > 1 exactly then.

Every accumulator streams: ``update`` folds tokens, in chunks of ``CHUNK_TOKENS``, into
float64 sums of a fixed size, so memory does not grow with the number of tokens.
``merge`` adds another accumulator's sums; ``state_tensors`` returns the live sums (on the
CPU) so a caller can all-reduce them (SUM) across processes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from layergeo.errors import LayergeoError

CHUNK_TOKENS = 2048
"""Tokens per internal chunk: bounds the temporaries built inside ``update``."""

ZERO_REL = 1e-12
"""A squared difference |a - b|^2 obtained from Gram entries counts as zero below
ZERO_REL * (|a|^2 + |b|^2), the float64 rounding level of the Gram identity."""

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def angle_vectors(
    student: Tensor, teachers: Tensor, projection: Tensor | None = None, space: str = "student"
) -> Tensor:
    """Vectors from the student anchor to each teacher state, (N, K, d).

    student (N, d_s), teachers (N, K, d_t), projection W (d_t, d_s) or None for the identity
    (then d_s must equal d_t). space="teacher" gives u_k = t_k - W s (d = d_t);
    space="student" gives g_k = W^T u_k (d = d_s), the negative gradient of
    1/2 |W s - t_k|^2 with respect to s.
    """
    if space not in ("student", "teacher"):
        raise LayergeoError(f"unknown space {space!r}: use 'student' or 'teacher'")
    if student.ndim != 2 or teachers.ndim != 3 or student.shape[0] != teachers.shape[0]:
        raise LayergeoError(
            f"expected student (N, d_s) and teachers (N, K, d_t), "
            f"got {tuple(student.shape)} and {tuple(teachers.shape)}"
        )
    d_s, d_t = student.shape[1], teachers.shape[2]
    if projection is None:
        if d_s != d_t:
            raise LayergeoError(
                f"student width {d_s} differs from teacher width {d_t}: pass a projection (d_t, d_s)"
            )
        return teachers - student[:, None, :]
    if tuple(projection.shape) != (d_t, d_s):
        raise LayergeoError(f"projection must have shape ({d_t}, {d_s}), got {tuple(projection.shape)}")
    u = teachers - (student @ projection.T)[:, None, :]
    return u if space == "teacher" else u @ projection


def difference_gram(teacher_gram: Tensor, cross: Tensor, anchor_sq: Tensor) -> tuple[Tensor, Tensor]:
    """Gram matrices of u_k = t_k - s from dot products, without forming the vectors.

    teacher_gram (N, K, K) = t_i.t_k, cross (N, K) = t_k.s, anchor_sq (N,) = s.s, all float64.
    Returns G (N, K, K) with G_ik = t_i.t_k - t_i.s - t_k.s + s.s, and scale (N, K) =
    |t_k|^2 + |s|^2 for :meth:`AngleAccumulator.update_gram`.
    """
    gram = teacher_gram - cross[:, :, None] - cross[:, None, :] + anchor_sq[:, None, None]
    return gram, teacher_gram.diagonal(dim1=1, dim2=2) + anchor_sq[:, None]


def update_angles(accumulator: "AngleAccumulator", teacher: Tensor, student: Tensor, anchors: list[int],
                  projections: list[Tensor | None], space: str = "student") -> None:
    """Fold one batch of token states into ``accumulator``, one anchor per student state.

    teacher (N, K, d_t), student (N, L, d_s), projections[l]: W_l (d_t, d_s) or None. Every
    state is read once: teacher states and (projected) anchors are stacked and one batched
    float64 Gram product gives all the dot products the angles need (:func:`difference_gram`).
    The student-space view through a projection, a metric of its own, uses the vectors.
    """
    n_teacher = teacher.shape[1]
    direct = []
    for l in anchors:
        w = projections[l]
        w = None if w is None else w.to(teacher.device, torch.float32)
        if w is not None and space == "student":  # W^T (T_i - W S_l)
            accumulator.update(l, angle_vectors(student[:, l], teacher, w, "student"))
        else:
            direct.append((l, student[:, l] if w is None else student[:, l] @ w.T))
    if not direct:
        return
    states = torch.cat([teacher, torch.stack([s for _, s in direct], 1)], 1).double()   # (N, K + A, d_t)
    gram = torch.bmm(states, states.transpose(1, 2))
    teacher_gram = gram[:, :n_teacher, :n_teacher]
    grams, scales = zip(*(difference_gram(teacher_gram, gram[:, :n_teacher, j], gram[:, j, j])
                          for j in range(n_teacher, n_teacher + len(direct))))
    accumulator.update_gram([l for l, _ in direct], torch.stack(grams), torch.stack(scales))


def _pair_sq_dists(gram: Tensor) -> tuple[Tensor, Tensor]:
    """From a Gram matrix (..., P, P): |x_a - x_b|^2 and |x_a|^2 + |x_b|^2, both (..., P, P)."""
    sq = gram.diagonal(dim1=-2, dim2=-1)
    total = sq[..., :, None] + sq[..., None, :]
    return total - 2 * gram, total


def _hist_quantiles(hist: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """Quantiles (..., Q) of values on [-1, 1] from equal-bin counts (..., bins).

    The q-quantile is placed in the bin that holds the ceil(q n)-th smallest value and
    linearly interpolated inside it, so it lies within one bin width (2 / bins) of that
    order statistic. NaN where the histogram is empty.
    """
    bins = hist.shape[-1]
    cum = hist.cumsum(-1)
    total = cum[..., -1:]
    target = total * np.asarray(qs)                                   # (..., Q)
    j = (cum[..., None, :] < target[..., None]).sum(-1)              # first bin with cum >= target
    in_bin = np.take_along_axis(hist, j, -1)
    below = np.take_along_axis(cum, j, -1) - in_bin
    with np.errstate(divide="ignore", invalid="ignore"):
        value = -1 + (j + (target - below) / in_bin) * (2 / bins)
    return np.where(total > 0, value, np.nan)


class _Streaming:
    """Named float64 sums on the CPU that add across batches, accumulators and processes."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self._state = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}

    def state_tensors(self) -> dict[str, Tensor]:
        """The live float64 sums; reducing them in place (all_reduce, SUM) merges processes."""
        return self._state

    def merge(self, other: _Streaming) -> None:
        """Add the sums of ``other`` (same class, same shapes) to this accumulator."""
        if type(other) is not type(self) or {n: t.shape for n, t in other._state.items()} != {
            n: t.shape for n, t in self._state.items()
        }:
            raise LayergeoError(f"cannot merge a {type(other).__name__} of a different shape into this one")
        for name, total in self._state.items():
            total += other._state[name]

    def _add(self, sums: dict[str, Tensor], index=...) -> None:
        for name, value in sums.items():
            self._state[name][index] += value.to(device="cpu", dtype=torch.float64)


class AngleAccumulator(_Streaming):
    """Streaming statistics of the angle between targets i < k seen from each anchor.

    State per (anchor, pair), shape (n_anchors, P) with P = K (K - 1) / 2 pairs: token
    count n, degenerate count, acute count (cos > 0), sums of cos, cos^2 and angle (degrees),
    the Thales ratio sum and its token count (tokens with u_i != u_k), and a histogram of
    cos on [-1, 1], (n_anchors, P, bins). A token with u_i = 0 or u_k = 0 is degenerate for
    that pair: counted in n_degenerate and left out of every other statistic.
    """

    def __init__(self, n_anchors: int, n_targets: int, bins: int = 200):
        if n_anchors < 1 or n_targets < 2 or bins < 1:
            raise LayergeoError(
                f"need n_anchors >= 1, n_targets >= 2, bins >= 1; got {n_anchors}, {n_targets}, {bins}"
            )
        self.n_anchors, self.n_targets, self.bins = n_anchors, n_targets, bins
        self._i, self._k = torch.triu_indices(n_targets, n_targets, offset=1)
        shape = (n_anchors, len(self._i))
        names = ("n", "n_degenerate", "n_acute", "sum_cos", "sum_cos2", "sum_angle", "n_thales", "sum_thales")
        super().__init__({name: shape for name in names} | {"hist": (*shape, bins)})

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Target pairs (i, k), i < k, in row-major order: the P axis of the state."""
        return list(zip(self._i.tolist(), self._k.tolist()))

    @torch.no_grad()
    def update(self, anchor: int, vectors: Tensor) -> None:
        """Fold in tokens seen from ``anchor``: vectors (N, K, d), e.g. from ``angle_vectors``."""
        self._check_anchors([anchor])
        if vectors.ndim != 3 or vectors.shape[1] != self.n_targets:
            raise LayergeoError(f"expected vectors (N, {self.n_targets}, d), got {tuple(vectors.shape)}")
        for chunk in vectors.split(CHUNK_TOKENS):
            v = chunk.to(torch.float64)
            self._add(self._chunk_sums(torch.bmm(v, v.transpose(1, 2))[None]), [anchor])

    @torch.no_grad()
    def update_gram(self, anchors: list[int], gram: Tensor, scale: Tensor) -> None:
        """Fold in tokens given the Gram matrices of the vectors seen from several anchors at once.

        gram (A, N, K, K) for the A ``anchors``; ``scale`` (A, N, K): a magnitude per vector (e.g.
        |t_k|^2 + |s|^2 from :func:`difference_gram`); a vector whose squared length is below
        ZERO_REL * scale is degenerate. Use this when the Gram comes from an expansion that leaves
        rounding-level residues instead of exact zeros.
        """
        self._check_anchors(anchors)
        if gram.shape[:1] != (len(anchors),) or gram.shape[2:] != (self.n_targets, self.n_targets) or scale.shape != gram.shape[:3]:
            raise LayergeoError(f"expected gram ({len(anchors)}, N, {self.n_targets}, {self.n_targets}) and scale "
                                f"({len(anchors)}, N, {self.n_targets})")
        for g, sc in zip(gram.split(CHUNK_TOKENS, 1), scale.split(CHUNK_TOKENS, 1)):
            self._add(self._chunk_sums(g.to(torch.float64), sc.to(torch.float64)), anchors)

    def _check_anchors(self, anchors: list[int]) -> None:
        for anchor in anchors:
            if not 0 <= anchor < self.n_anchors:
                raise LayergeoError(f"anchor {anchor} out of range 0..{self.n_anchors - 1}")
        if len(set(anchors)) != len(anchors):
            raise LayergeoError(f"anchors {anchors} repeat; give each anchor once per update")

    def _chunk_sums(self, gram: Tensor, scale: Tensor | None = None) -> dict[str, Tensor]:
        """Per-pair sums (A, P) and histograms (A, P, bins) from Gram matrices (A, c, K, K)."""
        i, k = self._i.to(gram.device), self._k.to(gram.device)
        diff2, total = _pair_sq_dists(gram)
        sq = gram.diagonal(dim1=-2, dim2=-1)                             # (A, c, K)
        gii, gkk, gik = sq[..., i], sq[..., k], gram[..., i, k]         # (A, c, P)
        diff2, total = diff2[..., i, k], total[..., i, k]               # |u_i - u_k|^2, |u_i|^2 + |u_k|^2
        nonzero = sq > 0 if scale is None else sq > ZERO_REL * scale
        valid = nonzero[..., i] & nonzero[..., k]
        gii, gkk = gii.clamp(min=0), gkk.clamp(min=0)
        cos = torch.where(valid, gik / (gii.sqrt() * gkk.sqrt()), 0.0).clamp(-1, 1)
        finite = valid & (diff2 > ZERO_REL * total)
        thales = torch.where(finite, ((total + 2 * gik).clamp(min=0) / diff2).sqrt(), 0.0)
        n_anchors, n_pairs = gram.shape[0], len(i)
        bin_index = ((cos + 1) / 2 * self.bins).floor().long().clamp(max=self.bins - 1)
        offsets = self.bins * torch.arange(n_anchors * n_pairs, device=gram.device).view(n_anchors, 1, n_pairs)
        flat = (bin_index + offsets)[valid]
        return {
            "n": valid.sum(1),
            "n_degenerate": (~valid).sum(1),
            "n_acute": (cos > 0).sum(1),
            "sum_cos": cos.sum(1),
            "sum_cos2": (cos * cos).sum(1),
            "sum_angle": torch.where(valid, torch.rad2deg(torch.arccos(cos)), 0.0).sum(1),
            "n_thales": finite.sum(1),
            "sum_thales": thales.sum(1),
            "hist": torch.bincount(flat, minlength=n_anchors * n_pairs * self.bins).view(n_anchors, n_pairs, self.bins),
        }

    def to_frame(self) -> pd.DataFrame:
        """One row per (anchor, teacher_i, teacher_k); NaN statistics where n_tokens == 0.

        std_cos is the population standard deviation. q05..q95 come from the histogram by
        linear interpolation inside the bin holding the ceil(q n)-th smallest cos, so their
        error is at most one bin width (2 / bins).
        """
        s = {name: t.numpy() for name, t in self._state.items()}
        n = s["n"]
        with np.errstate(divide="ignore", invalid="ignore"):
            mean_cos = s["sum_cos"] / n
            std_cos = np.sqrt(np.maximum(s["sum_cos2"] / n - mean_cos**2, 0))
            frac_acute = s["n_acute"] / n
            mean_angle = s["sum_angle"] / n
            mean_thales = s["sum_thales"] / s["n_thales"]
        quantiles = _hist_quantiles(s["hist"], QUANTILES)               # (A, P, Q)
        n_pairs = n.shape[1]
        i, k = self._i.numpy(), self._k.numpy()
        frame = pd.DataFrame(
            {
                "anchor": np.repeat(np.arange(self.n_anchors), n_pairs),
                "teacher_i": np.tile(i, self.n_anchors),
                "teacher_k": np.tile(k, self.n_anchors),
                "n_tokens": n.ravel().astype(np.int64),
                "n_degenerate": s["n_degenerate"].ravel().astype(np.int64),
                "mean_cos": mean_cos.ravel(),
                "std_cos": std_cos.ravel(),
                "frac_acute": frac_acute.ravel(),
                "mean_angle_deg": mean_angle.ravel(),
                "mean_thales_ratio": mean_thales.ravel(),
            }
        )
        for q, column in zip(QUANTILES, quantiles.reshape(-1, len(QUANTILES)).T):
            frame[f"q{round(q * 100):02d}"] = column
        return frame

    def hist_frame(self, by_pair: bool = False) -> pd.DataFrame:
        """Histogram of cos, one row per (anchor, [teacher_i, teacher_k,] bin); pairs summed unless by_pair."""
        hist = self._state["hist"].numpy()                              # (A, P, bins)
        n_anchors, n_pairs, bins = hist.shape
        if by_pair:
            columns = {
                "anchor": np.repeat(np.arange(n_anchors), n_pairs * bins),
                "teacher_i": np.tile(np.repeat(self._i.numpy(), bins), n_anchors),
                "teacher_k": np.tile(np.repeat(self._k.numpy(), bins), n_anchors),
            }
            n_rows = n_anchors * n_pairs
        else:
            hist = hist.sum(1)
            columns = {"anchor": np.repeat(np.arange(n_anchors), bins)}
            n_rows = n_anchors
        edges = np.linspace(-1, 1, bins + 1)
        return pd.DataFrame(
            columns
            | {
                "bin_left": np.tile(edges[:-1], n_rows),
                "bin_right": np.tile(edges[1:], n_rows),
                "count": hist.reshape(-1).astype(np.int64),
            }
        )


class MeanDistance(_Streaming):
    """Running mean over tokens of |a_i - b_j|_2 for every (i, j): state n () and sum (A, B)."""

    def __init__(self, n_a: int, n_b: int):
        self.n_a, self.n_b = n_a, n_b
        super().__init__({"n": (), "sum": (n_a, n_b)})

    @torch.no_grad()
    def update(self, a: Tensor, b: Tensor) -> None:
        """Fold in tokens: a (N, A, d), b (N, B, d)."""
        if (
            a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]
            or a.shape[1] != self.n_a or b.shape[1] != self.n_b
        ):
            raise LayergeoError(
                f"expected a (N, {self.n_a}, d) and b (N, {self.n_b}, d), "
                f"got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        for a_chunk, b_chunk in zip(a.split(CHUNK_TOKENS), b.split(CHUNK_TOKENS)):
            a64, b64 = a_chunk.to(torch.float64), b_chunk.to(torch.float64)
            dist = torch.cdist(a64, b64, compute_mode="donot_use_mm_for_euclid_dist")  # (c, A, B), no Gram trick
            self._add({"n": torch.tensor(len(a_chunk)), "sum": dist.sum(0)})

    def mean(self) -> np.ndarray:
        """Mean distance (A, B); NaN before any token."""
        return (self._state["sum"] / self._state["n"]).numpy()


def _moment_shapes(key: str, p: int, q: int) -> dict[str, tuple[int, ...]]:
    return {f"{key}.cross": (p, q), f"{key}.sqx_y": (q,), f"{key}.sqy_x": (p,), f"{key}.sqx_sqy": ()}


def _moments(key: str, x: Tensor, y: Tensor, sqx: Tensor, sqy: Tensor) -> dict[str, Tensor]:
    """Second-order sums of rows x (n, p), y (n, q) with squared norms sqx, sqy (n,)."""
    return {
        f"{key}.cross": x.T @ y,
        f"{key}.sqx_y": sqx @ y,
        f"{key}.sqy_x": sqy @ x,
        f"{key}.sqx_sqy": sqx @ sqy,
    }


class LinearCKA(_Streaming):
    """Exact linear CKA between A and B representations of the same tokens, streamed.

    For X (n, p) with rows x_t and Y (n, q) with rows y_t, write K = X X^T, L = Y Y^T,
    kx_t = |x_t|^2, ly_t = |y_t|^2, and K~, L~ for K, L with zeroed diagonals. The sums
    kept per pair, independent of n (memory O(p q)), are

        C = X^T Y = sum_t x_t y_t^T,    a = sum_t kx_t y_t,    b = sum_t ly_t x_t,
        w = sum_t kx_t ly_t,            Sx = sum_t x_t,  Sy = sum_t y_t,
        Tx = sum_t kx_t,  Ty = sum_t ly_t,  and n,

    (and the same with Y = X, Y = Y for each representation), from which

        tr(K~ L~)   = sum_{t != s} (x_t.x_s)(y_t.y_s) = |C|_F^2 - w
        1^T K~ 1    = |Sx|^2 - Tx,          1^T L~ 1 = |Sy|^2 - Ty
        1^T K~ L~ 1 = sum_s (x_s.Sx - kx_s)(y_s.Sy - ly_s)
                    = Sx^T C Sy - a.Sy - b.Sx + w

    give the unbiased HSIC_1 of Song et al. (2012),

        HSIC_1 = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2 (1^T K~ L~ 1) / (n-2)] / (n (n-3)),

    and debiased CKA = HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L)) (Nguyen et al. 2021);
    it can be NaN for tiny n where a self-HSIC_1 estimate is negative. With debiased=False,
    X_c^T Y_c = C - Sx Sy^T / n gives the standard CKA
    |X_c^T Y_c|_F^2 / (|X_c^T X_c|_F |Y_c^T Y_c|_F) (Kornblith et al. 2019).
    """

    def __init__(self, dims_a: list[int], dims_b: list[int], debiased: bool = True):
        if not dims_a or not dims_b:
            raise LayergeoError("LinearCKA needs at least one representation on each side")
        self.dims_a, self.dims_b, self.debiased = list(dims_a), list(dims_b), debiased
        shapes: dict[str, tuple[int, ...]] = {"n": ()}
        for side, dims in (("a", self.dims_a), ("b", self.dims_b)):
            for r, d in enumerate(dims):
                shapes |= {f"{side}{r}.sum": (d,), f"{side}{r}.sq": ()} | _moment_shapes(f"{side}{r}", d, d)
        for i, p in enumerate(self.dims_a):
            for j, q in enumerate(self.dims_b):
                shapes |= _moment_shapes(f"a{i}b{j}", p, q)
        super().__init__(shapes)

    @torch.no_grad()
    def update(self, xs: list[Tensor], ys: list[Tensor]) -> None:
        """Fold in the same N tokens: xs[i] (N, dims_a[i]), ys[j] (N, dims_b[j])."""
        shapes = [tuple(t.shape) for t in (*xs, *ys)]
        n = shapes[0][0] if shapes and shapes[0] else 0
        if shapes != [(n, d) for d in (*self.dims_a, *self.dims_b)]:
            raise LayergeoError(
                f"expected (N, d) tensors with widths {self.dims_a} and {self.dims_b}, got shapes {shapes}"
            )
        for start in range(0, n, CHUNK_TOKENS):
            chunk = {
                f"{side}{r}": t[start : start + CHUNK_TOKENS].to(torch.float64)
                for side, reps in (("a", xs), ("b", ys))
                for r, t in enumerate(reps)
            }
            sq = {key: (x * x).sum(1) for key, x in chunk.items()}
            self._add({"n": torch.tensor(len(sq["a0"]))})
            for key, x in chunk.items():
                self._add({f"{key}.sum": x.sum(0), f"{key}.sq": sq[key].sum()})
                self._add(_moments(key, x, x, sq[key], sq[key]))
            for i in range(len(xs)):
                for j in range(len(ys)):
                    self._add(_moments(f"a{i}b{j}", chunk[f"a{i}"], chunk[f"b{j}"], sq[f"a{i}"], sq[f"b{j}"]))

    def _hsic(self, n: float, key: str, x: str, y: str) -> Tensor:
        """HSIC_1 (debiased) or (n-1)^2 HSIC_0 (biased; the factor cancels in CKA) from the sums."""
        s = self._state
        cross, sum_x, sum_y = s[f"{key}.cross"], s[f"{x}.sum"], s[f"{y}.sum"]
        if not self.debiased:
            return ((cross - torch.outer(sum_x, sum_y) / n) ** 2).sum()
        trace = (cross**2).sum() - s[f"{key}.sqx_sqy"]
        ones_k = sum_x @ sum_x - s[f"{x}.sq"]
        ones_l = sum_y @ sum_y - s[f"{y}.sq"]
        ones_kl = (
            sum_x @ cross @ sum_y - s[f"{key}.sqx_y"] @ sum_y - s[f"{key}.sqy_x"] @ sum_x + s[f"{key}.sqx_sqy"]
        )
        return (trace + ones_k * ones_l / ((n - 1) * (n - 2)) - 2 * ones_kl / (n - 2)) / (n * (n - 3))

    def compute(self) -> np.ndarray:
        """CKA (A, B) between every a-representation and every b-representation."""
        n = self._state["n"].item()
        kind, least = ("debiased", 4) if self.debiased else ("biased", 2)
        if n < least:
            raise LayergeoError(f"{kind} CKA needs at least {least} tokens, got {n:.0f}")
        self_a = [self._hsic(n, f"a{i}", f"a{i}", f"a{i}") for i in range(len(self.dims_a))]
        self_b = [self._hsic(n, f"b{j}", f"b{j}", f"b{j}") for j in range(len(self.dims_b))]
        cka = np.empty((len(self_a), len(self_b)))
        for i, hx in enumerate(self_a):
            for j, hy in enumerate(self_b):
                cka[i, j] = (self._hsic(n, f"a{i}b{j}", f"a{i}", f"b{j}") / (hx * hy).sqrt()).item()
        return cka


class TransitionCosine(_Streaming):
    """Mean over tokens of cos(T_a - T_b, S_a - S_b) for positions a != b: state (P, P) each.

    A token where T_a - T_b or S_a - S_b has zero length (below ZERO_REL, see there) is
    degenerate for (a, b): counted in n_degenerate and left out of the mean.
    """

    def __init__(self, n: int):
        self.n = n
        super().__init__({"n": (n, n), "n_degenerate": (n, n), "sum_cos": (n, n)})

    @torch.no_grad()
    def update(self, teacher: Tensor, student: Tensor) -> None:
        """Fold in tokens: teacher and student (N, P, d), same width (the caller projects)."""
        if teacher.ndim != 3 or teacher.shape != student.shape or teacher.shape[1] != self.n:
            raise LayergeoError(
                f"expected teacher and student of the same shape (N, {self.n}, d), "
                f"got {tuple(teacher.shape)} and {tuple(student.shape)}"
            )
        p = self.n
        off_diagonal = ~torch.eye(p, dtype=torch.bool, device=teacher.device)
        for t, s in zip(teacher.split(CHUNK_TOKENS), student.split(CHUNK_TOKENS)):
            v = torch.cat([t, s], dim=1).to(torch.float64)             # (c, 2P, d)
            gram = torch.bmm(v, v.transpose(1, 2))                     # (c, 2P, 2P)
            dt2, t_total = _pair_sq_dists(gram[:, :p, :p])             # |T_a - T_b|^2
            ds2, s_total = _pair_sq_dists(gram[:, p:, p:])             # |S_a - S_b|^2
            ts = gram[:, :p, p:]                                       # T_a . S_b
            ts_same = ts.diagonal(dim1=1, dim2=2)
            dot = ts_same[:, :, None] + ts_same[:, None, :] - ts - ts.transpose(1, 2)
            valid = off_diagonal & (dt2 > ZERO_REL * t_total) & (ds2 > ZERO_REL * s_total)
            cos = torch.where(valid, dot / (dt2.sqrt() * ds2.sqrt()), 0.0).clamp(-1, 1)
            degenerate = off_diagonal & ~valid
            self._add({"n": valid.sum(0), "n_degenerate": degenerate.sum(0), "sum_cos": cos.sum(0)})

    def mean(self) -> np.ndarray:
        """Mean transition cosine (P, P), symmetric, NaN on the diagonal and where no token counted."""
        return (self._state["sum_cos"] / self._state["n"]).numpy()


class TokenMeanCosine(_Streaming):
    """The authors' angle statistic (``CosineFromStudent`` in their ``classification/dist_utils.py``).

    Per token: the mean of cos(T_i - S_j, T_k - S_j) over every student state j >= 1 and every
    teacher pair 1 <= i < k (embedding outputs excluded); accumulated as a histogram of those
    per-token means (``bins`` equal bins on [-1, 1], their figure uses 1000) with their sum and count.
    Unlike theirs, only the positions that count are used (they include padding) and a narrower
    student is compared through its projection (the caller passes W S_j). A token where some
    T_i - S_j has zero length (below ZERO_REL) has no mean: it is counted in ``n_degenerate``.
    """

    def __init__(self, bins: int = 1000):
        if bins < 2 or bins % 2:
            raise LayergeoError(f"the authors' histogram needs an even number of bins (an edge at cos 0), got {bins}")
        self.bins = bins
        super().__init__({"n": (), "n_degenerate": (), "sum_mean_cos": (), "hist": (bins,)})

    @torch.no_grad()
    def update(self, teacher: Tensor, student: Tensor) -> None:
        """Fold in tokens: teacher (N, K, d) with K >= 3 states, student (N, L, d) with L >= 2 (same width)."""
        if teacher.ndim != 3 or student.ndim != 3 or teacher.shape[0] != student.shape[0] or teacher.shape[2] != student.shape[2]:
            raise LayergeoError(f"expected teacher (N, K, d) and student (N, L, d), got {tuple(teacher.shape)} and "
                                f"{tuple(student.shape)}")
        if teacher.shape[1] < 3 or student.shape[1] < 2:
            raise LayergeoError("the authors' statistic needs two teacher layers and one student layer beyond the embeddings")
        k = teacher.shape[1] - 1
        upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=teacher.device), diagonal=1)
        for t, s in zip(teacher.split(CHUNK_TOKENS), student.split(CHUNK_TOKENS)):
            u = t[:, None, 1:, :].double() - s[:, 1:, None, :].double()       # (c, L, K, d): T_i - S_j
            norms = u.norm(dim=-1)                                             # (c, L, K)
            ok = (norms ** 2 > ZERO_REL * (t[:, None, 1:].double().pow(2).sum(-1) + s[:, 1:, None].double().pow(2).sum(-1))).all(-1).all(-1)
            unit = u / norms.clamp_min(1e-300)[..., None]
            cos = unit @ unit.transpose(-1, -2)                               # (c, L, K, K)
            mean = cos[:, :, upper].mean(dim=(1, 2)).clamp(-1, 1)[ok]         # (c',) per-token means
            index = ((mean + 1) / 2 * self.bins).floor().clamp(0, self.bins - 1).long()
            self._add({"n": torch.tensor(float(len(mean))), "n_degenerate": torch.tensor(float((~ok).sum())),
                       "sum_mean_cos": mean.sum(), "hist": torch.bincount(index, minlength=self.bins)})

    def mean(self) -> float | None:
        """The mean over tokens of the per-token mean cosine (None when no token counted)."""
        n = float(self._state["n"])
        return float(self._state["sum_mean_cos"]) / n if n else None

    def hist_frame(self) -> pd.DataFrame:
        edges = np.linspace(-1, 1, self.bins + 1)
        return pd.DataFrame({"bin_left": edges[:-1], "bin_right": edges[1:], "count": self._state["hist"].numpy().astype(np.int64)})


def frac_positive(hist: pd.DataFrame) -> float | None:
    """Share of the counts of a per-token mean cosine histogram (bin_left, bin_right, count) right of 0.

    The bins whose centre is positive: with an even number of equal bins on [-1, 1] (an edge at 0, up to
    rounding) the share of positive per-token means, a mean of exactly 0 aside. None when nothing was counted."""
    total = hist["count"].sum()
    right = (hist["bin_left"] + hist["bin_right"]) / 2 > 0
    return float(hist.loc[right, "count"].sum() / total) if total else None
