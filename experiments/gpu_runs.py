"""
gpu_runs.py: the grid's runs that experiments/gpu_check.py trained and evaluated on a GPU, as the
report shows them beside the CPU grid. It reads results/gpu/{ppl,passkey,sotu}/<run>.json (the
grid's format, through grid_results' validating loader, each checked to be made with the grid's
settings for its run) and the summaries results/gpu_check*.json (the device, each run's status),
and from them makes

- the headline rows that no CPU run stands on yet: a method's GPU runs until the CPU grid has
  evaluated one of its seeds (stand_ins, stand_in_label, stand_in_note);
- the Rivals section: the rivals and the GPU's own RoPE, FoPE and ALiBi beside the CPU seeds;
- the Model size section: one table and scale.png, the ladder's methods across widths.

A GPU run enters the report's results as '<run> (<device>)', e.g. 'cope-s0 (H200)', never in a CPU
run's place: the same seed on another device is another run (its floating-point operations run in
another order).
"""

import os
import re
import statistics
from dataclasses import dataclass

from experiments import figures
from experiments import grids
from experiments.grid_results import (GPU_SUMMARIES, KINDS, Section, evaluation_records, gpu_summaries,
                                      group_by_method, in_words, method_of, refuse, spread_cell, take, values_at)

GPU_GRID = "default"  # the grid whose runs experiments/gpu_check.py trains (its GRID)
# The Model size table's columns: (metric, multiple of train_len)
SCALE_COLUMNS = (("accuracy", 2), ("accuracy", 4), ("ppl_ratio", 16))
SCALE_TITLES = {"accuracy": "passkey", "ppl_ratio": "ppl ratio"}


@dataclass
class Status:
    """What a summary says of one run: its status ("done", "stopped", ...), the last step it
    reached (None if it never started), why it stopped, the device and the schedule's steps."""
    status: str
    steps: int
    why: str
    device: str          # e.g. "NVIDIA H200"
    max_steps: int


@dataclass
class GpuRuns:
    """The GPU's runs of a grid: those evaluated, and what the summaries say of the others."""
    results: dict        # '<run> (<device>)' -> {kind: record}, in the grid's order
    keys: dict           # run -> its key in results
    devices: dict        # key -> the device's full name
    unevaluated: dict    # run -> why it has no evaluation (a run that started but did not finish)


def short_name(device):
    """'NVIDIA H200' -> 'H200'."""
    return device.removeprefix("NVIDIA ")


def summary_statuses(results_dir):
    """{run: Status} from the summaries results_dir/gpu_check*.json, checked; a run a summary did
    not start is left to the others."""
    statuses = {}
    for path, summary in gpu_summaries(results_dir):
        if not isinstance(summary, dict):
            raise refuse(path, None, "is not a record")
        device = take(path, summary, "gpu", "", "text", optional=True) or take(path, summary, "device", "", "text")
        max_steps = take(path, take(path, summary, "settings", "", "record"), "max_steps", "['settings']", "count")
        runs = take(path, summary, "runs", "", "record")
        for run in runs:
            record = take(path, runs, run, "['runs']", "record")
            where = f"['runs'][{run!r}]"
            status = take(path, record, "status", where, "text")
            if status != "not started":
                statuses[run] = Status(status, take(path, record, "steps", where, "index", optional=True),
                                       take(path, record, "why", where, "text", optional=True), device, max_steps)
    return statuses


def load(results_dir, grid_name):
    """The GPU's runs of the grid from results_dir/gpu/ and results_dir/gpu_check*.json (none for a
    grid that gpu_check.py does not train). An evaluation not made with the grid's settings for
    its run, or of a run no summary has done, stops the report (grid_results.refuse)."""
    found = GpuRuns({}, {}, {}, {})
    if grid_name != GPU_GRID:
        return found
    grid = grids.GRIDS[grid_name]
    statuses = summary_statuses(results_dir)
    for run in grid.runs:
        kinds = dict.fromkeys(kind for kind, _, entry, _ in grids.steps(grid, [run]) if kind in KINDS and entry == run.name)
        paths = {kind: grids.result_path(os.path.join(results_dir, "gpu"), kind, run.name) for kind in kinds}
        records = {kind: evaluation_records(path, kind)[0] for kind, path in paths.items() if os.path.exists(path)}
        status = statuses.get(run.name)
        for kind, record in records.items():
            if not grids.record_is_current(record, *grids.run_settings(grid, run)):
                raise refuse(paths[kind], None, f"was not made with the grid's settings for {run.name}")
            if status is None or status.status != "done":
                raise refuse(paths[kind], None, f"is of a run that no {GPU_SUMMARIES} beside results/gpu/ has done")
        if records:
            key = f"{run.name} ({short_name(status.device)})"
            found.results[key], found.keys[run.name], found.devices[key] = records, key, status.device
        elif status is not None and status.status != "done":
            at = f" at step {status.steps}/{status.max_steps}" if status.steps is not None else ""
            found.unevaluated[run.name] = (f"not evaluated: {status.status}{at} on the {short_name(status.device)}"
                                           + (f" ({status.why})" if status.why else ""))
    return found


def seed_of(entry):
    """'fope-w128-s0 (H200)' -> 0."""
    return int(re.search(r"-s(\d+)(?=\+| |$)", entry).group(1))


def seed_words(entries):
    """'seed 0', 'seeds 0, 1 and 2'."""
    seeds = sorted({seed_of(entry) for entry in entries})
    return f"seed{'s' * (len(seeds) > 1)} {in_words(map(str, seeds))}"


def seeds_by_width(rows):
    """'seeds 0, 1 and 2' where every width has the same seeds, else 'seeds 0, 1 and 2 at width 128,
    seeds 0 and 1 at 512': a line's legend names what each of its points stands on."""
    by_seeds = {}
    for row in rows:
        by_seeds.setdefault(seed_words(row.keys), []).append(str(row.width))
    if len(by_seeds) == 1:
        return next(iter(by_seeds))
    return ", ".join(f"{words} at {'width ' * (index == 0)}{in_words(widths)}"
                     for index, (words, widths) in enumerate(by_seeds.items()))


def devices_of(gpu, keys):
    """The short names of the devices the keys' runs ran on, in words."""
    return in_words(sorted({short_name(gpu.devices[key]) for key in keys}))


def stand_ins(gpu, entries):
    """The keys of the GPU runs, among a method's CPU runs `entries`, with both perplexity and passkey."""
    return [gpu.keys[entry] for entry in entries
            if entry in gpu.keys and all(gpu.results[gpu.keys[entry]].get(kind) for kind in ("ppl", "passkey"))]


def stand_in_label(gpu, label, keys):
    """'CoPE (1 seed, H200)': a headline row standing on GPU runs."""
    return f"{label} ({len(keys)} seed{'s' * (len(keys) > 1)}, {devices_of(gpu, keys)})"


def recipe(gpu, keys):
    """How the keys' runs were trained, from their records: '3200 steps in fp32'."""
    trained = {(record["train_config"]["max_steps"], record["train_config"]["dtype"])
               for key in keys for record in gpu.results[key].values()}
    return in_words(f"{steps} steps in {dtype}" for steps, dtype in sorted(trained))


def main_runs(gpu, grid):
    """The names of the GPU's runs of the grid's main comparison."""
    return [run.name for run in grid.runs if run.section == "main" and run.name in gpu.keys]


def stand_in_note(gpu, stood_in, grid_name):
    """The headline caption's words on its rows that stand on GPU runs ({label: keys}); '' if none."""
    if not stood_in:
        return ""
    keys = [key for keys in stood_in.values() for key in keys]
    compared = main_runs(gpu, grids.GRIDS[grid_name])
    return (f"Rows marked {devices_of(gpu, keys)}: no CPU run evaluated yet, so each stands on a run that "
            f"experiments/gpu_check.py trained on one {in_words(sorted({gpu.devices[key] for key in keys}))} with "
            f"the grid's recipe ({recipe(gpu, keys)})"
            + (f"; results/{grid_name}/results.md sets that GPU's {in_words(compared)} beside the CPU seeds. "
               if compared else ". "))


def rival_sections(grid, results, gpu):
    """[the Rivals section] (a grid_results.Section over the CPU results and gpu.results), [] for a
    grid without rivals: each rival and each main method the GPU also ran, its CPU seeds and its
    GPU runs, one colour a method (solid: CPU, dashed: GPU)."""
    rivals = group_by_method(run.name for run in grid.runs if run.section == "rival")
    if not rivals:
        return []
    main = group_by_method(run.name for run in grid.runs if run.section == "main")
    compared = {method: entries for method, entries in main.items() if any(entry in gpu.keys for entry in entries)}
    groups, styles = {}, {}
    for colour, (method, entries) in enumerate({**compared, **rivals}.items()):
        groups[f"{method}, CPU"], styles[f"{method}, CPU"] = entries, {"color": f"C{colour}"}
        for key in (gpu.keys[entry] for entry in entries if entry in gpu.keys):
            groups[key], styles[key] = [key], {"color": f"C{colour}", "linestyle": "--", "marker": "s"}
    text = ("What the field did after FoPE, at the default size: `fope-deployed` FoPE as Intern-S1-Pro deploys it "
            "(`--fope_variant deployed`), `cope` RoPE with CoPE's soft clip, `rope-qknorm` RoPE with QK-norm. Rows "
            "`<method>, CPU` are the grid's seeds.")
    shown = [key for key in groups if key in gpu.results]
    if shown:
        text += (f" Rows `<run> ({devices_of(gpu, shown)})` are the runs experiments/gpu_check.py trained and evaluated "
                 f"on one {in_words(sorted({gpu.devices[key] for key in shown}))} with the grid's settings for each run "
                 f"({recipe(gpu, shown)}), in results/gpu/. A seed on the GPU starts from the weights and batches it "
                 "starts from on the CPU, but its floating-point sums run in another order, so it ends as another run"
                 + (f": the GPU's {in_words(main_runs(gpu, grid))} stand next to the CPU seeds of their methods, and the "
                    "rivals' GPU runs compare with them" if main_runs(gpu, grid) else "")
                 + ". In the figure one colour a method: solid the CPU seeds (mean; band: the lowest and highest seed), "
                 "dashed the GPU's runs.")
    return [Section("Rivals", text, groups, [("rivals.png", ["ppl_ratio", "accuracy"])], styles)]


@dataclass
class ScaleRow:
    """A row of the Model size table: one method at one width, from one source."""
    method: str          # the position embedding, e.g. "fope"
    width: int           # n_embd
    source: str          # "CPU", or a GPU's short name
    keys: list           # the runs it stands on, as entered in the results; [] where none is evaluated
    note: str = ""       # why none is evaluated

    @property
    def label(self):
        return f"{self.method}, width {self.width}"


def ladder_method(name):
    """'fope-nofs-w128-s0' -> 'fope-nofs', 'fope-s1' -> 'fope': a run's name without width and seed."""
    return re.sub(r"-w\d+$", "", method_of(name))


def ladder_groups(grid):
    """{(method, width): the grid's runs} for the methods of the ladder: its runs at each width and
    the main runs and FoPE's ablations at the default one, by width, then method; {} for a grid
    without a ladder."""
    methods = list(dict.fromkeys(ladder_method(run.name) for run in grid.runs if run.section == "ladder"))
    groups = {}
    for run in grid.runs:
        if run.section in ("main", "ablation", "ladder") and ladder_method(run.name) in methods:
            width = grids.run_settings(grid, run)[0]["n_embd"]
            groups.setdefault((ladder_method(run.name), width), []).append(run.name)
    return dict(sorted(groups.items(), key=lambda item: (item[0][1], methods.index(item[0][0]))))


def ladder_words(grid):
    """'rope, fope and alibi at widths 128, 256 and 512, fope-nofs and fope-nocf at widths 128 and
    256 (2, 4 and 8 heads: head_dim 64 at every width; width 256: the main comparison's runs and
    FoPE's ablations)', from the runs' settings."""
    groups = ladder_groups(grid)
    runs = {run.name: run for run in grid.runs}
    heads = {width: grids.run_settings(grid, runs[entries[0]])[0]["n_head"] for (_, width), entries in groups.items()}
    head_dims = sorted({width // count for width, count in heads.items()})
    widths_of = {}
    for method, width in groups:
        widths_of.setdefault(method, []).append(width)
    by_widths = {}
    for method, widths in widths_of.items():
        by_widths.setdefault(tuple(widths), []).append(method)
    main_widths = sorted({width for (_, width), entries in groups.items() if runs[entries[0]].section == "main"})
    return (", ".join(f"{in_words(methods)} at widths {in_words(map(str, widths))}"
                      for widths, methods in by_widths.items())
            + f" ({in_words(str(heads[width]) for width in sorted(heads))} heads: head_dim {in_words(map(str, head_dims))} "
            f"at every width; width {in_words(map(str, main_widths))}: the main comparison's runs and FoPE's ablations)")


def scale_rows(grid, results, gpu):
    """The Model size table's rows: at each width and for each method the CPU seeds evaluated, the
    GPU's runs, or, where neither, why not (a GPU run stopped before the end, or none run yet)."""
    rows = []
    for (method, width), entries in ladder_groups(grid).items():
        cpu = [entry for entry in entries if results[entry].get("ppl") and results[entry].get("passkey")]
        on_gpu = stand_ins(gpu, entries)
        if cpu:
            rows.append(ScaleRow(method, width, "CPU", cpu))
        if on_gpu:
            rows.append(ScaleRow(method, width, devices_of(gpu, on_gpu), on_gpu))
        if not cpu and not on_gpu:
            why = [gpu.unevaluated[entry] for entry in entries if entry in gpu.unevaluated]
            rows.append(ScaleRow(method, width, "", [], "; ".join(why) or "no run evaluated yet"))
    return rows


def scale_cell(shown, row, metric, length):
    """'77% (63%–96%), 3 CPU seeds' or '86% (78%–92%), H200 seed 0': the value and what it stands on."""
    cell = spread_cell(shown, row.keys, metric, length)
    measured = [key for key in row.keys if values_at(shown, [key], metric, length)]
    if len(measured) > 1:
        return f"{cell}, {len(measured)} {row.source} seeds"
    return f"{cell}, {row.source} {seed_words(measured)}" if measured else cell


def ladder_train_len(grid):
    """The train_len of the ladder's runs (the grid's runs share one)."""
    return grids.run_settings(grid, next(run for run in grid.runs if run.section == "ladder"))[0]["train_len"]


def scale_markdown(grid, shown, rows, figure_dir):
    """The Model size section: text, scale.png (where some row has a run) and its table (shown:
    the CPU results and gpu.results); [] for a grid without a ladder."""
    if not rows:
        return []
    train_len = ladder_train_len(grid)
    figure = [f"![Model size: passkey at 2× and 4× train_len, perplexity ratio at 16×, by width]({figure_dir}scale.png)",
              ""] if any(row.keys for row in rows) else []
    lines = ["#### Model size", "",
             f"{ladder_words(grid)}: passkey accuracy at 2× and 4× train_len = {train_len} and the perplexity ratio "
             "at 16×. Each cell says what it stands on: the mean (lowest–highest) of the CPU seeds, "
             "or one run's value (passkey: its accuracy and 95% Wilson interval) with its device and seed. In the "
             "figure one colour a method: solid lines the CPU seeds' mean, dots each seed, dashed the GPU's runs; "
             "error bars each run's Wilson interval.", "", *figure,
             "| Model size | " + " | ".join(f"{SCALE_TITLES[metric]} {multiple}×" for metric, multiple in SCALE_COLUMNS)
             + " |", "|---" * (1 + len(SCALE_COLUMNS)) + "|"]
    for row in rows:
        cells = ([scale_cell(shown, row, metric, multiple * train_len) for metric, multiple in SCALE_COLUMNS]
                 if row.keys else [row.note] + ["–"] * (len(SCALE_COLUMNS) - 1))
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    behind = "; ".join(f"{row.label} ({row.source}) = {', '.join(row.keys)}" for row in rows if row.keys)
    lines += ["", f"Runs behind each row: {behind}.", ""]
    on_cpu = [name for entries in ladder_groups(grid).values() for name in entries if not shown[name].get("passkey")]
    return lines + ([f"Not yet evaluated on the CPU: {', '.join(on_cpu)}.", ""] if on_cpu else [])


SOURCES_APART = 0.1  # log2 units between the CPU's and a GPU's points at one width


def draw_scale(shown, rows, train_len):
    """scale.png: a panel per SCALE_COLUMNS, x the width; per method and source a line through the
    widths it has (solid: the CPU seeds' mean; dashed: GPU runs; the sources a little apart
    sideways), each run its dot (for passkey with its Wilson interval), 'not evaluated' at a width
    where no run is."""
    widths = sorted({row.width for row in rows})
    methods = list(dict.fromkeys(row.method for row in rows))
    sources = sorted({row.source for row in rows if row.keys}, key=lambda source: source != "CPU")  # CPU first
    fig, axes = figures.plt.subplots(1, len(SCALE_COLUMNS), figsize=(5 * len(SCALE_COLUMNS), 4.6), squeeze=False)
    for ax, (metric, multiple) in zip(axes[0], SCALE_COLUMNS):
        length = multiple * train_len
        for colour, method in enumerate(methods):
            for index, source in enumerate(sources):
                series = [row for row in rows if (row.method, row.source) == (method, source)
                          and values_at(shown, row.keys, metric, length)]
                if not series:
                    continue
                apart = 2 ** (SOURCES_APART * (index - (len(sources) - 1) / 2))
                on_cpu = source == "CPU"
                ax.plot([row.width * apart for row in series],
                        [statistics.mean(values_at(shown, row.keys, metric, length)) for row in series],
                        color=f"C{colour}", marker="o" if on_cpu else "s", linestyle="-" if on_cpu else "--",
                        label=f"{method}, {source} ({seeds_by_width(series)})")
                for row in series:
                    figures.draw_runs(ax, shown, row.keys, metric, [(row.width * apart, length)], f"C{colour}")
        for width in widths:
            if not any(row.width == width and values_at(shown, row.keys, metric, length) for row in rows):
                ax.text(width, 0.5, "not evaluated", transform=ax.get_xaxis_transform(), rotation=90, ha="center",
                        va="center", color="gray")
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(width) for width in widths])
        ax.set_xlim(widths[0] / 1.3, widths[-1] * 1.3)
        figures.set_value_axis(ax, metric)
        ax.set_xlabel("width (n_embd)")
        ax.set_title(f"{SCALE_TITLES[metric]} at {multiple}× train_len ({length} tokens)")
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=len(methods), fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))  # the legend below the panels
    return fig
