"""
figures.py: the figures of a grid's report, one per section (grid_results.report_sections):
perplexity and passkey accuracy against the evaluation length, a curve per method, and each
passkey point with its run's 95% Wilson interval; draw_runs and set_value_axis are shared with
gpu_runs.py's figure of the model sizes.
"""

import statistics

import matplotlib.ticker

from experiments import grid_results
from lib.files import pyplot, write_figure

plt = pyplot()

SIDEWAYS = 0.04  # log2 units between the runs of one curve at one x, so that seeds' error bars stay apart


def draw(section, metrics, results, lengths):
    """A section's figure: one panel per metric, a curve per group, its mean over the group's
    entries (the seeds of a method) and the min-max band where there are several; on passkey
    panels each entry's accuracy with its 95% Wilson interval (draw_runs)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.3), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, entries in section.groups.items():
            points = [(n, grid_results.values_at(results, entries, metric, n)) for n in lengths]
            points = [(n, values) for n, values in points if values]
            if not points:
                continue
            xs = [n for n, _ in points]
            count = max(len(values) for _, values in points)
            line, = ax.plot(xs, [statistics.mean(v) for _, v in points], label=f"{label} ({count} seeds)" if count > 1
                            else label, **{"marker": "o", **section.styles.get(label, {})})
            if count > 1:
                ax.fill_between(xs, [min(v) for _, v in points], [max(v) for _, v in points],
                                color=line.get_color(), alpha=0.2)
            if metric == "accuracy":
                draw_runs(ax, results, entries, metric, [(n, n) for n in xs], line.get_color())
        for train_len in grid_results.train_lens(results, grid_results.section_entries(section)):
            ax.axvline(train_len, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        set_value_axis(ax, metric)
        ax.set_xlabel("evaluation length (tokens); dashed: train_len")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a curve, not only the train_len line
            ax.legend(fontsize=8)
    fig.suptitle(section.title)
    fig.tight_layout()
    return fig


def draw_runs(ax, results, entries, metric, points, color):
    """Each entry's own value at `points` [(x, evaluation length)] as a dot, for passkey accuracy
    with its 95% Wilson interval as an error bar (labelled '_<entry>': not in the legend); the
    entries sit a little apart sideways (SIDEWAYS, on a log2 x axis)."""
    kind, key, _ = grid_results.METRICS[metric]
    for index, entry in enumerate(entries):
        record = results[entry].get(kind)
        measured = [(x, length) for x, length in points if record and str(length) in record[key]]
        if not measured:
            continue
        xs = [x * 2 ** (SIDEWAYS * (index - (len(entries) - 1) / 2)) for x, _ in measured]
        ys = [record[key][str(length)] for _, length in measured]
        if metric == "accuracy":
            bounds = [grid_results.passkey_interval(record, length) for _, length in measured]
            ax.errorbar(xs, ys, yerr=[[y - low for y, (low, _) in zip(ys, bounds)],
                                      [high - y for y, (_, high) in zip(ys, bounds)]],
                        fmt=".", color=color, alpha=0.6, capsize=2, label=f"_{entry}")
        else:
            ax.plot(xs, ys, ".", color=color, alpha=0.6, label=f"_{entry}")


def set_value_axis(ax, metric):
    """The y axis of a metric: accuracy from 0 to 1, perplexities on a log scale with plain numbers."""
    if metric == "accuracy":
        ax.set_ylim(-0.03, 1.03)
    else:
        ax.set_yscale("log")
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))  # 200, not 2x10^2
    ax.set_ylabel(grid_results.METRICS[metric][2])


def save(fig, path):
    """Write a figure drawn by draw() (atomically: never half a PNG) and free it."""
    write_figure(path, fig, dpi=120)
