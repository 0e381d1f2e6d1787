"""
grids.py: the experiments as data. A grid is the runs it trains (train.py arguments on top of
the grid's shared ones), the context extensions it evaluates without training, and the lengths
and arguments of its evaluations. `python -m experiments.reproduce --grid NAME` runs one;
`python -m experiments.report --grid NAME` turns its saved results into figures and tables.

    default   RoPE, FoPE, ALiBi, NoPE (3 seeds each), FoPE ablations, head_dim, context extension, at byte
              level with the retrieval preset (CPU, ~30 h)
    quick     the same pipeline with tiny models (about a minute): checks that everything runs
    gpu60m    the paper's 60M shape on FineWeb-Edu, for a GPU (untested here)
    bpe256    train.py without a preset: BPE-4096 at train_len 256, no retrieval recipe (CPU, ~6 h)

The end of the file reads a grid: each run's train.py command, the evaluations it owes, and
whether a saved result is still this grid's.
"""

import json
import os
from dataclasses import dataclass, field

from lib import cli
from lib import runs
from lib import settings

@dataclass
class Run:
    """One training run: a name and its train.py arguments (on top of the grid's shared ones)."""
    name: str
    section: str         # where the report shows it: "main", "ablation", "finetune", "headdim", "rival", "ladder"
    args: list
    init_from: str = ""  # a fine-tune: the run whose checkpoint it continues


@dataclass
class Extension:
    """Context extension without training: a trained run evaluated with rescaled rotary
    frequencies (the --rope_scaling options of eval_ppl.py and eval_passkey.py)."""
    name: str
    run: str
    args: list


@dataclass
class Grid:
    about: str           # one paragraph for --dry_run and the report
    training: list       # train.py arguments shared by every run
    runs: list           # in order; a fine-tune comes after the run it starts from
    extensions: list
    lengths: list        # evaluation lengths in tokens, for perplexity and passkey alike (cli.evaluation_lengths)
    ppl_args: list       # further eval_ppl.py arguments
    passkey_args: list   # further eval_passkey.py arguments
    threads: int = 0     # torch threads per step (OMP_NUM_THREADS); 0: torch's default, every core
    sotu_args: list = field(default_factory=list)  # eval_ppl.py arguments on the sotu text (none: no such step)
    analysed: list = field(default_factory=list)  # runs whose checkpoints analyze.py compares in one report
    analysis_args: list = field(default_factory=list)  # further analyze.py arguments


# Seed i of a method: model init and text batches (--seed), and the passkey mix (--passkey_seed).
# Seed 0 is train.py's default.
SEEDS = [["--seed", "1337", "--passkey_seed", "1000"],
         ["--seed", "1338", "--passkey_seed", "1001"],
         ["--seed", "1339", "--passkey_seed", "1002"]]


def seeded(method, section, args, seed, init_from=""):
    """The run of `method` (its train.py arguments `args`) at seed i, named <method>-s<i>: every
    run of a grid says its seed in its name, and the report averages a method over its seeds."""
    return Run(f"{method}-s{seed}", section, [*args, *SEEDS[seed]], init_from)

# FoPE's two parts alone (defined in FAITHFULNESS.md): run name -> train.py arguments
FOPE_PARTS = {"fope-nocf": ["--pe", "fope", "--fope_cf", "false"],  # Fourier series, no clip floor
              "fope-nofs": ["--pe", "fope", "--fope_fs", "false"]}  # clip floor only: clipped RoPE

# The CPU grids pin float32 (train.py's "auto" would pick bf16 on CPUs that have it) so that runs
# made on different CPUs compute the same thing.
CPU_PRECISION = ["--dtype", "fp32"]


def finetune(train_len):
    """The fine-tunes of the extension experiment: twice train_len at half the batch, so a step
    keeps its tokens; 150 steps are an eighth of pre-training's tokens, the passkey mix stays on.
    train.py starts the optimizer afresh (the authors resume theirs; see FAITHFULNESS.md): 10
    warm-up steps rebuild Adam's moments, and a peak lr of a quarter of pre-training's 2e-3 adapts
    the model to the longer length without undoing pre-training."""
    return ["--train_len", str(2 * train_len), "--batch_size", "8", "--max_steps", "150", "--warmup_steps", "10",
            "--lr", "5e-4"]


def yarn_after(train_len):
    """YaRN as the authors fine-tune with it: s = 16 around the original length (their yarn_after configs)."""
    return ["--rope_scaling", "yarn", "--rope_scale", "16", "--rope_original_len", str(train_len)]


def rivals_and_ladder(full):
    """(method, section, train.py arguments, seeds) of the rows issue 42 adds to the full grid: the
    field's rivals at the default size on 3 seeds (FoPE as Intern-S1-Pro deploys it, CoPE's soft
    clip, RoPE with QK-norm), then a model-size ladder at head_dim 64 (FoPE keeps the same
    frequencies at every width): RoPE, FoPE and ALiBi at width 128 with 2 heads (3 seeds) and at
    width 512 with 8 heads (2 seeds, each costing about 4 default runs), and FoPE's two parts alone
    at width 128 (3 seeds), so that the Fourier series' part is measured at two sizes."""
    if not full:
        return []
    rivals = [("fope-deployed", "rival", ["--pe", "fope", "--fope_variant", "deployed"], 3),
              ("cope", "rival", ["--pe", "cope"], 3),
              ("rope-qknorm", "rival", ["--pe", "rope", "--qk_norm", "true"], 3)]
    methods = {**{pe: ["--pe", pe] for pe in ("rope", "fope", "alibi")}, "fope-nofs": FOPE_PARTS["fope-nofs"],
               "fope-nocf": FOPE_PARTS["fope-nocf"]}
    ladder = {128: (3, list(methods)), 512: (2, ["rope", "fope", "alibi"])}  # width: (seeds, methods)
    return rivals + [(f"{method}-w{width}", "ladder", [*methods[method], "--n_embd", str(width), "--n_head",
                                                      str(width // 64)], seeds)
                     for width, (seeds, names) in ladder.items() for method in names]


def shakespeare_grid(about, training, ppl_args, full, extra_lengths=()):
    """The CPU experiment on train.py's CPU model: RoPE, FoPE, ALiBi and NoPE, the extension
    experiment, FoPE's ablations, RoPE's training-free extensions. RoPE and FoPE run on 3 seeds; with
    full, ALiBi, NoPE and FoPE's two parts alone (nocf, nofs) do too, and RoPE and FoPE also run at
    head_dim 32 and 128. Ordered so that a partly finished grid is already informative: seed 0 of
    every method (FoPE's two parts alone among them), the fine-tunes that start from two of them,
    the other seeds, then the one-seed ablations and the head_dim sweep. Evaluated at
    cli.evaluation_lengths of train_len and extra_lengths."""
    shared = settings.parse_args(training)[1]  # the settings every run starts from
    ft, yarn = finetune(shared["train_len"]), yarn_after(shared["train_len"])
    on_three_seeds = ["rope", "fope", "alibi", "nope"] if full else ["rope", "fope"]
    parts_on_three_seeds = (1, 2) if full else ()  # the seeds of FoPE's two parts alone besides 0
    head_counts = (8, 2) if full else ()  # head_dim 32 and 128 at width 256
    return Grid(
        about=about,
        training=training,
        runs=[
            *[seeded(pe, "main", ["--pe", pe], 0) for pe in ("rope", "fope", "alibi", "nope")],
            # FoPE's two parts alone at seed 0, rows of the headline table
            *[seeded(part, "ablation", args, 0) for part, args in FOPE_PARTS.items()],
            # the paper's extension experiment: continue at 2x train_len with YaRN or with FoPE
            seeded("ext-rope-yarn", "finetune", ["--pe", "rope", *ft, *yarn], 0, init_from="rope-s0"),
            seeded("ext-rope-fope", "finetune", ["--pe", "fope", "--fope_grow", "fresh", *ft], 0, init_from="rope-s0"),
            seeded("ext-fope-yarn", "finetune", ["--pe", "fope", "--fope_grow", "zeros", *ft, *yarn], 0,
                   init_from="fope-s0"),
            seeded("ext-fope-fope", "finetune", ["--pe", "fope", "--fope_grow", "fresh", *ft], 0, init_from="fope-s0"),
            *[run for seed in (1, 2) for run in (
                *[seeded(pe, "main", ["--pe", pe], seed) for pe in on_three_seeds],
                *[seeded(part, "ablation", args, seed) for part, args in FOPE_PARTS.items()
                  if seed in parts_on_three_seeds])],
            # the other FoPE ablations at seed 0; fope-s0 is the reference with sigma 0.3
            seeded("fope-sinpad0", "ablation", ["--pe", "fope", "--fope_sin_pad", "0"], 0),  # padded pairs: identity
            # sigma 0 is not run: with FS on it equals fope-nofs, since K <= head_dim/4 = 16 (K = 13 at
            # train_len 256, 15 at 384)
            seeded("fope-sigma1", "ablation", ["--pe", "fope", "--fope_sigma", "1"], 0),
            seeded("fope-sigma3", "ablation", ["--pe", "fope", "--fope_sigma", "3"], 0),
            # the paper's Fig. 5c at one seed: head_dim 32 and 128 at the same width (K and M change with it)
            *[seeded(f"{pe}-hd{shared['n_embd'] // heads}", "headdim", ["--pe", pe, "--n_head", str(heads)], 0)
              for heads in head_counts for pe in ("rope", "fope")],
            # issue 42, after the runs above: seed 0 of every new row first, then seeds 1 and 2
            *[seeded(method, section, args, seed) for seed in range(3)
              for method, section, args, seeds in rivals_and_ladder(full) if seed < seeds],
        ],
        # RoPE extended without training; s = 16 covers the 16x range (the authors' YaRN also uses 16)
        extensions=[Extension(f"rope-s{seed}+{method}16", f"rope-s{seed}", ["--rope_scaling", method, "--rope_scale", "16"])
                    for seed in range(3) for method in ("pi", "ntk", "yarn")],
        lengths=sorted({*cli.evaluation_lengths(shared["train_len"]), *extra_lengths}),
        ppl_args=ppl_args,
        passkey_args=["--trials", "100"],
        # sotu, prose of another genre than the plays: the first 131 072 tokens of the State of the
        # Union messages of 1790-1899 (data.load_sotu)
        sotu_args=["--text", "sotu", *ppl_args] if full else [],
        # why retrieval fails past train_len: every seed of each main method, side by side (run after
        # the last of them, nope-s2; until then the report shows the analysis saved before)
        analysed=[f"{pe}-s{seed}" for seed in range(3) for pe in on_three_seeds] if full else [],
        analysis_args=["--passkey_trials", "20"],
    )


# train.py's CPU model (4 layers, 256 wide, head_dim 64) on Shakespeare with the retrieval preset:
# byte-level tokens, train_len 384, 16 x 384 bytes a step, PyTorch's initialisation, half the
# sequences passkey prompts with loss on the answer, 3200 steps (settings.py; FAITHFULNESS.md).
# Evaluated from half train_len to 16x; 288 because a passkey prompt needs 247 bytes of fixed text, so
# half train_len (192) holds none: perplexity only there.
DEFAULT = shakespeare_grid(
    about="The CPU model of train.py on Shakespeare at byte level (train.py --preset retrieval), trained at "
          "384 bytes and evaluated to 16x; perplexities are per byte. Its wall time on a machine is measured, "
          "not typed: `python -m experiments.bench` estimates it from that machine's rates for each --jobs "
          "(results/bench.md), and what the committed steps took is below.",
    training=["--preset", "retrieval", *CPU_PRECISION],
    # the authors' chunked protocol on the first 131 072 validation bytes (about 35k BPE-4096 tokens of text)
    ppl_args=["--max_tokens", "131072", *CPU_PRECISION],
    full=True,
    extra_lengths=[288],
)

# train.py's CPU model without a preset: BPE-4096 tokens at train_len 256, OLMo's initialisation, loss
# on the passkey answer and the key's repeat, 1200 steps. Its rotary models do not learn passkey
# retrieval (EXPERIMENTS.md); its perplexities compare the position embeddings at another
# tokenization, length and budget than the default grid's.
BPE256 = shakespeare_grid(
    about="train.py's CPU model without a preset (no retrieval recipe), with BPE-4096 tokens, trained at "
          "256 tokens and evaluated to 16x; its rotary models did not learn passkey retrieval. Estimated time on "
          "2 CPU cores at about 5k tokens/s: 13 runs x 16 min of training, 4 fine-tunes x 2-3 min, 26 "
          "evaluations x (1-2 min perplexity + 3 min passkey); about 6 hours in all.",
    training=["--passkey_frac", "0.5", "--max_steps", "1200", *CPU_PRECISION],
    # the authors' chunked protocol on the first 65 536 validation tokens (16 chunks at 4096):
    # half the evaluation time of all 142k tokens
    ppl_args=["--max_tokens", "65536", *CPU_PRECISION],
    full=False,
)

# Tiny models that exercise every kind of step in about a minute. train_len 128 leaves room for
# passkey samples: the fixed prompt text takes 95 BPE-4096 tokens and the answer up to 7 more.
QUICK_TRAINING = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--train_len", "128", "--batch_size", "4",
                  "--max_steps", "25", "--warmup_steps", "5", "--passkey_frac", "0.5", "--eval_batches", "2",
                  *CPU_PRECISION]

QUICK = Grid(
    about="A smoke test of the pipeline with 1-layer, 32-wide models trained for 25 steps: "
          "its numbers mean nothing.",
    training=QUICK_TRAINING,
    runs=[
        *[seeded(pe, "main", ["--pe", pe], seed) for pe in ("rope", "fope") for seed in (0, 1)],
        seeded("fope-nofs", "ablation", FOPE_PARTS["fope-nofs"], 0),
        seeded("ext-rope-fope", "finetune", ["--pe", "fope", "--fope_grow", "fresh", "--train_len", "256",
                                             "--batch_size", "2", "--max_steps", "10", "--warmup_steps", "2",
                                             "--lr", "5e-4"], 0, init_from="rope-s0"),
    ],
    extensions=[Extension("rope-s0+yarn4", "rope-s0", ["--rope_scaling", "yarn", "--rope_scale", "4"])],
    lengths=cli.evaluation_lengths(128, longest=4),  # to 4x: every kind of length, in a few seconds a step
    ppl_args=["--max_tokens", "4096", *CPU_PRECISION],
    passkey_args=["--trials", "4"],
    # Matrices this small gain nothing from a second thread, and on a machine whose cores are busy
    # two threads wait for each other: one thread trains several times faster there.
    threads=1,
    sotu_args=["--text", "sotu", "--max_tokens", "4096", *CPU_PRECISION],
    analysed=["rope-s0", "fope-s0"],
    analysis_args=["--passkey_trials", "4", "--text_tokens", "256", "--max_distance", "512"],
)

GPU60M = Grid(
    about="The paper's 60M shape (train.py --preset gpu60m: 8 layers, 512 wide, 8 heads, train_len 512, "
          "20 000 steps of 64 x 512 tokens) on FineWeb-Edu with the GPT-2 tokenizer, in bf16, for one GPU or "
          "several with torchrun. Untested here (no GPU, no network; streaming needs the datasets package). "
          "Data: train.py streams as much text as one pass over the run's 655M training tokens needs, and a "
          "tenth more (--hf_tokens, about 2.9 GB of text at 4 characters a token), then tokenizes it once on "
          "one CPU core (tens of minutes at a few MB/s: an estimate, not measured) into a cache that every "
          "later run reuses. Estimate, not measured: about 2.5e17 training FLOPs per run, so about an hour "
          "per run on one A100 and 3-4 hours with evaluations.",
    # a small passkey mix: a 60M model learns more from web text than the tiny CPU models do
    training=["--preset", "gpu60m", "--dataset", "hf:HuggingFaceFW/fineweb-edu", "--tokenizer", "gpt2",
              "--passkey_frac", "0.1", "--dtype", "bf16"],
    runs=[
        *[seeded(pe, "main", ["--pe", pe], 0) for pe in ("rope", "fope", "alibi")],
    ],
    extensions=[],
    lengths=cli.evaluation_lengths(512),
    ppl_args=["--dtype", "bf16"],
    passkey_args=["--trials", "100"],
)

GRIDS = {"default": DEFAULT, "quick": QUICK, "gpu60m": GPU60M, "bpe256": BPE256}


# -----------------------------------------------------------------------------
# reading a grid

# Settings a saved run may differ in and still be this grid's: those train.py lets a resumed run
# change, except the precision, which a grid pins so that its runs compute the same thing.
NOT_COMPARED = settings.RESUMABLE - {"dtype"}


def entries(grid):
    """Every evaluated name of a grid: its runs, then its extensions without training."""
    return [run.name for run in grid.runs] + [extension.name for extension in grid.extensions]


def merged(args):
    """`--key value` pairs with later values replacing earlier ones, in first-seen order."""
    pairs = dict(zip(args[::2], args[1::2]))
    return [item for pair in pairs.items() for item in pair]


def train_arguments(grid, run, out_grid):
    """The train.py arguments of a run whose checkpoints go to out_grid/<run name>/."""
    args = merged(grid.training + run.args) + ["--run_name", run.name, "--out_dir", out_grid]
    if run.init_from:
        args += ["--init_from", runs.checkpoint_path(out_grid, run.init_from)]
    return args


def run_settings(grid, run):
    """(every setting, the settings the grid gives) of a run, as train.py parses them; a
    mistyped grid fails here."""
    args, values, given = settings.parse_args(train_arguments(grid, run, "out"))
    given = {**settings.PRESETS[args.preset], **given}  # a preset's values are given by the grid too
    return values, {k: v for k, v in given.items() if k not in ("run", "out_dir", "init_from")}


def evaluations(grid, run):
    """(entry, extension arguments) of every evaluation of a run: itself, then its extensions."""
    return [(run.name, [])] + [(e.name, e.args) for e in grid.extensions if e.run == run.name]


EVALUATIONS = ("ppl", "passkey", "sotu", "analysis")  # the kinds of evaluation step


def steps(grid, selected):
    """Every step of the selected runs, in the order reproduce.py runs them, as (kind, run, entry,
    extension arguments): kind "train" (entry None), then "ppl" and "passkey" for the run itself
    and for each of its extensions, "sotu" (perplexity on the sotu text) for a main run; when
    every analysed run is selected, "analysis" of them all after the last of them (run: that last
    one, entry: their names)."""
    names = {run.name for run in selected}
    last_analysed = [run.name for run in grid.runs if run.name in grid.analysed][-1:]
    for run in selected:
        yield "train", run, None, []
        for entry, extension_args in evaluations(grid, run):
            for kind in ("ppl", "passkey"):
                yield kind, run, entry, extension_args
        if grid.sotu_args and run.section == "main":
            yield "sotu", run, run.name, []
        if [run.name] == last_analysed and set(grid.analysed) <= names:
            yield "analysis", run, " ".join(grid.analysed), []


def step_title(kind, run, entry):
    """'train rope-s0', 'ppl rope-s0+yarn16': a step's name in the output and in steps.jsonl."""
    return f"{kind} {run.name if kind == 'train' else entry}"


def result_path(results_grid, kind, entry):
    """Where the evaluation `kind` ("ppl", "passkey", "sotu" or "analysis") of an entry is saved."""
    if kind == "analysis":
        return os.path.join(results_grid, "analysis", "analysis.json")
    return os.path.join(results_grid, kind, f"{entry}.json")


def saved_records(path):
    """The list of checkpoint records of an evaluation JSON; [] when it is missing or damaged."""
    try:
        with open(path) as f:
            records = json.load(f)["checkpoints"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return records if isinstance(records, list) and all(isinstance(r, dict) for r in records) else []


def record_is_current(record, values, given):
    """Whether a checkpoint record was made from a checkpoint trained with these settings to the end
    of this schedule (a copy taken midway through a longer schedule is not)."""
    config = record.get("train_config", {})
    return (record.get("step") == values["max_steps"]
            and settings.schedule_steps(config) == settings.schedule_steps(values)
            and all(config.get(key) == value for key, value in given.items() if key not in NOT_COMPARED))


def is_current(path, values, given):
    """Whether the evaluation JSON at path exists and was made from a checkpoint trained with
    these settings to the end (a result of other settings is not this grid's)."""
    records = saved_records(path)
    return bool(records) and all(record_is_current(record, values, given) for record in records)


def analysis_is_current(grid, results_grid):
    """Whether the grid's analysis holds a current record of every analysed run."""
    by_run = {record.get("run"): record for record in saved_records(result_path(results_grid, "analysis", None))}
    return all(run.name in by_run and record_is_current(by_run[run.name], *run_settings(grid, run))
               for run in grid.runs if run.name in grid.analysed)


def step_is_current(grid, kind, run, entry, results_grid):
    """Whether an evaluation step of the grid has its current JSON."""
    if kind == "analysis":
        return analysis_is_current(grid, results_grid)
    return is_current(result_path(results_grid, kind, entry), *run_settings(grid, run))


def pending(grid, run, results_grid, evals=EVALUATIONS):
    """The evaluations of a run (kind, entry, extension arguments) that lack a current JSON,
    the analysis of the analysed runs among them; only the kinds in `evals`."""
    own = [(kind, entry, args) for kind, _, entry, args in steps(grid, [run])
           if kind in evals and kind != "analysis" and not step_is_current(grid, kind, run, entry, results_grid)]
    if "analysis" in evals and run.name in grid.analysed and not analysis_is_current(grid, results_grid):
        own.append(("analysis", " ".join(grid.analysed), []))
    return own


def needs_checkpoint(grid, run, runs, results_grid, evals=EVALUATIONS):
    """Whether a run's checkpoint is still needed: for its own evaluations (of the kinds in
    `evals`), or for a fine-tune among `runs` that starts from it and is needed itself."""
    return bool(pending(grid, run, results_grid, evals)) or any(
        other.init_from == run.name and needs_checkpoint(grid, other, runs, results_grid, evals) for other in runs)
