"""Figures on small synthetic tables: panels, readable labels, fixed colour scales, saving, bad input."""

from __future__ import annotations

import itertools

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import QuadMesh

from layergeo import plots
from layergeo.errors import LayergeoError

STUDENT_LAYERS = [0, 1, 2]
TEACHER_STATES = 4
TEACHER_TICKS = ["T0", "T1", "T2", "T3"]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def angles_frame(frac=0.62, layers=STUDENT_LAYERS, teachers=TEACHER_STATES) -> pd.DataFrame:
    """Values in a narrow range, so a data-driven colour scale would differ from the fixed one."""
    rows = [
        {
            "student_layer": layer,
            "teacher_i": i,
            "teacher_k": k,
            "frac_acute": frac + 0.01 * (k - i),
            "mean_angle_deg": 80.0 + k - i,
            "mean_cos": 0.1 + 0.01 * (k - i),
        }
        for layer in layers
        for i, k in itertools.combinations(range(teachers), 2)
    ]
    return pd.DataFrame(rows)


def tidy_frame() -> pd.DataFrame:
    """2 strategies x 2 inits x 2 checkpoints x 2 seeds; layer 0 at 0.0, layers 1, 2 at seed-dependent values."""
    frames = []
    for strategy, init, checkpoint, seed in itertools.product(["reverse", "forward"], ["random", "copy"], ["best", "init"], [0, 1]):
        frame = angles_frame(frac=0.6 + 0.1 * seed)
        frame.loc[frame["student_layer"] == 0, "frac_acute"] = 0.0
        frames.append(frame.assign(run=f"{strategy}-{init}-{seed}", strategy=strategy, init=init, checkpoint=checkpoint))
    return pd.concat(frames, ignore_index=True)


def colorbar_axes(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def heatmap_axes(fig):
    """Axes holding a heatmap, colorbars excluded."""
    return [
        ax for ax in fig.axes
        if ax.get_label() != "<colorbar>" and any(isinstance(c, QuadMesh) for c in ax.collections)
    ]


def ticks(labels):
    return [label.get_text() for label in labels]


# ---------------------------------------------------------------- labels and order


def test_labels_order_and_palette():
    assert plots.strategy_label("rail") == "RAIL (in-order random)"
    assert plots.strategy_label("my_map") == "my_map"
    assert plots.sort_strategies(["zeta", "reverse", "none", "forward", "reverse"]) == ["none", "forward", "reverse", "zeta"]
    assert list(plots.STRATEGY_PALETTE) == plots.STRATEGY_ORDER
    assert len(set(plots.STRATEGY_PALETTE.values())) == len(plots.STRATEGY_ORDER)


# linear-RGB colour-vision-deficiency simulations at full severity (Machado, Oliveira & Fernandes 2009)
DEFICIENCIES = {
    "deuteranopia": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]],
    "protanopia": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]],
    "tritanopia": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]],
}


def cielab(linear: np.ndarray) -> np.ndarray:
    """Linear sRGB (n, 3) -> CIELAB (n, 3), D65 white."""
    xyz = linear @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz /= [0.95047, 1.0, 1.08883]
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], -1)


def test_every_strategy_has_a_colour_of_its_own_for_every_reader():
    """Reverse and Random (shuffle) were two oranges 26 apart (13 under deuteranopia)."""
    rgb = np.array([matplotlib.colors.to_rgb(c) for c in plots.STRATEGY_PALETTE.values()])
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    pairs = np.triu_indices(len(rgb), 1)
    for vision, matrix, least in [("normal", np.eye(3), 40)] + [(name, m, 15) for name, m in DEFICIENCIES.items()]:
        lab = cielab(np.clip(linear @ np.array(matrix).T, 0, 1))
        assert np.linalg.norm(lab[:, None] - lab[None], axis=-1)[pairs].min() >= least, vision
    chroma = np.hypot(*cielab(linear)[:, 1:].T)
    assert chroma[0] < 1 and (chroma[1:] > 30).all()  # "none" grey, every matching strategy a hue


# ---------------------------------------------------------------- angle heatmaps


@pytest.mark.parametrize(
    "value, clim, label",
    [  # every value on one side of the scale's centre: the scale narrows to that side and says so
        ("frac_acute", (0.6, 1), "Fraction of acute angles\n(colour scale from 0.60: no value beyond it)"),
        ("mean_angle_deg", (0, 90), "Mean angle (degrees)\n(colour scale up to 90: no value beyond it)"),
        ("mean_cos", (0.1, 1), "Mean cosine of the angle\n(colour scale from 0.10: no value beyond it)"),
    ],
)
def test_angle_heatmaps_panels_ticks_and_scale(value, clim, label):
    fig = plots.angle_heatmaps(angles_frame(), value, title="Run A", with_embeddings=True)
    panels = heatmap_axes(fig)
    assert [ax.get_title() for ax in panels] == ["Student layer S0", "Student layer S1", "Student layer S2"]
    assert fig.get_suptitle() == "Run A"
    for ax in panels:
        assert ticks(ax.get_xticklabels()) == TEACHER_TICKS
        assert ticks(ax.get_yticklabels()) == TEACHER_TICKS
        assert ax.collections[0].get_clim() == pytest.approx(clim)
    (colorbar,) = colorbar_axes(fig)
    assert colorbar.get_ylabel() == label
    assert panels[0].get_ylabel() == "Teacher layer"
    assert "_" not in panels[0].get_xlabel()


def test_angle_heatmaps_leave_out_the_embedding_output_by_default():
    fig = plots.angle_heatmaps(angles_frame())
    panels = heatmap_axes(fig)
    assert [ax.get_title() for ax in panels] == ["Student layer S1", "Student layer S2"]
    assert all(ticks(ax.get_xticklabels()) == TEACHER_TICKS[1:] for ax in panels)


def test_angle_heatmaps_matrix_is_symmetric_with_blank_diagonal_and_annotated():
    fig = plots.angle_heatmaps(angles_frame(), with_embeddings=True)
    ax = heatmap_axes(fig)[0]
    cells = ax.collections[0].get_array().reshape(TEACHER_STATES, TEACHER_STATES)
    assert cells.mask.diagonal().all()
    assert cells[0, 3] == cells[3, 0] == pytest.approx(0.65)
    assert len(ax.texts) == TEACHER_STATES * (TEACHER_STATES - 1)  # every off-diagonal cell annotated
    big = plots.angle_heatmaps(angles_frame(layers=[1], teachers=9), with_embeddings=True)
    assert len(heatmap_axes(big)[0].texts) == 0  # 9 x 9: no annotation


def test_angle_heatmaps_wrap_to_four_columns():
    fig = plots.angle_heatmaps(angles_frame(layers=range(6)), with_embeddings=True)
    panels = heatmap_axes(fig)
    assert len(panels) == 6
    specs = [ax.get_subplotspec() for ax in panels]
    assert max(spec.colspan.start for spec in specs) == 3
    assert max(spec.rowspan.start for spec in specs) == 1
    assert len(colorbar_axes(fig)) == 1


def test_angle_heatmaps_bad_input():
    with pytest.raises(LayergeoError, match="unknown value 'median'"):
        plots.angle_heatmaps(angles_frame(), "median")
    with pytest.raises(LayergeoError, match="empty"):
        plots.angle_heatmaps(pd.DataFrame())
    with pytest.raises(LayergeoError, match="missing column.*teacher_k"):
        plots.angle_heatmaps(angles_frame().drop(columns="teacher_k"))


# ---------------------------------------------------------------- cosine histograms


def test_cosine_histograms_density_and_acute_fraction():
    edges = np.linspace(-1, 1, 5)
    hist = pd.DataFrame(
        [
            {"student_layer": layer, "bin_left": lo, "bin_right": hi, "count": count}
            for layer, counts in [(0, [1, 1, 1, 1]), (1, [0, 1, 1, 2])]
            for lo, hi, count in zip(edges[:-1], edges[1:], counts)
        ]
    )
    fig = plots.cosine_histograms(hist, title="Cosines", with_embeddings=True)
    (ax,) = fig.axes
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["S0: 50.0% acute", "S1: 75.0% acute"]
    assert ax.get_xlim() == (-1, 1)
    assert fig.get_suptitle() == "Cosines (S0–S1, every teacher pair, T0's included)"
    assert any(text.get_text() == "right angle" for text in ax.texts)
    layer_lines = [line for line in ax.get_lines() if line.get_label().startswith("S")]
    for line in layer_lines:
        assert np.sum(line.get_ydata() * 0.5) == pytest.approx(1)  # densities integrate to 1
    zero_line = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert list(zero_line[0].get_xdata()) == [0, 0]
    with pytest.raises(LayergeoError, match="empty"):
        plots.cosine_histograms(hist.iloc[:0])
    by_strategy = hist.assign(strategy=hist["student_layer"].map({0: "reverse", 1: "forward"}))
    (ax,) = plots.cosine_histograms(by_strategy, by="strategy", with_embeddings=True).axes
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["Forward: 75.0% acute", "Reverse: 50.0% acute"]
    default = plots.cosine_histograms(by_strategy, title="Cosines", by="strategy")  # student layers >= 1: forward's S1
    assert [text.get_text() for text in default.axes[0].get_legend().get_texts()] == ["Forward: 75.0% acute"]
    assert default.get_suptitle() == "Cosines (S1, every teacher pair, T0's included)"


def strategy_histograms(counts: dict[str, list[int]]) -> pd.DataFrame:
    edges = np.linspace(-1, 1, 5)
    return pd.DataFrame([{"strategy": strategy, "student_layer": layer, "bin_left": lo, "bin_right": hi, "count": count}
                         for strategy, per_bin in counts.items() for layer in (1, 2)
                         for lo, hi, count in zip(edges[:-1], edges[1:], per_bin)])


def test_identical_cosine_histograms_are_one_line_that_says_so():
    same = strategy_histograms({s: [0, 1, 3, 4] for s in ("none", "forward", "reverse", "shuffle", "rail", "all_to_one")})
    (ax,) = plots.cosine_histograms(same, title="Untrained", by="strategy").axes
    assert len([line for line in ax.get_lines() if line.get_linestyle() == "-"]) == 1
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["All 6 strategies (identical): 87.5% acute"]
    apart = strategy_histograms({"none": [0, 1, 3, 4], "forward": [0, 1, 4, 3]})
    (ax,) = plots.cosine_histograms(apart, by="strategy").axes
    assert len(ax.get_legend().get_texts()) == 2


def title_inside(fig) -> bool:
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent()
    return box.x0 >= 0 and box.x1 <= fig.bbox.width


def test_a_long_cosine_histogram_title_is_wrapped_inside_the_figure():
    hist = strategy_histograms({"none": [0, 1, 3, 4], "forward": [0, 1, 4, 3]})
    fig = plots.cosine_histograms(hist, "Cosines seen from the student (decoder stack): Randomly initialised, Untrained",
                                  by="strategy")
    assert title_inside(fig) and "\n" in fig.get_suptitle()


def test_the_authors_histogram_is_rebinned_to_a_density_with_the_positive_share_per_strategy():
    edges = np.linspace(-1, 1, 1001)
    rng = np.random.default_rng(3)
    counts = {"forward": rng.integers(0, 5, 1000), "reverse": np.r_[np.zeros(500, int), rng.integers(0, 5, 500)]}
    hist = pd.DataFrame([{"strategy": s, "bin_left": lo, "bin_right": hi, "count": c}
                         for s, per_bin in counts.items() for lo, hi, c in zip(edges[:-1], edges[1:], per_bin)])
    fig = plots.token_mean_cosine_histograms(pd.concat([hist, hist]), "Trained", by="strategy")  # two runs a strategy
    (ax,) = fig.axes
    share = counts["forward"][500:].sum() / counts["forward"].sum()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [f"Forward: {share:.1%} positive", "Reverse: 100.0% positive"]
    for line in ax.get_lines():
        if line.get_linestyle() == "-":
            assert len(line.get_xdata()) == 100 and np.sum(line.get_ydata() * 0.02) == pytest.approx(1)
    forward = [line for line in ax.get_lines() if line.get_label().startswith("Forward")][0]
    assert forward.get_ydata()[0] == pytest.approx(counts["forward"][:10].sum() / counts["forward"].sum() / 0.02)
    assert fig.get_suptitle() == "Trained" and ax.get_xlim() == (-1, 1)
    one = plots.token_mean_cosine_histograms(hist[hist.strategy == "reverse"].drop(columns="strategy"), bins=6)  # 1000 % 6: as is
    (ax,) = one.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["All tokens: 100.0% positive"]
    assert len(ax.get_lines()[0].get_xdata()) == 1000
    with pytest.raises(LayergeoError, match="empty"):
        plots.token_mean_cosine_histograms(hist.iloc[:0])
    with pytest.raises(LayergeoError, match="even"):  # 25 bins would put one across 0
        plots.token_mean_cosine_histograms(hist, by="strategy", bins=25)


def test_budget_differences_space_the_budgets_evenly_and_fill_the_called_ones():
    rows = [{"budget": b, "task": "bbc_news", "init": "copy", "strategy": s, "mean_diff": d, "ci_low": d - w,
             "ci_high": d + w, "answer": "better" if d - w > 0 else "not distinguishable"}
            for b, (d, w) in zip([32, 320, 371], [(1.0, 3.0), (4.0, 1.0), (0.5, 2.0)]) for s in ("forward", "reverse")]
    fig = plots.budget_differences(pd.DataFrame(rows), "test_accuracy")
    (ax,) = [a for a in fig.axes if a.get_visible() and a.axison]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "320", "371"] and list(ax.get_xticks()) == [0, 1, 2]
    forward = [line for line in ax.get_lines() if line.get_marker() == "o" and line.get_color() == plots.STRATEGY_PALETTE["forward"]]
    filled = [line.get_markerfacecolor() != "white" for line in forward]
    assert filled == [False, True, False]
    assert [round(line.get_xdata()[0] + 0.045, 6) for line in forward] == [0, 1, 2]  # dodged left of the tick
    assert "\n" in fig.get_suptitle()  # wrapped to the figure's width


def test_an_unbounded_interval_is_a_dotted_line_over_the_panel_and_said_so():
    rows = [{"budget": 32, "task": "bbc_news", "init": "random", "strategy": "forward", "mean_diff": 0.5,
             "ci_low": -np.inf, "ci_high": np.inf, "answer": "not distinguishable"},
            {"budget": 32, "task": "bbc_news", "init": "random", "strategy": "reverse", "mean_diff": 1.0,
             "ci_low": -2.0, "ci_high": 4.0, "answer": "not distinguishable"}]

    def dotted_spans(ax):
        return [segment[:, 1].tolist() for c in ax.collections if c.get_linestyle()[0][1] is not None
                for segment in c.get_segments()]

    fig = plots.budget_differences(pd.DataFrame(rows), "test_accuracy")
    (ax,) = [a for a in fig.axes if a.get_visible() and a.axison]
    low, high = ax.get_ylim()
    assert "dotted: unbounded (the same difference on every seed)" in fig.get_suptitle().replace("\n", " ")
    assert -3 < low < -2 and 4 < high < 5                    # the finite bar sets the scale, not the unbounded one
    assert dotted_spans(ax) == [[low, high]]
    assert "dotted" not in plots.budget_differences(pd.DataFrame(rows[1:]), "test_accuracy").get_suptitle()
    diffs, spreads, acute, trained = verdict_tables(1.0)
    diffs.loc[0, ["ci_low", "ci_high"]] = -np.inf, np.inf
    a = plots.verdict_panels(diffs, spreads, acute, trained, "test_accuracy").axes[0]
    assert a.get_title(loc="left") == "(a) Holm 99.75% t intervals, dotted: unbounded (the same difference on every seed)"
    assert a.get_ylim()[1] < 5 and dotted_spans(a) == [list(a.get_ylim())]


def test_verdict_panels_give_a_one_stack_task_its_row_beside_an_encoder_decoder_one():
    diffs, spreads, acute, trained = verdict_tables(1.0)
    other = {"task": "bbc_news"}
    diffs, spreads = pd.concat([diffs, diffs.assign(**other)]), pd.concat([spreads, spreads.assign(**other)])
    acute = pd.concat([acute.assign(stack=np.nan), acute.assign(stack="encoder", **other), acute.assign(stack="decoder", **other)])
    trained = pd.concat([trained.assign(stack=np.nan), trained.assign(stack="encoder", **other),
                         trained.assign(stack="decoder", **other)])
    fig = plots.verdict_panels(diffs, spreads, acute, trained, "test_accuracy")
    titles = [ax.get_title(loc="left")[:19] for ax in fig.axes if ax.axison]
    assert titles.count("(c, encoder stack) ") == 2 and titles.count("(c, decoder stack) ") == 2
    assert sum(t.startswith("(c) ") for t in titles) == 2        # the one-stack task: one (c) row, the spare row empty


# ---------------------------------------------------------------- generic matrix


def test_a_long_heatmap_title_is_wrapped_inside_the_figure(tmp_path):
    title = "Structured cosine of layer transitions: rotten_tomatoes_copy_forward_seed0"
    fig = plots.matrix_heatmap(np.eye(3), ["S0", "S1", "S2"], ["S0", "S1", "S2"], title, "Mean cosine", vmin=-1, vmax=1)
    assert title_inside(fig) and "\n" in fig.get_suptitle()


def test_matrix_heatmap_fixed_scale_nan_and_labels():
    matrix = np.array([[0.91, 0.92, np.nan], [0.93, 0.94, 0.95]])
    fig = plots.matrix_heatmap(
        matrix, ["S0", "S1"], ["T0", "T1", "T2"], "Linear CKA", "CKA", vmin=0, vmax=1,
        xlabel="Teacher layer", ylabel="Student layer",
    )
    ax = fig.axes[0]
    assert fig.get_suptitle() == "Linear CKA"
    assert ticks(ax.get_xticklabels()) == ["T0", "T1", "T2"]
    assert ticks(ax.get_yticklabels()) == ["S0", "S1"]
    assert ax.collections[0].get_clim() == (0, 1)
    assert ax.collections[0].get_array().reshape(2, 3).mask[0, 2]
    assert len(ax.texts) == 5
    assert fig.axes[1].get_ylabel() == "CKA"
    with pytest.raises(LayergeoError, match="labels"):
        plots.matrix_heatmap(matrix, ["S0"], ["T0", "T1", "T2"], "t", "c")
    with pytest.raises(LayergeoError, match="non-empty"):
        plots.matrix_heatmap(np.zeros((0, 3)), [], ["T0", "T1", "T2"], "t", "c")


# ---------------------------------------------------------------- comparisons


def test_comparison_grid_facets_labels_scale_and_averaging():
    fig = plots.comparison_grid(tidy_frame())
    spans = [(ax.get_subplotspec(), ax) for ax in heatmap_axes(fig)]
    grid = {(spec.rowspan.start, spec.colspan.start): ax for spec, ax in spans}
    assert len(grid) == 8  # 4 (init, checkpoint) rows x 2 strategies
    assert [grid[0, c].get_title() for c in range(2)] == ["Forward", "Reverse"]
    row_labels = [grid[r, 0].get_ylabel() for r in range(4)]
    same = "\n(the same for every strategy)"  # the frame gives both strategies the same values
    assert row_labels == [
        "Weights copied\nUntrained" + same, "Weights copied\nTrained" + same,
        "Randomly initialised\nUntrained" + same, "Randomly initialised\nTrained" + same,
    ]
    tidy = tidy_frame()
    tidy.loc[(tidy.strategy == "reverse") & (tidy.checkpoint == "best"), "frac_acute"] += 0.05
    labels = {ax.get_ylabel() for ax in heatmap_axes(plots.comparison_grid(tidy))}
    assert labels == {"Weights copied\nUntrained" + same, "Weights copied\nTrained", "Randomly initialised\nUntrained" + same,
                      "Randomly initialised\nTrained", ""}
    assert "mean over student layers S1–S2 and runs" in fig.get_suptitle()
    for ax in grid.values():
        assert ax.collections[0].get_clim() == pytest.approx((0.65, 1))  # the least mean drawn is 0.66
        assert ticks(ax.get_xticklabels()) == TEACHER_TICKS[1:]  # teacher layers >= 1 by default
    # layer 0 (0.0) left out; runs at 0.6 and 0.7 (+ 0.01 (k - i)) averaged
    cells = grid[0, 0].collections[0].get_array().reshape(TEACHER_STATES - 1, TEACHER_STATES - 1)
    assert cells[0, 1] == pytest.approx(0.66)
    assert len(colorbar_axes(fig)) == 1


def test_heatmap_scales_narrow_only_when_every_value_is_on_one_side_of_the_centre():
    full = plots.VALUE_SCALES["frac_acute"]
    assert plots._zoomed(full, np.array([0.3, 0.9, np.nan])) is full  # both sides: the fixed scale
    assert plots._zoomed(full, np.array([np.nan])) is full
    high = plots._zoomed(full, np.array([0.83, 0.97, np.nan]))
    assert (high.vmin, high.vmax, high.center) == (0.8, 1, 0.8) and high.ticks == pytest.approx((0.8, 0.85, 0.9, 0.95, 1))
    assert plots._zoomed(full, np.array([1.0, 1.0])).vmin == pytest.approx(0.95)  # never an empty range
    assert plots._zoomed(full, np.array([0.76, 0.9])).ticks == pytest.approx((0.75, 0.8, 0.85, 0.9, 0.95, 1))  # round ticks
    low = plots._zoomed(full, np.array([0.02, 0.31]))
    assert (low.vmin, low.vmax, low.center) == (0, 0.35, 0.35) and "up to 0.35" in low.label
    both_sides = pd.concat([angles_frame(frac=0.2), angles_frame(frac=0.7)])  # cells average to 0.46-0.5
    both_sides.loc[both_sides.student_layer == 1, "frac_acute"] = 0.9
    fig = plots.angle_heatmaps(both_sides, "frac_acute", with_embeddings=True)
    assert heatmap_axes(fig)[0].collections[0].get_clim() == (0, 1)
    assert colorbar_axes(fig)[0].get_ylabel() == "Fraction of acute angles"


def test_comparison_grid_with_the_embedding_output_averages_it_in_and_says_so():
    fig = plots.comparison_grid(tidy_frame(), with_embeddings=True)
    assert "mean over student layers S0–S2 and runs" in fig.get_suptitle()
    ax = heatmap_axes(fig)[0]
    assert ticks(ax.get_xticklabels()) == TEACHER_TICKS
    cells = ax.collections[0].get_array().reshape(TEACHER_STATES, TEACHER_STATES)
    assert cells[0, 1] == pytest.approx(np.mean([(0.0 + 2 * (0.61 + 0.1 * seed)) / 3 for seed in (0, 1)]))


def test_comparison_grid_missing_cell_and_bad_value():
    tidy = tidy_frame()
    tidy = tidy[~((tidy["strategy"] == "reverse") & (tidy["init"] == "random"))]
    fig = plots.comparison_grid(tidy, value="mean_angle_deg")
    heatmaps = heatmap_axes(fig)
    assert len(heatmaps) == 6
    assert heatmaps[0].collections[0].get_clim() == (0, 90)  # every mean angle below 90 degrees
    assert sum(text.get_text() == "no runs" for ax in fig.axes for text in ax.texts) == 2
    with pytest.raises(LayergeoError, match="unknown value"):
        plots.comparison_grid(tidy, value="frac")
    with pytest.raises(LayergeoError, match="empty"):
        plots.comparison_grid(tidy.iloc[:0])


def test_a_grid_of_every_strategy_wraps_to_page_width_and_thins_what_would_not_read():
    strategies = list(plots.STRATEGY_ORDER)  # 7
    frames = [angles_frame(teachers=7).assign(run=f"{s}-{init}", strategy=s, init=init, checkpoint=checkpoint)
              for s in strategies for init in ("copy", "random") for checkpoint in ("init", "best")]
    fig = plots.comparison_grid(pd.concat(frames, ignore_index=True))
    panels = heatmap_axes(fig)
    assert len(panels) == 7 * 4 and fig.get_figwidth() <= 12.5  # 4 columns, two blocks of rows (was 7 columns, 24 inches)
    assert max(ax.get_subplotspec().colspan.start for ax in panels) == 3
    assert sorted(ax.get_title() for ax in panels if ax.get_title()) == sorted(plots.strategy_label(s) for s in strategies)
    assert all(len(ax.texts) == 30 for ax in panels)  # T1-T6 (6 states by default): values written in the cells
    deep = angles_frame(teachers=31).assign(run="r", strategy="forward", init="copy", checkpoint="best")
    ax = heatmap_axes(plots.comparison_grid(deep))[0]  # T1-T30: no values, every 5th state labelled
    assert len(ax.texts) == 0 and [t for t in ticks(ax.get_xticklabels()) if t] == [f"T{5 * t}" for t in range(1, 7)]
    assert title_inside(fig)


def summary_frame() -> pd.DataFrame:
    tidy = tidy_frame()
    return tidy.groupby(["run", "strategy", "init", "checkpoint"], as_index=False)["frac_acute"].mean()


def test_acute_fraction_points():
    fig = plots.acute_fraction_points(summary_frame())
    assert [ax.get_title() for ax in fig.axes] == ["Weights copied", "Randomly initialised"]
    values = summary_frame()["frac_acute"]
    for ax in fig.axes:
        low, high = ax.get_ylim()
        assert low < values.min() and values.max() < high <= 1.1  # the data's range, with room above 1.0 markers
        assert ticks(ax.get_xticklabels()) == ["Forward", "Reverse"]
        assert any(list(line.get_ydata()) == [0.5, 0.5] for line in ax.get_lines())  # chance level is in range here
    # a table without a cells column was written by older code, whose frac_acute covered every cell
    assert fig.axes[0].get_ylabel() == "Fraction of acute angles\n(every measured layer,\nembedding output included)"
    assert fig.get_figwidth() < 8  # panels one above the other, the key below them
    handles = fig.legends[0].legend_handles
    assert [text.get_text() for text in fig.legends[0].get_texts()][:2] == ["Untrained: mean", "Trained: mean"]
    assert handles[0].get_marker() != handles[1].get_marker() and handles[0].get_color() != handles[1].get_color()
    with pytest.raises(LayergeoError, match="missing column.*checkpoint"):
        plots.acute_fraction_points(summary_frame().drop(columns="checkpoint"))


def test_acute_fraction_points_facet_tasks_name_the_cells_and_keep_a_flat_one_inside_0_1():
    summary = pd.concat([summary_frame().assign(task=task, frac_acute=1.0, cells=f"S1–S{depth}, teacher pairs among T1–T6")
                         for task, depth in (("rotten_tomatoes", 3), ("bbc_news", 2))])
    fig = plots.acute_fraction_points(summary)
    assert [ax.get_title() for ax in fig.axes] == ["BBC News, weights copied", "BBC News, randomly initialised",
                                                   "Rotten Tomatoes, weights copied", "Rotten Tomatoes, randomly initialised"]
    assert [fig.axes[i].get_ylabel().replace("\n", " ") for i in (0, 2)] == [
        "Fraction of acute angles (S1–S2, teacher pairs among T1–T6)", "Fraction of acute angles (S1–S3, teacher pairs among T1–T6)"]
    for ax in fig.axes:
        low, high = ax.get_ylim()
        assert low < 1.0 < high <= 1.05 and all(0 <= t <= 1 for t in ax.get_yticks())


def test_metric_points_mean_and_std():
    results = pd.DataFrame(
        [
            {"strategy": strategy, "init": init, "task": task, "value": 0.7 + 0.1 * seed}
            for strategy in ["reverse", "forward"]
            for init in ["copy", "random"]
            for task in ["rotten_tomatoes", "bbc_news"]
            for seed in [0, 1]
        ]
    )
    results.loc[results.init == "copy", "value"] += 20  # copied students far above: each init gets its own axis
    fig = plots.metric_points(results, "Test accuracy")
    assert [ax.get_title() for ax in fig.axes] == ["BBC News, weights copied", "Rotten Tomatoes, weights copied",
                                                   "BBC News, randomly initialised", "Rotten Tomatoes, randomly initialised"]
    ax = fig.axes[2]
    assert ax.get_ylabel() == "Test accuracy"
    assert ticks(ax.get_xticklabels()) == ["Forward", "Reverse"]
    means = [line for line in ax.get_lines() if line.get_marker() == "D"]  # the random init's marker, as in the legend
    assert len(means) == 2 and all(line.get_ydata()[0] == pytest.approx(0.75) for line in means)
    for ax, (low, high) in zip(fig.axes, [(20.7, 20.8)] * 2 + [(0.7, 0.8)] * 2):
        bottom, top = ax.get_ylim()
        assert bottom <= low and high <= top and top - bottom < 1  # the panel spans its own init's values only
    assert fig.get_figwidth() < 8  # panels one above the other, the key below them
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend == ["Weights copied: mean", "Randomly initialised: mean", "Small dot: one run", "Bar: lowest to highest seed"]
    bars = [c for c in ax.collections if isinstance(c, matplotlib.collections.LineCollection)]
    assert bars and all(seg[:, 1].min() == pytest.approx(0.7) and seg[:, 1].max() == pytest.approx(0.8)
               for c in bars for seg in c.get_segments())  # two seeds: the bar spans them (a std would pass both)


def test_metric_points_draw_the_majority_class_rate_and_std_bars_from_three_seeds():
    results = pd.DataFrame([{"strategy": strategy, "init": "copy", "task": "rotten_tomatoes", "value": 60.0 + seed,
                             "majority": 61.0} for strategy in ["none", "reverse"] for seed in range(3)])
    fig = plots.metric_points(results, "Test accuracy (%)")
    ax = fig.axes[0]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_ydata()[0] == pytest.approx(61.0)
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend[-2:] == ["Bar: ± one std over seeds", "Majority-class rate"]
    far = plots.metric_points(results.assign(majority=20.0), "Test accuracy (%)").axes[0]  # would squash 60-62
    assert not [line for line in far.get_lines() if line.get_linestyle() == "--"] and far.get_ylim()[0] > 50
    assert far.get_xlabel() == "Layer-matching strategy\n(majority-class rate 20.0, below the axis)"


def test_loss_curves_panels_palette_and_log_scale():
    steps = np.arange(1, 6)
    metrics = pd.DataFrame(
        [
            {"strategy": strategy, "step": step, "term": term, "value": value}
            for strategy in ["reverse", "forward"]
            for step in steps
            for term, value in [("ce", 1.0 / step**2), ("hidden", (2.0 if strategy == "forward" else 2.2) / step),
                                ("lr", 0.0 if step == 5 else 1e-4)]
        ]
    )
    fig = plots.loss_curves(metrics, title="Training")
    titles = [ax.get_title() for ax in fig.axes]  # identical curves are said to be (a reader sees one line)
    assert titles == ["Cross-entropy with labels\n(all 2 curves overlap)", "Hidden-state loss", "Learning rate\n(all 2 curves overlap)"]
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "linear", "linear"]  # log only past a decade, and positive
    colors = [line.get_color() for line in fig.axes[0].get_lines()]
    assert colors == [plots.STRATEGY_PALETTE["forward"], plots.STRATEGY_PALETTE["reverse"]]
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend == ["Forward", "Reverse"]
    assert fig.legends[0].get_title().get_text() == "Strategy"
    settings = metrics.assign(strategy=metrics.strategy.map({"forward": "lr 1e-4", "reverse": "lr 5e-4"}))
    assert plots.loss_curves(settings).legends[0].get_title().get_text() == ""  # settings are not strategies
    assert plots.loss_curves(settings, legend_title="Setting").legends[0].get_title().get_text() == "Setting"


def test_overlap_note_reads_log_panels_on_their_log_scale():
    steps = np.arange(1, 11)
    panel = pd.DataFrame([{"strategy": s, "step": k, "value": v} for k in steps
                          for s, v in [("forward", 1000.0 / k**3), ("reverse", 1000.0 / k**3 + 0.5)]])
    assert plots._overlap_note(panel, log=False) == "(all 2 curves overlap)"  # 0.5 in a range of 1000
    assert plots._overlap_note(panel, log=True) == ""  # 1.0 vs 1.5 at step 10: apart on the log scale
    assert plots._overlap_note(panel[panel.strategy == "forward"], log=False) == ""  # one curve overlaps nothing


def trace_table(seeds=(0,), inits=("copy",)) -> pd.DataFrame:
    rows = [{"strategy": strategy, "init": init, "seed": seed, "step": step, "frac_acute": 1.0, "pulls_aligned": 1.0,
             "thales_ratio": 2.0 - 0.1 * step, "matched": 5.0 - step, "own_pull_vs_ce": 0.1 * step,
             "cells": "S1–S3, teacher pairs among T1–T6"}
            for strategy in ("none", "forward") for init in inits for seed in seeds for step in range(4)]
    return pd.DataFrame(rows)


def test_trace_comparison_says_seed_init_and_cells_and_keeps_fractions_inside_0_1():
    fig = plots.trace_comparison(trace_table())
    assert fig.get_suptitle().replace("\n", " ") == ("Geometry along training on the probe set: weights copied, seed 0; "
                                                     "angles at S1–S3, teacher pairs among T1–T6")
    panels = [ax for ax in fig.axes if ax.get_ylabel()]
    assert len(panels) == 5 and {ax.get_subplotspec().rowspan.start for ax in panels} == {0, 1}  # two rows
    for ax in panels[:2]:  # the acute fraction and the aligned pulls, 1.0 throughout
        low, high = ax.get_ylim()
        assert low < 1.0 < high <= 1.05 and all(0 <= t <= 1 for t in ax.get_yticks())
    assert [ax.get_title() for ax in panels] == ["(all 2 curves overlap)"] * 5  # None and Forward traced alike
    apart = trace_table()
    apart.loc[apart.strategy == "forward", "matched"] -= 1.0
    panels = [ax for ax in plots.trace_comparison(apart).axes if ax.get_ylabel()]
    assert [ax.get_title() for ax in panels] == ["(all 2 curves overlap)"] * 3 + ["", "(all 2 curves overlap)"]
    assert [ax.get_ylabel() for ax in panels][3] == "Distance to the matched layer\n(None: to the forward targets)"
    legend = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert legend == ["None", "Forward"]  # the one init is in the title, not a line-style entry
    two = plots.trace_comparison(trace_table(seeds=(0, 1), inits=("copy", "random")))
    assert "weights copied and randomly initialised, mean over 2 seeds" in two.get_suptitle().replace("\n", " ")


def verdict_tables(difference: float):
    strategies = ["forward", "reverse", "all_to_one", "shuffle", "rail"]
    diffs = pd.DataFrame([{"task": "rotten_tomatoes", "init": "random", "strategy": s, "mean_diff": difference,
                           "ci_low": difference - abs(difference), "ci_high": difference + abs(difference), "ci_level": 0.9975}
                          for s in strategies])
    spreads = pd.DataFrame([{"task": "rotten_tomatoes", "init": "random", "spread": 0.0, "p_permutation": 1.0}])
    acute = pd.DataFrame([{"task": "rotten_tomatoes", "init": "random", "acute_spearman_rho": np.nan, "acute_spearman_p": np.nan,
                           "ratio_spearman_rho": 0.1, "ratio_spearman_p": 0.5, "cells": "S1–S3, teacher pairs among T1–T6"}])
    trained = pd.DataFrame([{"run": f"{s}{seed}", "task": "rotten_tomatoes", "init": "random", "strategy": s, "seed": seed, "frac_acute": 1.0,
                             "thales_ratio": 3.0 + seed, "test_accuracy": 70.0 + seed}
                            for s in ["none", *strategies] for seed in range(3)])
    return diffs, spreads, acute, trained


def test_verdict_panels_read_at_page_width_and_say_what_their_bars_are():
    fig = plots.verdict_panels(*verdict_tables(0.0), "test_accuracy")
    assert fig.get_figwidth() <= 15  # two panels a row (four were 24 inches wide)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles[:2] == ["(a) no interval: every difference 0",
                          "(b) spread 0.0 among matching strategies (None aside)\nwithin-seed p = 1"]
    assert titles[2:4] == ["(c) ρ undefined: every matching student at 1.000\n(None drawn, not counted)",
                           "(c) ρ = 0.10, p = 0.5 over matching students\n(None drawn, not counted)"]
    acute_panel = next(ax for ax in fig.axes if ax.get_xlabel().startswith("Fraction of acute angles"))
    assert acute_panel.get_xlabel() == "Fraction of acute angles, trained\n(S1–S3, teacher pairs among T1–T6)"
    low, high = acute_panel.get_xlim()
    assert low < 1.0 < high <= 1.05 and all(0 <= t <= 1 for t in acute_panel.get_xticks())  # every student at 1.0
    key = [t.get_text() for t in fig.legends[0].get_texts()]
    assert key[-3:] == ["(b) mean over seeds", "(b) one seed", "(b) bar: ± one std over seeds"]
    fig.canvas.draw()
    for text in [ax.title for ax in fig.axes] + [ax._left_title for ax in fig.axes] + [fig.subfigs[0]._suptitle]:
        box = text.get_window_extent()
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width
    assert plots.verdict_panels(*verdict_tables(1.0), "test_accuracy").axes[0].get_title(loc="left") == \
        "(a) Holm 99.75% t intervals"
    wide = plots.verdict_panels(*verdict_tables(80.0), "test_accuracy").axes[0]  # intervals 0 to 160 points
    assert wide.get_title(loc="left") == "(a) Holm 99.75% t intervals, bars cut at ±100" and wide.get_ylim()[1] == 105


def test_verdict_panels_give_each_stack_its_own_claim_c_row_and_count_each_student_once():
    diffs, spreads, acute, trained = verdict_tables(1.0)
    stacks = {"encoder": (0.9, 0.2), "decoder": (0.7, -0.3)}
    acute = pd.concat([acute.assign(stack=stack, ratio_spearman_rho=rho) for stack, (_, rho) in stacks.items()])
    trained = pd.concat([trained.assign(stack=stack, frac_acute=frac) for stack, (frac, _) in stacks.items()])
    fig = plots.verdict_panels(diffs, spreads, acute, trained, "test_accuracy")
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles[2:] == ["(c, encoder stack) ρ undefined: every matching student at 0.900\n(None drawn, not counted)",
                          "(c, encoder stack) ρ = 0.20, p = 0.5 over matching students\n(None drawn, not counted)",
                          "(c, decoder stack) ρ undefined: every matching student at 0.700\n(None drawn, not counted)",
                          "(c, decoder stack) ρ = -0.30, p = 0.5 over matching students\n(None drawn, not counted)"]
    one_stack = plots.verdict_panels(*verdict_tables(1.0), "test_accuracy")
    seeds = lambda figure: sum(len(c.get_offsets()) for c in figure.axes[1].collections)
    assert seeds(fig) == seeds(one_stack)  # panel (b): a student measured in two stacks is still one dot


# ---------------------------------------------------------------- saving


def test_save_figure_writes_png_and_pdf_atomically(tmp_path):
    fig = plots.angle_heatmaps(angles_frame())
    paths = plots.save_figure(fig, tmp_path / "figs" / "angles.run1")
    assert paths == [tmp_path / "figs" / "angles.run1.png", tmp_path / "figs" / "angles.run1.pdf"]
    assert all(path.stat().st_size > 0 for path in paths)
    assert paths[0].read_bytes().startswith(b"\x89PNG")
    assert paths[1].read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["angles.run1.pdf", "angles.run1.png"]
    assert not plt.fignum_exists(fig.number)


def test_levels_outside_the_palette_never_share_a_colour():
    from layergeo.plots import STRATEGY_PALETTE, _colors

    for n in (2, 3, 7):
        levels = ["none"] + [f"setting {i}" for i in range(n)]
        colors = _colors(levels, STRATEGY_PALETTE)
        assert colors["none"] == STRATEGY_PALETTE["none"] and len(set(colors.values())) == len(levels)


def test_figures_redrawn_from_saved_tables(tmp_path):
    from layergeo.figures import main as figures_main

    rows = [{"run": f"{s}{i}{seed}", "task": "rotten_tomatoes", "init": i, "strategy": s, "seed": seed,
             "test_accuracy": 60.0 + seed, "dev_accuracy": 61.0}
            for s in ("none", "forward") for i in ("copy", "random") for seed in (0, 1)]
    pd.DataFrame(rows).to_csv(tmp_path / "results_all.csv", index=False)
    acute = pd.DataFrame([{**{k: r[k] for k in ("run", "strategy", "init", "seed", "task")}, "checkpoint": c, "frac_acute": 0.9}
                          for r in rows for c in ("init", "best")])
    acute.to_csv(tmp_path / "acute_summary.csv", index=False)
    assert figures_main(["--results", str(tmp_path / "results_all.csv"), "--acute", str(tmp_path / "acute_summary.csv"),
                         "--out", str(tmp_path / "plots")]) == 0
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == sorted(f"{stem}.{ext}" for stem in ("acute_fraction_by_strategy", "dev_accuracy_by_strategy",
                                                        "test_accuracy_by_strategy") for ext in ("png", "pdf"))


def test_claim_c_titles_say_why_rho_is_undefined():
    corr = pd.DataFrame([{"acute_spearman_p": 0.04}])
    assert plots._correlation_text(0.5, corr, "acute", pd.Series([0.9, 0.95])) == "ρ = 0.50, p = 0.04 over matching students"
    assert plots._correlation_text(np.nan, corr, "acute", pd.Series([1.0, 1.0])) == "ρ undefined: every matching student at 1.000"
    assert plots._correlation_text(np.nan, corr, "acute", pd.Series([0.9, 0.95])) == "ρ undefined over matching students"
