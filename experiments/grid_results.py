"""
grid_results.py: a grid's saved evaluation JSON as the report reads it: every entry's records
(load_results), its runs grouped into the sections, curves and table rows the report shows
(report_sections: a method's seeds form one curve), and the values a curve or a cell stands on.
"""

import json
import re
import shlex
from dataclasses import dataclass

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
    """The sections the grid has runs for, in reading order."""
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
    for name, title, text in (
            ("rival", "Rivals", "What the field did after FoPE, at the default size: `fope-deployed` FoPE as Intern-S1-Pro "
             "deploys it (`--fope_variant deployed`), `cope` RoPE with CoPE's soft clip, `rope-qknorm` RoPE with QK-norm."),
            ("ladder", "Model size", "RoPE, FoPE and ALiBi at width 128 (2 heads) and 512 (8 heads) beside the main runs' "
             "256: head_dim 64 at every width.")):
        chosen = [run.name for run in grid.runs if run.section == name]
        if chosen:
            sections.append(Section(title, text, group_by_method(chosen), [(f"{name}.png", ["ppl_ratio", "accuracy"])]))
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
    grid evaluates the entry with."""
    results = {entry: {} for entry in grids.entries(grid)}
    for kind, _, entry, _ in grids.steps(grid, grid.runs):
        if kind not in KINDS:
            continue
        path = grids.result_path(results_grid, kind, entry)
        script = "eval_passkey.py" if kind == "passkey" else "eval_ppl.py"
        try:
            with open(path) as f:
                results[entry][kind] = json.load(f)["checkpoints"][0]
        except FileNotFoundError:
            results[entry][kind] = None
        except (ValueError, KeyError, IndexError):
            raise UserError(f"{path} is not an evaluation result of {script}: delete it to evaluate again") from None
    return results


def values_at(results, entries, metric, length):
    """The metric at one length, one value for each entry that has it."""
    kind, key, _ = METRICS[metric]
    records = [results[entry][kind] for entry in entries if results[entry].get(kind)]
    return [record[key][str(length)] for record in records if str(length) in record[key]]


def train_lens(results, entries):
    """The training lengths of the entries with results (the dashed lines of a figure)."""
    return sorted({record["train_len"] for entry in entries for record in results[entry].values() if record})


def section_entries(section):
    """Every entry of a section, group by group."""
    return [entry for group in section.groups.values() for entry in group]


def has_results(section, results):
    """Whether any entry of the section has been evaluated."""
    return any(record for entry in section_entries(section) for record in results[entry].values())
