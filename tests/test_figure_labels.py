"""Every paper figure can be read at its default size: no two of its texts overlap (tick labels inside the
view, axis labels, titles, annotations, legend entries; experiments.plots.overlapping_texts compares their drawn
bounding boxes, label.get_window_extent after fig.canvas.draw()).

`python -m experiments.figures --paper` spends ~2 minutes on 2 cores in its sweeps, so the test draws each
figure through the same code (figures_from_results, run_experiment for paper_flash) from the results tables that
command wrote beside the committed figures: docs/figures/<name>.csv, the rows of docs/figures/<name>.png."""

from pathlib import Path

import matplotlib
import pytest

from experiments import plots
from experiments.figures import PAPER, figures_from_results, load_results, run_experiment

matplotlib.use("Agg")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "figures"
SWEEPS = [n for n in PAPER if n != "paper_flash"]


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """{figure name: overlapping text pairs} for every figure the paper figure generation saves."""
    out, found = tmp_path_factory.mktemp("figs"), {}
    real_save = plots.save

    def check_and_save(fig, out_dir, name, formats=("png", "pdf")):
        found[name] = plots.overlapping_texts(fig)
        found[name + ":paper_marks"] = sum(1 for a in fig.axes for p in a.patches if p.get_hatch()) + \
            sum(1 for a in fig.axes for line in a.lines if str(line.get_label()).startswith("paper"))
        return real_save(fig, out_dir, name, formats=("png",))

    mp = pytest.MonkeyPatch()
    mp.setattr(plots, "save", check_and_save)
    try:
        figures_from_results(load_results([DOCS / f"{n}.csv" for n in SWEEPS]), out, flash=False)
        run_experiment("paper_flash", out)
    finally:
        mp.undo()
    return found


def test_the_committed_figures_and_their_tables_exist():
    for name in PAPER:
        assert (DOCS / f"{name}.png").stat().st_size > 10_000, name
    for name in SWEEPS:
        assert (DOCS / f"{name}.csv").exists(), name


@pytest.mark.parametrize("name", PAPER)
def test_no_text_overlaps_in_a_paper_figure(drawn, name):
    assert name in drawn, f"{name} was not drawn"
    assert drawn[name] == [], f"{name}: overlapping texts {drawn[name][:5]}"


@pytest.mark.skipif(not plots.paper_record(), reason="conf/paper/llm_in_a_flash.yaml is not there")
@pytest.mark.parametrize("name", PAPER)
def test_the_papers_own_values_are_marked(drawn, name):
    assert drawn[f"{name}:paper_marks"] > 0


def test_the_check_sees_overlapping_labels():
    """It can fail: long tick labels on narrow bars (the old breakdown's knobs under every bar) overlap."""
    plt = plots._plt()
    fig, ax = plt.subplots(figsize=(3, 3))
    ax.bar(range(6), range(6))
    ax.set_xticks(range(6), [f"windowing_bundling\nchunk_kib={i}" for i in range(6)])
    assert plots.overlapping_texts(fig)
    plt.close(fig)
