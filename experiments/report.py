"""
report.py: the report of a grid, from its saved evaluation JSON alone: every figure,
results/<grid>/results.md, and for the headline grid (HEADLINE_GRID) the README's one table (between
<!-- headline:begin --> and <!-- headline:end -->) and its paragraphs on the machines (between
<!-- machines:begin --> and <!-- machines:end -->, from results/bench.json and results/gpu_check*.json:
bench_report.py). It is the only code that writes into
README.md; nothing it writes is typed by hand.

    python -m experiments.report                   # the default grid
    python -m experiments.report --grid bpe256     # another grid (see grids.py)
    python -m experiments.report --results_dir /elsewhere          # a copy: its tables, README untouched
    python -m experiments.report --results_dir /elsewhere --readme /elsewhere/README.md

Run on a fresh clone, it rewrites README.md and results/ byte for byte as they are committed. The
README's blocks are rewritten only from the repository's own results/, or into the README --readme
names. Every record is read and checked (grid_results.py) before anything is written. The runs that
experiments/gpu_check.py made on a GPU (results/gpu/) stand beside the CPU grid in the sections on
rivals and model size and in the headline rows no CPU run stands on yet (gpu_runs.py).
"""

import argparse
import os
import shlex

from experiments import bench_report
from experiments import figures
from experiments import gpu_runs
from experiments import grids
from experiments.grid_results import (METRICS, group_by_method, has_results, in_words, load_analysis, load_measured,
                                      load_results, report_sections, section_entries, spread_cell, train_lens)
from lib import cli
from lib import runs
from lib.files import UserError, write_atomically

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
README = os.path.join(HERE, "README.md")
HEADLINE_GRID = "default"  # the grid whose headline table README.md shows
# The README's one table: the main methods, FoPE's two parts alone and its rivals (row label -> method, and what
# the caption says a label means where it is not a method's name), at four of the grid's lengths
# (multiples of train_len: 8x is left out for a table that fits a screen).
HEADLINE_ROWS = {"RoPE": ("rope", ""), "FoPE": ("fope", ""), "ALiBi": ("alibi", ""), "NoPE": ("nope", ""),
                 "CF only": ("fope-nofs", "FoPE without its Fourier series (clipped RoPE)"),
                 "FS only": ("fope-nocf", "FoPE without its clip floor"),
                 "FoPE as deployed": ("fope-deployed", "FoPE as Intern-S1-Pro deploys it (one coefficient set for the "
                                      "model, no head_dim/4 cap, padded pairs an identity, gain 0.5, QK-norm)"),
                 "CoPE": ("cope", "RoPE with CoPE's soft clip (the band FoPE clips tapered to zero)"),
                 "RoPE + QK-norm": ("rope-qknorm", "")}
HEADLINE_MULTIPLES = (1, 2, 4, 16)
TABLE_TITLES = {"ppl": "Perplexity", "ppl_ratio": "Perplexity ratio to train_len", "accuracy": "Passkey accuracy",
                "sotu_ppl": "Perplexity on sotu", "sotu_ratio": "Perplexity ratio to train_len on sotu"}


def table(section, metric, results, lengths):
    """Markdown rows = groups, columns = lengths; 'mean (min–max)' over a group's entries."""
    lines = [f"| {TABLE_TITLES[metric]} | " + " | ".join(map(str, lengths)) + " |",
             "|---" * (len(lengths) + 1) + "|"]
    for label, entries in section.groups.items():
        cells = [spread_cell(results, entries, metric, length) for length in lengths]
        done = sum(1 for entry in entries if results[entry].get(METRICS[metric][0]))
        if done:
            lines.append(f"| {row_label(label, done, len(entries))} | " + " | ".join(cells) + " |")
    return lines


def row_label(label, done, total):
    """'rope (3 seeds)', 'rope (2 of 3 seeds)', or the label alone for a single run."""
    if total == 1:
        return label
    return f"{label} ({done} seeds)" if done == total else f"{label} ({done} of {total} seeds)"


def section_markdown(section, results, lengths, figure_dir):
    """Title, text, figure links and a table per metric its entries are evaluated with, then the runs
    behind rows and those missing."""
    missing = [entry for entry in section_entries(section) if not all(results[entry].values())]
    lines = [f"#### {section.title}", "", section.text, ""]  # under the README's "### Results"
    if has_results(section, results):
        lines += [f"![{section.title}: {', '.join(METRICS[m][2] for m in metrics)}]({figure_dir}{name})"
                  for name, metrics in section.figures] + [""]
        for metric in METRICS:
            rows = table(section, metric, results, lengths)
            if len(rows) > 2:  # a table only where some entry has this evaluation
                lines += rows + [""]
    rows = "; ".join(f"{label} = {', '.join(group)}" for label, group in section.groups.items() if group != [label])
    if rows:
        lines += [f"Runs behind each row: {rows}.", ""]
    if missing:
        lines += [f"Not yet evaluated in full: {', '.join(missing)}.", ""]
    return lines


def diagnostics_markdown(results):
    """A table of eval_passkey.py's diagnostics at train_len, one row per evaluated run: which
    digits of the key the model finds, and whether it copies by looking the key up."""
    rows = [(entry, kinds["passkey"]["diagnostics"]) for entry, kinds in results.items()
            if kinds["passkey"] and "diagnostics" in kinds["passkey"]]
    if not rows:
        return []
    lines = ["#### Copying at train_len", "",
             "With the true answer fed in: the share of first key digits (the needle found) and of later ones (each a copy "
             "of the digit that followed the previous one in the needle) that are the model's top prediction; a "
             "guess gets 10%. Then the later digits of the needle's own repeat of the key (\"Remember it. N is the "
             "pass key.\"), as trained and with the two mentions three words further apart: a model that learned to "
             "copy from a fixed distance back loses them there, one that looks the key up does not.", "",
             "| run | answer: first digit | answer: later digits | needle repeat: later digits | "
             "3 words further |", "|---|---|---|---|---|"]
    lines += [f"| {entry} | {d['first_digit_accuracy']:.0%} | {d['later_digit_accuracy']:.0%} | "
              f"{d['repeat_later_digits']:.0%} | {d['repeat_later_digits_further']:.0%} |" for entry, d in rows]
    return lines + [""]


# What the retrieval paragraph calls a fall: below half of what it is compared with.
FALL = 0.5


def retrieval_reading(found, train_len):
    """One verdict for a run's retrieval attention (analyze.py), at the shortest prompt past
    train_len where its retrieval head loses the key: for needles within train_len of the answer
    too (dilution: the other tokens take the attention), or only for needles further back
    (distance)?"""
    reference = found["lengths"][str(found["reference_length"])]["mean_weight"]
    if reference < FALL:
        return f"its answer hardly looks at the key even at {found['reference_length']} tokens ({reference:.2f})"
    longer = sorted(int(n) for n in found["lengths"] if int(n) > train_len)
    if not longer:
        return "not measured past train_len"
    for n in longer:
        near, far = found["lengths"][str(n)]["mean_weight_near"], found["lengths"][str(n)]["mean_weight_far"]
        diluted = near is not None and near < FALL * reference
        distant = far is not None and near is not None and far < FALL * near
        if diluted or distant:
            verdict = {(True, True): "dilution and distance", (True, False): "dilution", (False, True): "distance"}
            return f"{verdict[(diluted, distant)]} (from {n} tokens)"
    return f"neither: its retrieval head still finds the key (up to {longer[-1]} tokens)"


def retrieval_markdown(results_grid, figure_dir):
    """The retrieval-attention table of the grid's analysis (analyze.py), with a verdict per run;
    empty when the grid has no analysis yet."""
    records = [r for r in load_analysis(results_grid)
               if r.get("retrieval_attention") and "skipped" not in r["retrieval_attention"]]
    if not records:
        return []
    train_len = records[0]["train_len"]
    lengths = sorted({int(n) for r in records for n in r["retrieval_attention"]["lengths"]})

    def cell(trials, key, form=".2f"):
        value = trials.get(key) if trials else None
        return "–" if value is None else format(value, form)

    lines = ["#### Why retrieval fails past train_len", "",
             f"![where the passkey answer looks]({figure_dir}analysis/retrieval_attention.png)", "",
             "For each run, the head whose answer position (the one that predicts the key's first digit) attends most "
             f"to the key's digits in prompts of train_len = {train_len} tokens; then, as the prompt grows, its "
             "attention on the key for needles within train_len of the answer / further back, and the entropy of its "
             "attention (nats; spread evenly over T tokens it would be ln T), and how often the model's top prediction "
             "there is the key's first digit (the needle found, whatever comes after). "
             f"{records[0]['retrieval_attention']['trials']} "
             "prompts a length (analyze.py). Reading: *dilution* where the weight on needles within train_len falls "
             f"below {FALL:.0%} of its value at train_len as the prompt grows (the other tokens take the attention); "
             f"*distance* where needles further back get below {FALL:.0%} of the weight of the near ones (distances, "
             f"so phases, never seen in training); a head with less than {FALL:.0%} of its attention on the key even at "
             "train_len is read as not looking at it.", "",
             "| run | head | " + " | ".join(f"key weight {n}" for n in lengths) + " | "
             + " | ".join(f"entropy {n}" for n in lengths) + " | "
             + " | ".join(f"first digit {n}" for n in lengths) + " | reading |",
             "|---" * (3 + 3 * len(lengths)) + "|"]
    for record in records:
        found = record["retrieval_attention"]
        at = [found["lengths"].get(str(n)) for n in lengths]
        weights = [f"{cell(t, 'mean_weight_near')} / {cell(t, 'mean_weight_far')}" if t else "–" for t in at]
        lines.append(f"| {record['run']} | L{found['layer']} H{found['head']} | " + " | ".join(weights) + " | "
                     + " | ".join(cell(t, "mean_entropy") for t in at) + " | "
                     + " | ".join(cell(t, "first_digit_accuracy", ".0%") for t in at)
                     + f" | {retrieval_reading(found, train_len)} |")
    return lines + ["", "Key weight: needle within train_len of the answer / further back (– where no prompt has "
                    "one); head: the retrieval head, layer L, head H.", ""]


def grid_steps(grid, results_grid):
    """(title, done) of every step of the grid: a run's training is done when nothing needs its
    checkpoint any more, an evaluation when its JSON is current."""
    done = []
    for kind, run, entry, _ in grids.steps(grid, grid.runs):
        if kind == "train":
            finished = not grids.needs_checkpoint(grid, run, grid.runs, results_grid)
        else:
            finished = grids.step_is_current(grid, kind, run, entry, results_grid)
        done.append((grids.step_title(kind, run, entry), finished))
    return done


def measured_markdown(grid, results_grid):
    """What the grid's finished steps cost and where they ran, from steps.jsonl and
    environment.json (empty when either is missing). A step finished twice counts its last run."""
    measured = load_measured(results_grid)
    if measured is None:
        return []
    records, environment = measured
    steps = grid_steps(grid, results_grid)
    timed = [title for title, _ in steps if title in records]
    in_part = [title.split(maxsplit=1)[1] for title in timed
               if title.startswith("train ") and records[title]["earlier_seconds"] is None]
    by_kind = {}
    for title in timed:
        kind = title.split()[0]
        by_kind[kind] = by_kind.get(kind, 0.0) + step_seconds(title, records[title])
    kinds = ", ".join(f"{kind} {runs.clock(total)}" for kind, total in by_kind.items())
    untimed = [title for title, done in steps if title not in records and done]  # done, but not in steps.jsonl
    return [f"Measured: {len(timed)} of the grid's {len(steps)} steps took "
            f"{runs.clock(sum(by_kind.values()))} of wall time ({kinds})"
            + (f"; not timed: {', '.join(untimed)}" if untimed else "")
            + (f"; timed in part (resumed from a checkpoint that recorded neither the time nor the CPU of the earlier part): "
               f"{', '.join(in_part)}" if in_part else "")
            + f". {where_trained(timed, records)} Last run with Python {environment['python']} and torch "
            f"{environment['torch']}; every step's command line, time and CPU are in `steps.jsonl`, the versions "
            f"in `environment.json`, beside the results.", ""]


def step_seconds(title, record):
    """A step's wall time: its own, and for a training the training time that the processes
    before it spent on the run (earlier_seconds; null where that was not measured)."""
    earlier = record["earlier_seconds"] if title.startswith("train ") else 0.0
    return record["seconds"] + (earlier or 0.0)


def where_trained(timed, records):
    """The machines each timed run was trained on (runs made on different CPUs are compared in
    the same precision, but their times are not comparable)."""
    by_machine = {}
    for title in timed:
        if title.startswith("train "):
            for machine in records[title]["machines"]:
                by_machine.setdefault(machine, []).append(title.split(maxsplit=1)[1])
    return " ".join(f"Trained on {machine}: {', '.join(names)}." for machine, names in by_machine.items())


def saved_precision(results):
    """What the saved results were computed in, from their own records (a grid's pinned precision
    need not be the one its saved results were made with)."""
    def used(kind, read):
        return "/".join(sorted({read(kinds[kind]) for kinds in results.values() if kinds.get(kind)}))
    trained = used("ppl", lambda record: record["train_config"]["dtype"])
    evaluated = used("ppl", lambda record: record["eval_dtype"])
    if trained == evaluated == "fp32":
        return "Trained and evaluated in fp32."
    return f"The saved runs were trained in {trained} and their perplexity computed in {evaluated}; passkey in fp32."


def report_markdown(grid_name, grid, results, has_readings, measured, body):
    """The report's Markdown: what the grid ran and how, a link to its typed readings (has_readings:
    readings.md is beside results.md), `measured` from measured_markdown, then `body`, the lines of
    its sections."""
    readings = ["Readings of these results, typed and checked against the JSON by tests/test_readings.py: "
                "[readings.md](readings.md).", ""] if has_readings else []
    lines = [f"Grid `{grid_name}` of `experiments/grids.py`. {grid.about}", "", *readings,
             f"Training: train.py's defaults with `{shlex.join(grid.training)}` "
             f"(per run: see `{grid_name.upper()}` in experiments/grids.py). Perplexity: eval_ppl.py "
             f"{shlex.join(grid.ppl_args) or '(every validation token)'}; passkey: eval_passkey.py "
             f"{shlex.join(grid.passkey_args)}. {saved_precision(results)} Generated by "
             f"`python -m experiments.report --grid {grid_name}` from the evaluation JSON.", "",
             "In the tables a cell of several seeds is their mean (lowest–highest); a passkey cell of one run is its "
             "accuracy (its 95% Wilson interval over the run's prompts). In the figures each run's passkey accuracy "
             "carries that interval as an error bar.", "", *measured]
    return "\n".join(lines + body)


def headline_markdown(grid, results, gpu):
    """Perplexity ratio to train_len and passkey accuracy, 'mean (lowest–highest)' over the seeds
    evaluated so far, for the rows of HEADLINE_ROWS that the grid has; a row with no CPU run
    evaluated yet stands on the GPU's runs of its method where there are some (gpu_runs.stand_ins)."""
    groups = group_by_method(run.name for run in grid.runs)
    planned = {label: groups[method] for label, (method, _) in HEADLINE_ROWS.items() if method in groups}
    # a row stands on the runs with both evaluations; a partly finished grid says how many it has
    rows = {label: [entry for entry in entries if results[entry].get("ppl") and results[entry].get("passkey")]
            for label, entries in planned.items()}
    stood_in = {label: gpu_runs.stand_ins(gpu, planned[label]) for label, entries in rows.items() if not entries}
    stood_in = {label: keys for label, keys in stood_in.items() if keys}
    rows.update(stood_in)
    shown = {**results, **gpu.results}
    evaluated = [entry for entries in rows.values() for entry in entries]
    if not evaluated:
        return f"No run of the headline grid `{HEADLINE_GRID}` has both evaluations yet."
    train_len = train_lens(shown, evaluated)[0]
    lengths = [m * train_len for m in HEADLINE_MULTIPLES]
    lines = ["| | " + " | ".join(f"ppl ratio {m}×" for m in HEADLINE_MULTIPLES) + " | "
             + " | ".join(f"passkey {m}×" for m in HEADLINE_MULTIPLES) + " |",
             "|---" * (1 + 2 * len(lengths)) + "|"]
    for label, entries in rows.items():
        cells = [spread_cell(shown, entries, metric, length) for metric in ("ppl_ratio", "accuracy") for length in lengths]
        name = gpu_runs.stand_in_label(gpu, label, entries) if label in stood_in else \
            row_label(label, len(entries), len(planned[label]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    runs_behind = "; ".join(f"{label} {runs_in_brief(entries) or 'none yet'}" for label, entries in rows.items())
    missing = [entry for label, entries in planned.items() for entry in entries if entry not in rows[label]]
    if missing:
        runs_behind += f". Not yet evaluated: {runs_in_brief(missing)}"
    trials = sorted({shown[entry]["passkey"]["trials"] for entry in evaluated})
    meanings = "; ".join(f"{label}: {meaning}" for label, (_, meaning) in HEADLINE_ROWS.items()
                         if meaning and label in rows)
    one_run = "; one run's passkey accuracy with its 95% Wilson interval" * any(
        len(entries) == 1 for entries in rows.values())
    return "\n".join(lines + [
        "", f"Perplexity at T over perplexity at train_len = {train_len} and passkey accuracy "
        f"({in_words(map(str, trials), 'or')} prompts a length) at T = {in_words(map(str, HEADLINE_MULTIPLES))} "
        f"× train_len: mean (lowest–highest) over seeds{one_run}. {meanings + '. ' if meanings else ''}"
        f"{gpu_runs.stand_in_note(gpu, stood_in, HEADLINE_GRID)}"
        f"{saved_precision(shown)} Runs: {runs_behind}. Generated by `python -m experiments.report` from "
        f"results/{HEADLINE_GRID}/{' and results/gpu/' * bool(stood_in)}; every table: "
        f"results/{HEADLINE_GRID}/results.md."])


def runs_in_brief(entries):
    """'rope-s0/s1/s2', 'cope-s0 (H200)': runs named once per method, with their seeds."""
    seeds = {}
    for entry in entries:
        name, _, device = entry.partition(" ")
        method, seed = name.rsplit("-s", 1)
        seeds.setdefault((method, device), []).append(seed)
    return ", ".join(f"{method}-s{'/s'.join(found)}{' ' + device if device else ''}"
                     for (method, device), found in seeds.items())


def update_readme(path, block, name="results"):
    """Replace the text between the README's markers <!-- name:begin --> and <!-- name:end -->
    by `block` (generated, never typed); returns what happened."""
    begin_marker, end_marker = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    with open(path) as f:
        text = f.read()
    begin, end = text.find(begin_marker), text.find(end_marker)
    if begin < 0 or end < begin:
        return f"{path} has no {begin_marker} ... {end_marker} markers: left unchanged"
    text = text[:begin + len(begin_marker)] + "\n" + block.strip() + "\n" + text[end:]
    write_atomically(path, text.encode())
    return f"updated the {name} block of {path}"


def write_report(grid_name, results_grid, readme=README):
    """Every figure, results.md and (for the headline grid) the README's table (into `readme`; None:
    no README), from saved JSON: every record is read, checked and turned into Markdown first, so
    that a bad one stops the report before it writes anything."""
    grid = grids.GRIDS[grid_name]
    results = load_results(grid, results_grid)
    if not any(record for kinds in results.values() for record in kinds.values()):
        raise UserError(f"no evaluation results in {results_grid}: run the grid first")
    gpu = gpu_runs.load(os.path.dirname(results_grid), grid_name)
    shown = {**results, **gpu.results}  # the grid's entries, and the GPU's runs beside them
    sections = report_sections(grid) + gpu_runs.rival_sections(grid, results, gpu)
    scale = gpu_runs.scale_rows(grid, results, gpu)
    retrieval = retrieval_markdown(results_grid, "")  # the analysis is checked before grid_steps reads it
    body = [line for section in sections for line in section_markdown(section, shown, grid.lengths, "")]
    body += gpu_runs.scale_markdown(grid, shown, scale, "") + diagnostics_markdown(results) + retrieval
    markdown = report_markdown(grid_name, grid, results, os.path.exists(os.path.join(results_grid, "readings.md")),
                               measured_markdown(grid, results_grid), body)
    headline = headline_markdown(grid, results, gpu) if grid_name == HEADLINE_GRID else None
    machines = bench_report.machines_markdown(os.path.dirname(results_grid)) if headline is not None else ""
    drawn = [(figures.draw(section, metrics, shown, grid.lengths), os.path.join(results_grid, name))
             for section in sections if has_results(section, shown) for name, metrics in section.figures]
    if any(row.keys for row in scale):
        drawn.append((gpu_runs.draw_scale(shown, scale, gpu_runs.ladder_train_len(grid)),
                      os.path.join(results_grid, "scale.png")))
    markdown_path = os.path.join(results_grid, "results.md")
    with cli.uninterrupted(cli.WRITTEN):  # a stop waits for the figures, results.md and the README
        for fig, path in drawn:
            figures.save(fig, path)
        write_atomically(markdown_path, f"### Results of the {grid_name} grid\n\n{markdown}\n".encode())
        print(f"wrote {markdown_path} and its figures")
        if headline is not None and readme:
            print(update_readme(readme, headline, "headline"))
            if machines:
                print(update_readme(readme, machines, "machines"))
        elif headline is not None:
            print(f"left {README} as it is: these results are not the repository's results/ (--readme names a "
                  f"README to update)")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--grid", choices=sorted(grids.GRIDS), default="default", help="which grid")
    parser.add_argument("--results_dir", default="results", help="the grid's results are in RESULTS_DIR/<grid>/")
    parser.add_argument("--readme", help="the README whose headline block the headline grid's table replaces "
                        "(default: README.md of the repository, when RESULTS_DIR is its results/; else none)")
    return parser.parse_args(argv)


def main(argv=None):
    """Write the report; missing or damaged results and I/O errors end in one line (cli.run)."""
    args = parse_args(argv)
    own = os.path.realpath(args.results_dir) == os.path.realpath(os.path.join(HERE, "results"))
    readme = args.readme or (README if own else None)
    cli.run("report.py", lambda: write_report(args.grid, os.path.abspath(os.path.join(args.results_dir, args.grid)),
                                              readme))


if __name__ == "__main__":
    main()
