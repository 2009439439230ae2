"""The book's figure style: readable sizes, distinct colours, legends off the data, clean heat maps."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bistochastic import plotting  # noqa: E402


@pytest.fixture(autouse=True)
def _style():
    plotting.use_style()
    yield
    plt.close("all")


def test_style_fonts_and_dpi_readable():
    rc = matplotlib.rcParams
    # 10 pt at DPI dots per inch must be >= 10 px on screen (figures are shown at natural size)
    assert rc["xtick.labelsize"] * plotting.DPI / 72 >= 10
    assert rc["legend.fontsize"] >= 10
    assert rc["figure.figsize"][0] <= plotting.MAX_WIDTH_IN


def test_subplots_caps_width():
    fig, axes = plotting.subplots(1, 3)
    assert fig.get_size_inches()[0] <= plotting.MAX_WIDTH_IN
    with pytest.raises(ValueError, match="width"):
        plotting.subplots(1, 2, width=9)
    with pytest.raises(TypeError, match="figsize"):
        plotting.subplots(figsize=(5, 3))


@pytest.mark.parametrize("n", [1, 8, 12, 20])
def test_palette_distinct(n):
    cols = [np.array(mcolors.to_rgb(c)) for c in plotting.palette(n)]
    for i in range(n):
        for j in range(i):
            assert np.abs(cols[i] - cols[j]).max() > 0.1  # visibly different in some channel
    with pytest.raises(ValueError, match="n"):
        plotting.palette(21)


def test_sequential_ordered():
    cols = plotting.sequential(5)
    assert len(cols) == 5 and len(set(map(tuple, cols))) == 5
    with pytest.raises(ValueError):
        plotting.sequential(0)


@pytest.mark.parametrize("where", ["right", "below"])
def test_legend_outside_axes_does_not_cover_data(where):
    fig, ax = plotting.subplots()
    for i in range(6):
        ax.plot(np.arange(10), i * np.arange(10), label=f"s{i}")
    leg = plotting.legend_outside(ax, where)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    lb, ab = leg.get_window_extent(r), ax.get_window_extent(r)
    assert not lb.overlaps(ab)


def test_legend_outside_figure_dedupes_labels():
    fig, axes = plotting.subplots(1, 2)
    for ax in axes:
        ax.plot([0, 1], label="a")
        ax.plot([1, 0], label="b")
    leg = plotting.legend_outside(fig, "below")
    assert [t.get_text() for t in leg.get_texts()] == ["a", "b"]
    with pytest.raises(ValueError, match="where"):
        plotting.legend_outside(fig, "inside")


def test_heatmap_has_no_grid_lines():
    fig, ax = plotting.subplots()
    plotting.heatmap(ax, np.eye(4))
    assert not any(line.get_visible() for line in ax.get_xgridlines() + ax.get_ygridlines())
    with pytest.raises(ValueError, match="2-D"):
        plotting.heatmap(ax, np.ones(3))
