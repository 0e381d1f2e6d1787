"""
What the report (report.py, grid_results.py, figures.py, gpu_runs.py) makes of the committed
default grid and the GPU's runs beside it, read back against the saved JSON: each run's passkey
accuracy with its 95% Wilson interval in tables and figures, the headline's rows that stand on GPU
runs until CPU runs replace them, the Model size table and figure, and the README's paragraphs on the
machines (bench.json, gpu_check*.json).
"""

import json
import shutil

import pytest

from experiments import bench_report
from experiments import figures
from experiments import gpu_runs
from experiments import grid_results
from experiments import grids
from experiments import report
from experiments.grid_results import wilson_interval
from conftest import HERE, error_of, plotted_lines, table_rows
from lib.files import UserError

RESULTS = HERE / "results"
HEADLINE = "| | ppl ratio"  # the start of the headline table's header line


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


# -----------------------------------------------------------------------------
# the GPU's runs beside the CPU grid (gpu_runs.py)

def summaries():
    """{run: its record in the newest summary that started it} of the committed results/gpu_check*.json."""
    found = {}
    for path in sorted(RESULTS.glob("gpu_check*.json")):
        summary = json.loads(path.read_text())
        found.update({run: {**record, "max_steps": summary["settings"]["max_steps"], "gpu": summary["gpu"]}
                      for run, record in summary["runs"].items() if record["status"] != "not started"})
    return found


@pytest.fixture(scope="module")
def gpu():
    return gpu_runs.load(str(RESULTS), "default")


def test_the_gpu_runs_are_the_evaluated_ones_under_their_device_and_the_others_say_why(gpu):
    ran = summaries()
    evaluated = sorted(path.stem for path in (RESULTS / "gpu" / "passkey").glob("*.json"))
    assert sorted(gpu.keys) == evaluated and all(ran[run]["status"] == "done" for run in evaluated)
    assert all(gpu.keys[run] == f"{run} ({ran[run]['gpu'].removeprefix('NVIDIA ')})" for run in evaluated)
    assert all(gpu.results[gpu.keys[run]]["passkey"] == saved("passkey", run, "gpu") for run in evaluated)
    stopped = {run: record for run, record in ran.items() if record["status"] != "done"}
    assert sorted(gpu.unevaluated) == sorted(stopped) and stopped  # the width-512 runs the budget stopped
    for run, record in stopped.items():
        assert gpu.unevaluated[run].startswith(f"not evaluated: {record['status']} at step "
                                               f"{record['steps']}/{record['max_steps']} on the ")
        assert record["why"] in gpu.unevaluated[run]


def test_the_headline_takes_a_rival_from_the_gpu_until_the_cpu_grid_has_one(default_results, gpu, tmp_path):
    grid, results = default_results
    rivals = {"FoPE as deployed": "fope-deployed", "CoPE": "cope", "RoPE + QK-norm": "rope-qknorm"}
    # the grid as it stands before any CPU run of a rival is evaluated (the committed one may be past that)
    results = {entry: {} if entry.rsplit("-s", 1)[0] in rivals.values() else kinds for entry, kinds in results.items()}
    headline = report.headline_markdown(grid, results, gpu)
    rows = table_rows(headline, HEADLINE)
    for label, method in rivals.items():
        key = gpu.keys[f"{method}-s0"]
        ppl, passkey = saved("ppl", f"{method}-s0", "gpu"), saved("passkey", f"{method}-s0", "gpu")
        low, high = interval_of(passkey, 768)
        cells = rows[f"{label} (1 seed, {key.split(' (')[1][:-1]})"]
        assert cells[3] == f"{ppl['ppl_ratio']['6144']:.2f}"
        assert cells[5] == f"{passkey['accuracy']['768']:.0%} ({low:.0%}–{high:.0%})"
        assert f"{label} {key}" in headline  # the run behind the row, in the caption
    assert "| RoPE (3 seeds) |" in headline and "Rows marked H200: no CPU run evaluated yet" in headline
    assert "sets that GPU's rope-s0, fope-s0 and alibi-s0 beside the CPU seeds" in headline

    # once a CPU seed of CoPE is evaluated its row stands on the CPU grid, the others stay on the GPU
    for folder in ("default", "gpu"):
        shutil.copytree(RESULTS / folder, tmp_path / folder, ignore=shutil.ignore_patterns("*.png", "*.md"))
    for path in RESULTS.glob("gpu_check*.json"):
        shutil.copy(path, tmp_path)
    for method in rivals.values():  # back to no rival on the CPU, then CoPE's seed 0 lands there
        for path in (tmp_path / "default").glob(f"*/{method}-s*.json"):
            path.unlink()
    for kind in ("ppl", "passkey"):
        shutil.copy(RESULTS / "gpu" / kind / "cope-s0.json", tmp_path / "default" / kind / "cope-s0.json")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- headline:begin -->\n<!-- headline:end -->\n")
    report.main(["--results_dir", str(tmp_path), "--readme", str(readme)])
    rows = table_rows(readme.read_text(), HEADLINE)
    assert "CoPE (1 of 3 seeds)" in rows and not any(label.startswith("CoPE (1 seed") for label in rows)
    assert rows["CoPE (1 of 3 seeds)"][3] == f"{saved('ppl', 'cope-s0', 'gpu')['ppl_ratio']['6144']:.2f}"
    assert "FoPE as deployed (1 seed, H200)" in rows and "RoPE + QK-norm (1 seed, H200)" in rows
    assert "CoPE cope-s0;" in readme.read_text() and "CoPE cope-s0 (H200)" not in readme.read_text()


def test_the_model_size_table_says_what_each_cell_stands_on(default_results, gpu):
    grid, results = default_results
    shown = {**results, **gpu.results}
    markdown = "\n".join(gpu_runs.scale_markdown(grid, shown, gpu_runs.scale_rows(grid, results, gpu), ""))
    lines = [line for line in markdown.splitlines() if line.startswith("| ")][1:]  # the header left out
    rows = {}
    for line in lines:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.setdefault(cells[0], []).append(cells[1:])
    for method in ("rope", "fope", "alibi"):
        for width, runs in ((128, [f"{method}-w128-s{seed}" for seed in range(3)]),
                            (256, [f"{method}-s{seed}" for seed in range(3)])):
            *cpu, on_gpu = rows[f"{method}, width {width}"]
            # the GPU's seed 0 in a row of its own, each passkey cell with its Wilson interval
            passkey, ppl = saved("passkey", runs[0], "gpu"), saved("ppl", runs[0], "gpu")
            for cell, length in zip(on_gpu, (768, 1536)):
                low, high = interval_of(passkey, length)
                assert cell == f"{passkey['accuracy'][str(length)]:.0%} ({low:.0%}–{high:.0%}), H200 seed 0"
            assert on_gpu[2] == f"{ppl['ppl_ratio']['6144']:.2f}, H200 seed 0"
            # above it the CPU's seeds, where some are evaluated: one with its interval, several as a range
            evaluated = [run for run in runs if (RESULTS / "default" / "passkey" / f"{run}.json").exists()]
            assert len(cpu) == (1 if evaluated else 0)
            if len(evaluated) == 1:
                record = saved("passkey", evaluated[0])
                low, high = interval_of(record, 768)
                assert cpu[0][0] == f"{record['accuracy']['768']:.0%} ({low:.0%}–{high:.0%}), CPU seed {evaluated[0][-1]}"
            elif evaluated:
                seeds = [saved("passkey", run)["accuracy"]["768"] for run in evaluated]
                assert cpu[0][0] == (f"{sum(seeds) / len(seeds):.0%} ({min(seeds):.0%}–{max(seeds):.0%}), "
                                     f"{len(seeds)} CPU seeds")
        # width 512: why not, from the summary
        (cells,) = rows[f"{method}, width 512"]
        record = summaries()[f"{method}-w512-s0"]
        assert cells == [f"not evaluated: {record['status']} at step {record['steps']}/{record['max_steps']} on the "
                         f"H200 ({record['why']})", "–", "–"]
    # FoPE's two parts alone: beside the main runs at width 256, and at width 128 once a seed is evaluated
    for method in ("fope-nofs", "fope-nocf"):
        seeds = [saved("ppl", f"{method}-s{seed}")["ppl_ratio"]["6144"] for seed in range(3)]
        (cells,) = rows[f"{method}, width 256"]
        assert cells[2] == f"{sum(seeds) / 3:.2f} ({min(seeds):.2f}–{max(seeds):.2f}), 3 CPU seeds"
        evaluated = [seed for seed in range(3) if (RESULTS / "default" / "passkey" / f"{method}-w128-s{seed}.json").exists()]
        (cells,) = rows[f"{method}, width 128"]
        assert (cells[0] == "no run evaluated yet") == (not evaluated)
        assert f"{method}, width 512" not in rows
    assert "![Model size" in markdown and "](scale.png)" in markdown


def test_a_scale_line_names_the_seeds_of_each_width_where_they_differ():
    def row(width, seeds):
        return gpu_runs.ScaleRow("fope", width, "CPU", [f"fope-w{width}-s{seed}" for seed in seeds])
    assert gpu_runs.seeds_by_width([row(128, (0, 1, 2)), row(256, (0, 1, 2))]) == "seeds 0, 1 and 2"
    assert (gpu_runs.seeds_by_width([row(128, (0, 1, 2)), row(256, (0, 1, 2)), row(512, (0, 1))])
            == "seeds 0, 1 and 2 at width 128 and 256, seeds 0 and 1 at 512")


def test_the_scale_figure_shows_each_width_from_the_json(default_results, gpu):
    grid, results = default_results
    shown = {**results, **gpu.results}
    fig = gpu_runs.draw_scale(shown, gpu_runs.scale_rows(grid, results, gpu), 384)
    for ax, (metric, multiple) in zip(fig.axes, gpu_runs.SCALE_COLUMNS):
        kind, key, _ = grid_results.METRICS[metric]
        length = str(multiple * 384)
        lines = plotted_lines(ax)
        for method in ("rope", "fope", "alibi"):
            xs, ys = lines[f"{method}, H200 (seed 0)"]
            assert xs == pytest.approx([128, 256], rel=0.1)
            assert ys == pytest.approx([saved(kind, run, "gpu")[key][length] for run in (f"{method}-w128-s0", f"{method}-s0")])
            # the CPU's line through the widths it has evaluated, at the mean of their seeds
            on_cpu = {width: [run for run in (f"{method}{suffix}-s{seed}" for seed in range(3))
                              if (RESULTS / "default" / kind / f"{run}.json").exists()]
                      for width, suffix in ((128, "-w128"), (256, ""))}
            on_cpu = {width: runs for width, runs in on_cpu.items() if runs}
            # its legend names the seeds behind each point: one set where every width has the same
            seeds = {width: gpu_runs.seed_words(runs) for width, runs in on_cpu.items()}
            label = (seeds[256] if len(set(seeds.values())) == 1
                     else f"{seeds[128]} at width 128, {seeds[256]} at 256")
            xs, ys = lines[f"{method}, CPU ({label})"]
            assert xs == pytest.approx(list(on_cpu), rel=0.1)
            assert ys == pytest.approx([sum(saved(kind, run)[key][length] for run in runs) / len(runs)
                                        for runs in on_cpu.values()])
        if metric == "accuracy":
            bars = error_bars(ax)
            record = saved("passkey", "fope-w128-s0", "gpu")
            (_, y, low, high), = bars["fope-w128-s0 (H200)"]
            assert (y, low, high) == pytest.approx((record["accuracy"][length], *interval_of(record, length)))
            cpu_runs = [run for m in ("rope", "fope", "alibi", "fope-nofs", "fope-nocf") for w in ("", "-w128")
                        for run in (f"{m}{w}-s{seed}" for seed in range(3))
                        if (RESULTS / "default" / kind / f"{run}.json").exists()]
            assert sorted(bars) == sorted(cpu_runs + [f"{m}{w}-s0 (H200)" for m in ("rope", "fope", "alibi")
                                                      for w in ("", "-w128")])
        assert [text.get_text() for text in ax.texts] == ["not evaluated"]  # width 512
    figures.plt.close(fig)


def test_a_gpu_result_of_other_settings_or_of_no_finished_run_stops_the_report(tmp_path):
    for folder in ("default", "gpu"):
        shutil.copytree(RESULTS / folder, tmp_path / folder, ignore=shutil.ignore_patterns("*.png", "*.md"))
    for path in RESULTS.glob("gpu_check*.json"):
        shutil.copy(path, tmp_path)
    path = tmp_path / "gpu" / "ppl" / "cope-s0.json"
    data = json.loads(path.read_text())
    data["checkpoints"][0]["train_config"]["pe"] = "rope"
    path.write_text(json.dumps(data))
    message = error_of(report.main, ["--results_dir", str(tmp_path)])
    assert message.startswith(f"report.py: error: {path}") and "the grid's settings for cope-s0" in message
    shutil.copy(RESULTS / "gpu" / "ppl" / "cope-s0.json", path)
    (tmp_path / "gpu_check_more.json").unlink()  # the summary of rope-qknorm-s0 and the width-128 runs
    message = error_of(report.main, ["--results_dir", str(tmp_path)])
    assert "rope-qknorm-s0.json: the file is of a run that no gpu_check*.json" in message
    assert not (tmp_path / "default" / "results.md").exists()


def test_the_readme_says_what_the_machines_measured_from_their_json_and_refuses_a_damaged_one(tmp_path):
    for name in ("bench.json", "gpu_check.json", "gpu_check_more.json"):
        shutil.copy(RESULTS / name, tmp_path)
    check = json.loads((tmp_path / "gpu_check.json").read_text())
    cells = [cell for run in check["runs"].values() if run["group"] == "check"
             for metric in run["headline"].values() for cell in metric.values()]
    inside = sum(cell["in_cpu_range"] for cell in cells)
    before = bench_report.machines_markdown(str(tmp_path))
    assert f"Of their {len(cells)} headline numbers" in before and f"), {inside} lie within" in before
    # one more number outside the CPU seeds' range, one run stopped: the paragraph follows the JSON
    flipped = next(cell for cell in cells if cell["in_cpu_range"])
    flipped["in_cpu_range"] = False
    (tmp_path / "gpu_check.json").write_text(json.dumps(check))
    after = bench_report.machines_markdown(str(tmp_path))
    assert f"), {inside - 1} lie within" in after
    assert "rope-w512-s0 (step 3,050)" in after and "rope-w128-s0" in after.split("Stopped by")[0]
    bench = json.loads((tmp_path / "bench.json").read_text())
    hours = next(row["all"]["hours"] for row in bench["grid_estimate"] if row["jobs"] == 2)
    assert f"at {hours:.0f} hours with `--jobs 2`" in after and bench["machine"]["name"] in after
    assert f"bench` (run on {bench['date'][:10]}) measured " in after and "lacked then (" in after  # of that day

    (tmp_path / "gpu_check.json").write_text('{"runs": [')
    with pytest.raises(UserError, match="gpu_check.json"):
        bench_report.machines_markdown(str(tmp_path))
    (tmp_path / "gpu_check.json").write_text('{"runs": {}}')
    with pytest.raises(UserError, match="not what bench.py and gpu_check.py write"):
        bench_report.machines_markdown(str(tmp_path))
