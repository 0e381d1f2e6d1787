"""
What the report (report.py, grid_results.py, figures.py) makes of the committed default grid,
read back against the saved JSON: each run's passkey accuracy with its 95% Wilson interval in
tables and figures.
"""

import json

import pytest

from experiments import figures
from experiments import grid_results
from experiments import grids
from experiments.grid_results import wilson_interval
from conftest import HERE

RESULTS = HERE / "results"


def saved(kind, entry, folder="default"):
    """The first checkpoint record of an evaluation JSON as committed."""
    return json.loads((RESULTS / folder / kind / f"{entry}.json").read_text())["checkpoints"][0]


def interval_of(record, length):
    return wilson_interval(round(record["accuracy"][str(length)] * record["trials"]), record["trials"])


def test_the_wilson_interval_matches_published_values():
    assert wilson_interval(0, 100)[0] == 0 and wilson_interval(0, 100)[1] == pytest.approx(0.0370, abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(100, 100) == (pytest.approx(0.9630, abs=1e-4), 1.0)
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (no continuity correction)
    for (successes, trials), expected in (((81, 263), (0.2553, 0.3662)), ((15, 148), (0.0624, 0.1605)),
                                          ((0, 20), (0.0, 0.1611)), ((1, 29), (0.0061, 0.1718))):
        assert wilson_interval(successes, trials) == pytest.approx(expected, abs=1e-4)


@pytest.fixture(scope="module")
def default_results():
    grid = grids.GRIDS["default"]
    return grid, grid_results.load_results(grid, str(RESULTS / "default"))


def test_a_table_cell_of_one_run_gives_its_wilson_interval_and_of_seeds_their_range(default_results):
    _, results = default_results
    record = saved("passkey", "fope-sigma1-s0")
    low, high = interval_of(record, 1536)
    assert grid_results.spread_cell(results, ["fope-sigma1-s0"], "accuracy", 1536) == \
        f"{record['accuracy']['1536']:.0%} ({low:.0%}–{high:.0%})"
    seeds = [saved("passkey", f"fope-s{seed}")["accuracy"]["768"] for seed in range(3)]
    assert grid_results.spread_cell(results, [f"fope-s{seed}" for seed in range(3)], "accuracy", 768) == \
        f"{sum(seeds) / 3:.0%} ({min(seeds):.0%}–{max(seeds):.0%})"
    assert grid_results.spread_cell(results, ["fope-sigma1-s0"], "ppl_ratio", 6144) == \
        f"{saved('ppl', 'fope-sigma1-s0')['ppl_ratio']['6144']:.2f}"  # perplexities have no interval


def error_bars(ax):
    """{entry: [(x, accuracy, lowest, highest)]} of the error bars figures.draw_runs drew on an Axes."""
    bars = {}
    for container in ax.containers:
        line, _, (bar_lines,) = container.lines
        bars[container.get_label().removeprefix("_")] = [
            (x, y, low, high) for x, y, ((_, low), (_, high)) in zip(line.get_xdata(), line.get_ydata(),
                                                                  bar_lines.get_segments())]
    return bars


@pytest.mark.parametrize("title", ["Main comparison", "Head dimension", "Context extension by fine-tuning"])
def test_every_passkey_panel_shows_each_runs_accuracy_with_its_wilson_interval(default_results, title):
    grid, results = default_results
    section = next(s for s in grid_results.report_sections(grid) if s.title == title)
    name, metrics = next((name, metrics) for name, metrics in section.figures if "accuracy" in metrics)
    ax = figures.draw(section, metrics, results, grid.lengths).axes[metrics.index("accuracy")]
    bars = error_bars(ax)
    assert sorted(bars) == sorted(grid_results.section_entries(section)), name
    for entry, points in bars.items():
        record = saved("passkey", entry)
        lengths = [n for n in grid.lengths if str(n) in record["accuracy"]]
        assert len(points) == len(lengths)
        for (x, y, low, high), length in zip(points, lengths):
            assert x == pytest.approx(length, rel=0.1)  # a seed's bar sits a little aside of its length
            assert (y, low, high) == pytest.approx((record["accuracy"][str(length)], *interval_of(record, length)))
