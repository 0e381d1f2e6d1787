"""
reproduce.py: the experiment end to end. Train every run of a grid, measure perplexity and
passkey accuracy as the context grows past the training length, and write the report.

    python reproduce.py                         # the default grid: about 6 hours on 2 CPU cores
    python reproduce.py --quick                 # tiny models, about a minute: checks the pipeline
    python reproduce.py --only rope-s0 fope-s0  # some runs only
    python reproduce.py --dry_run               # list the steps and which are done
    python reproduce.py --report                # figures, tables and the README block from saved JSON

Every step runs one of the project's scripts (train.py, eval_ppl.py, eval_passkey.py) as a
subprocess. A step whose output exists is skipped: a checkpoint with the run's step count, an
evaluation JSON newer than its checkpoint. An interrupted training run continues with --resume,
so after a stop the same command carries on where it was.

    out/<grid>/<run>/ckpt.pt            checkpoints (git-ignored)
    results/<grid>/ppl/<entry>.json     one evaluation per file (with eval_ppl.py's own figure)
    results/<grid>/passkey/<entry>.json   (with eval_passkey.py's figures)
    results/<grid>/*.png, results.md    the report; the default and passkey grids' also go into README.md
    results/<grid>/steps.jsonl          every finished step: name, command, seconds, date
    results/<grid>/environment.json     versions, CPU and command lines of the last invocation
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import matplotlib
import numpy
import torch

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

import data
import runs
import settings as run_settings
from checkpoint import CheckpointError, load_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")
README_BLOCKS = {"default": "results", "passkey": "passkey-results"}  # grid -> its block in README.md

# -----------------------------------------------------------------------------
# the grids: what is trained and how it is evaluated


# Settings a saved run may differ in and still be this grid's: those train.py lets a resumed run
# change, except the precision, which a grid pins so that its runs compute the same thing.
NOT_COMPARED = run_settings.RESUMABLE - {"dtype"}


@dataclass
class Run:
    """One training run: a name and its train.py arguments (on top of the grid's shared ones)."""
    name: str
    section: str         # where the report shows it: "main", "ablation" or "finetune"
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
    lengths: list        # evaluation lengths in tokens, for perplexity and passkey alike
    ppl_args: list       # further eval_ppl.py arguments
    passkey_args: list   # further eval_passkey.py arguments
    threads: int = 0     # torch threads per step (OMP_NUM_THREADS); 0: torch's default, every core


# Seed i of a method: model init and text batches (--seed), and the passkey mix (--passkey_seed).
# Seed 0 is train.py's default; runs without seed arguments (ablations, fine-tunes) use it too.
SEEDS = [["--seed", "1337", "--passkey_seed", "1000"],
         ["--seed", "1338", "--passkey_seed", "1001"],
         ["--seed", "1339", "--passkey_seed", "1002"]]

# Shared by every run of the default grid: train.py's default CPU model (4 layers, 256 wide,
# head_dim 64, train_len 256, 16 x 256 = 4096 tokens per step, Shakespeare with a BPE-4096
# tokenizer), half the sequences from the passkey task (loss on the answer only, notes §9).
# The CPU grids pin float32 (train.py's "auto" would pick bf16 on CPUs that have it) so that runs
# made on different CPUs compute the same thing.
CPU_PRECISION = ["--dtype", "fp32"]
GRID_TRAINING = ["--passkey_frac", "0.5", "--max_steps", "1200", *CPU_PRECISION]

# The fine-tunes of the extension experiment double train_len and halve batch_size, so a step
# keeps its 4096 tokens; 150 steps are an eighth of pre-training's tokens, the passkey mix stays
# on. train.py starts the optimizer afresh (the authors resume theirs, notes §4.4): 10 warm-up
# steps rebuild Adam's moments, and a peak lr of a quarter of pre-training's 2e-3 adapts the
# model to the longer length without undoing pre-training.
FINETUNE = ["--train_len", "512", "--batch_size", "8", "--max_steps", "150", "--warmup_steps", "10", "--lr", "5e-4"]
# YaRN as the authors fine-tune with it: s = 16 around the original length (their yarn_after configs).
YARN_AFTER = ["--rope_scaling", "yarn", "--rope_scale", "16", "--rope_original_len", "256"]

DEFAULT = Grid(
    about="The CPU model of train.py on Shakespeare, trained at 256 tokens and evaluated to 16x. "
          "Estimated time on 2 CPU cores at about 5k tokens/s: 13 runs x 16 min of training, 4 fine-tunes "
          "x 2-3 min, 26 evaluations x (1-2 min perplexity + 3 min passkey); about 6 hours in all.",
    training=GRID_TRAINING,
    # Ordered so that a partly finished grid is already informative, and so that the fine-tunes
    # follow the runs they start from (checkpoints are not committed, so a later session would
    # have to train those again): RoPE and FoPE at seed 0, the extension experiment, ALiBi and
    # NoPE, then more seeds and the ablations.
    runs=[
        Run("rope-s0", "main", ["--pe", "rope", *SEEDS[0]]),
        Run("fope-s0", "main", ["--pe", "fope", *SEEDS[0]]),
        # the paper's extension experiment: continue at 2x train_len with YaRN or with FoPE
        Run("ext-rope-yarn", "finetune", ["--pe", "rope", *FINETUNE, *YARN_AFTER], init_from="rope-s0"),
        Run("ext-rope-fope", "finetune", ["--pe", "fope", "--fope_grow", "fresh", *FINETUNE], init_from="rope-s0"),
        Run("ext-fope-yarn", "finetune", ["--pe", "fope", "--fope_grow", "zeros", *FINETUNE, *YARN_AFTER],
            init_from="fope-s0"),
        Run("ext-fope-fope", "finetune", ["--pe", "fope", "--fope_grow", "fresh", *FINETUNE], init_from="fope-s0"),
        Run("alibi-s0", "main", ["--pe", "alibi", *SEEDS[0]]),
        Run("nope-s0", "main", ["--pe", "nope", *SEEDS[0]]),
        Run("rope-s1", "main", ["--pe", "rope", *SEEDS[1]]),
        Run("fope-s1", "main", ["--pe", "fope", *SEEDS[1]]),
        # FoPE ablations at seed 0 (notes §9); fope-s0 is the reference with sigma 0.3.
        Run("fope-nocf", "ablation", ["--pe", "fope", "--fope_cf", "false"]),      # Fourier series, no clip
        Run("fope-nofs", "ablation", ["--pe", "fope", "--fope_fs", "false"]),      # clip only: clipped RoPE
        Run("rope-s2", "main", ["--pe", "rope", *SEEDS[2]]),
        Run("fope-s2", "main", ["--pe", "fope", *SEEDS[2]]),
        Run("fope-sinpad0", "ablation", ["--pe", "fope", "--fope_sin_pad", "0"]),  # padded pairs: exact identity
        # sigma 0 is not run: with FS on it equals fope-nofs here, since K = 13 <= head_dim/4 = 16
        Run("fope-sigma1", "ablation", ["--pe", "fope", "--fope_sigma", "1"]),
        Run("fope-sigma3", "ablation", ["--pe", "fope", "--fope_sigma", "3"]),
    ],
    # RoPE extended without training; s = 16 covers the 16x range (the authors' YaRN also uses 16)
    extensions=[Extension(f"rope-s{seed}+{method}16", f"rope-s{seed}", ["--rope_scaling", method, "--rope_scale", "16"])
                for seed in range(3) for method in ("pi", "ntk", "yarn")],
    lengths=[128, 256, 512, 1024, 2048, 4096],
    # the authors' chunked protocol on the first 65 536 validation tokens (16 chunks at 4096):
    # half the evaluation time of all 142k tokens
    ppl_args=["--max_tokens", "65536", *CPU_PRECISION],
    passkey_args=["--trials", "100"],
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
        Run("rope-s0", "main", ["--pe", "rope", *SEEDS[0]]),
        Run("rope-s1", "main", ["--pe", "rope", *SEEDS[1]]),
        Run("fope-s0", "main", ["--pe", "fope", *SEEDS[0]]),
        Run("fope-s1", "main", ["--pe", "fope", *SEEDS[1]]),
        Run("fope-nofs", "ablation", ["--pe", "fope", "--fope_fs", "false"]),
        Run("ext-rope-fope", "finetune", ["--pe", "fope", "--fope_grow", "fresh", "--train_len", "256",
                                          "--batch_size", "2", "--max_steps", "10", "--warmup_steps", "2",
                                          "--lr", "5e-4"], init_from="rope-s0"),
    ],
    extensions=[Extension("rope-s0+yarn4", "rope-s0", ["--rope_scaling", "yarn", "--rope_scale", "4"])],
    lengths=[128, 256, 512],
    ppl_args=["--max_tokens", "4096", *CPU_PRECISION],
    passkey_args=["--trials", "4"],
    # Matrices this small gain nothing from a second thread, and on a machine whose cores are busy
    # two threads wait for each other: one thread trains several times faster there.
    threads=1,
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
        Run("rope-s0", "main", ["--pe", "rope", *SEEDS[0]]),
        Run("fope-s0", "main", ["--pe", "fope", *SEEDS[0]]),
        Run("alibi-s0", "main", ["--pe", "alibi", *SEEDS[0]]),
    ],
    extensions=[],
    lengths=[128, 256, 512, 1024, 2048, 4096, 8192],
    ppl_args=["--dtype", "bf16"],
    passkey_args=["--trials", "100"],
)

# The default grid's 1200 steps teach ALiBi retrieval but not RoPE or FoPE (README, "Passkey
# retrieval"); a FoPE run continued to 6000 steps was still climbing. This grid trains the four
# main methods alike for 8000 steps, one cosine schedule, so that the passkey curves past
# train_len rest on models that retrieve within it. --compile: about 1.25x faster on the CPU
# (bench.py), and it does not change what is computed, so it does not name the runs.
PASSKEY = Grid(
    about="The default grid's model and passkey mix trained for 8000 steps instead of 1200, one run per "
          "method at seed 0, for the passkey curves. Estimated time on 2 CPU cores: 4 runs x about "
          "100 min of training, 4 evaluations x (1-2 min perplexity + 3 min passkey); about 7 hours in all.",
    training=["--passkey_frac", "0.5", "--max_steps", "8000", "--eval_interval", "400", "--compile", "true",
              *CPU_PRECISION],
    runs=[
        Run("fope-s0", "main", ["--pe", "fope", *SEEDS[0]]),
        Run("rope-s0", "main", ["--pe", "rope", *SEEDS[0]]),
        Run("alibi-s0", "main", ["--pe", "alibi", *SEEDS[0]]),
        Run("nope-s0", "main", ["--pe", "nope", *SEEDS[0]]),
    ],
    extensions=[],
    lengths=DEFAULT.lengths,
    ppl_args=DEFAULT.ppl_args,
    passkey_args=DEFAULT.passkey_args,
)

GRIDS = {"default": DEFAULT, "quick": QUICK, "gpu60m": GPU60M, "passkey": PASSKEY}


# -----------------------------------------------------------------------------
# steps: one subprocess each, skipped when its output exists


def fail(message):
    """Stop with one line on stderr and exit status 1."""
    sys.exit(f"reproduce.py: error: {message}")


def project_path(path):
    """`path` relative to the project folder, where the scripts run, if it lies inside it."""
    path = os.path.abspath(path)
    return os.path.relpath(path, HERE) if os.path.commonpath([path, HERE]) == HERE else path


def checkpoint_path(out_grid, run_name):
    """Where train.py leaves the run's checkpoint."""
    return os.path.join(out_grid, run_name, "ckpt.pt")


def merged(args):
    """`--key value` pairs with later values replacing earlier ones, in first-seen order."""
    pairs = dict(zip(args[::2], args[1::2]))
    return [item for pair in pairs.items() for item in pair]


class Step:
    """One subprocess in the project folder, run with the grid's thread count."""

    def __init__(self, grid, title, command):
        self.title, self.command = title, command
        self.env = {"OMP_NUM_THREADS": str(grid.threads)} if grid.threads else {}

    def command_now(self):
        """The command to run now."""
        return self.command

    def command_line(self, command):
        """The command as one shell line, its environment variables first."""
        return " ".join([f"{key}={value}" for key, value in self.env.items()] + [shlex.join(command)])

    def run(self, command):
        """Run the command in the project folder; returns its exit status."""
        return subprocess.run(command, cwd=HERE, env={**os.environ, **self.env}).returncode


class TrainStep(Step):
    """Train one run, or continue it with --resume; done when its checkpoint has max_steps steps."""

    def __init__(self, grid, run, out_grid):
        self.run_name = run.name
        self.checkpoint = checkpoint_path(out_grid, run.name)
        args = merged(grid.training + run.args) + ["--run_name", run.name, "--out_dir", project_path(out_grid)]
        if run.init_from:
            args += ["--init_from", project_path(checkpoint_path(out_grid, run.init_from))]
        _, self.settings, self.given = run_settings.parse_args(args)  # a mistyped grid fails here
        self.evaluations, self.dependents = [], []  # filled in by plan()
        super().__init__(grid, f"train {run.name}", [sys.executable, "train.py", *args])

    def evaluated(self):
        """Whether every evaluation of this run (and of its extensions) has its JSON, made from a
        checkpoint trained with this grid's settings and step count."""
        return all(self.evaluated_here(step.output) for step in self.evaluations)

    def evaluated_here(self, path):
        try:
            with open(path) as f:
                records = json.load(f)["checkpoints"]
        except (OSError, ValueError, KeyError):
            return False
        return bool(records) and all(
            record.get("step") == self.settings["max_steps"]
            and all(record.get("train_config", {}).get(key) == value
                    for key, value in self.given.items() if key not in NOT_COMPARED)
            for record in records)

    def skip_reason(self):
        """'done (N steps)' for a finished run, or for one whose checkpoint is gone (a fresh
        clone) but whose evaluations exist and whose fine-tunes are done; None when it has
        steps to train."""
        if not os.path.exists(self.checkpoint):
            if self.evaluated() and all(d.evaluated() for d in self.dependents):
                return "evaluated before (checkpoint not kept)"
            return None
        try:
            state = load_checkpoint(self.checkpoint)
        except CheckpointError as error:
            fail(f"{error}: delete it to train {self.run_name} again")
        saved = state.get("train_config", {})
        for key, value in self.given.items():
            if key not in NOT_COMPARED and key in saved and saved[key] != value:
                fail(f"{self.checkpoint} was trained with {key}={saved[key]!r}, the grid now has {value!r}: "
                     f"delete it to train {self.run_name} again")
        if state["step"] > self.settings["max_steps"]:
            fail(f"{self.checkpoint} has {state['step']} steps, the grid now has {self.settings['max_steps']}: "
                 f"delete it to train {self.run_name} again")
        return f"done ({state['step']} steps)" if state["step"] == self.settings["max_steps"] else None

    def command_now(self):
        """The command to run now: with --resume when a checkpoint exists."""
        return self.command + (["--resume"] if os.path.exists(self.checkpoint) else [])


class EvalStep(Step):
    """Evaluate one checkpoint (perplexity or passkey); done when its JSON is newer than the checkpoint."""

    def __init__(self, grid, kind, entry, checkpoint, results_grid, extension_args):
        script, options = {"ppl": ("eval_ppl.py", grid.ppl_args),
                           "passkey": ("eval_passkey.py", grid.passkey_args)}[kind]
        self.checkpoint = checkpoint
        self.output = os.path.join(results_grid, kind, f"{entry}.json")
        super().__init__(grid, f"{kind} {entry}", [
            sys.executable, script, "--ckpt", project_path(checkpoint), "--lengths", ",".join(map(str, grid.lengths)),
            "--out", project_path(self.output), *options, *extension_args])

    def skip_reason(self):
        """'done' when the JSON is newer than the checkpoint, or when the JSON exists and the
        checkpoint does not (checkpoints are not committed: a fresh clone has only results)."""
        if os.path.exists(self.output) and not os.path.exists(self.checkpoint):
            return "done (checkpoint not kept)"
        current = (os.path.exists(self.output) and os.path.exists(self.checkpoint)
                   and os.path.getmtime(self.output) >= os.path.getmtime(self.checkpoint))
        return "done" if current else None


def select_runs(grid, names):
    """The runs named (all when None) and the runs they start from, in grid order."""
    if names is None:
        return grid.runs
    known = [run.name for run in grid.runs]
    unknown = [name for name in names if name not in known]
    if unknown:
        fail(f"--only: no run {unknown[0]!r} in this grid (its runs: {', '.join(known)})")
    wanted = set(names)
    for run in reversed(grid.runs):  # a run starts from an earlier one, so one backward pass suffices
        if run.name in wanted and run.init_from:
            wanted.add(run.init_from)
    return [run for run in grid.runs if run.name in wanted]


def plan(grid, runs, out_grid, results_grid):
    """Every step for these runs: train a run, evaluate it, then evaluate its extensions."""
    steps = []
    for run in runs:
        checkpoint = checkpoint_path(out_grid, run.name)
        training = TrainStep(grid, run, out_grid)
        steps.append(training)
        evaluations = [(run.name, [])] + [(e.name, e.args) for e in grid.extensions if e.run == run.name]
        for entry, extension_args in evaluations:
            for kind in ("ppl", "passkey"):
                training.evaluations.append(EvalStep(grid, kind, entry, checkpoint, results_grid, extension_args))
        steps += training.evaluations
    trainings = {step.run_name: step for step in steps if isinstance(step, TrainStep)}
    for run in runs:
        if run.init_from:
            trainings[run.init_from].dependents.append(trainings[run.name])
    return steps


def run_steps(steps, results_grid, dry_run, argv, grid_steps):
    """Run the steps in order, printing progress; log each finished one to steps.jsonl. Before
    the first step that runs, environment.json records this invocation and every step of the
    grid (`grid_steps`, not only those selected now, so that --only does not lose the record)."""
    start, ran = time.time(), 0
    for number, step in enumerate(steps, 1):
        prefix = f"[{number}/{len(steps)}] {step.title}"
        reason = step.skip_reason()
        if reason:
            print(f"{prefix}: {reason}, skipped", flush=True)
            continue
        command = step.command_now()
        print(f"{prefix}\n    {step.command_line(command)}", flush=True)
        if dry_run:
            continue
        if not ran:
            os.makedirs(results_grid, exist_ok=True)
            write_environment(os.path.join(results_grid, "environment.json"), argv, grid_steps)
        ran += 1
        step_start = time.time()
        if step.run(command) != 0:
            fail(f"{step.title} failed (its output is above); run the same command again to carry on from there")
        seconds = time.time() - step_start
        print(f"{prefix}: finished in {runs.clock(seconds)}", flush=True)
        with open(os.path.join(results_grid, "steps.jsonl"), "a") as log:
            log.write(json.dumps({"step": step.title, "command": step.command_line(command),
                                  "seconds": round(seconds, 1),
                                  "date": datetime.datetime.now().isoformat(timespec="seconds")}) + "\n")
    if not dry_run:
        print(f"all {len(steps)} steps done ({ran} run now) in {runs.clock(time.time() - start)}")


def cpu_model():
    """The CPU's model name, as Linux reports it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def write_environment(path, argv, steps):
    """Versions, hardware, this invocation, and the exact command lines of `steps`."""
    environment = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
        "tiktoken": importlib.metadata.version("tiktoken"), "matplotlib": importlib.metadata.version("matplotlib"),
        "platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(),
        "command": shlex.join([sys.executable, "reproduce.py", *argv]),
        "steps": [step.command_line(step.command) for step in steps],
    }
    with open(path, "w") as f:
        json.dump(environment, f, indent=2)


# -----------------------------------------------------------------------------
# the report: figures and tables from the saved JSON only

# metric -> (evaluation, key in its JSON record, axis label)
METRICS = {
    "ppl": ("ppl", "ppl", "perplexity"),
    "ppl_ratio": ("ppl", "ppl_ratio", "perplexity / perplexity at train_len"),
    "accuracy": ("passkey", "accuracy", "passkey accuracy"),
}
TABLE_TITLES = {"ppl": "Perplexity", "ppl_ratio": "Perplexity ratio to train_len", "accuracy": "Passkey accuracy"}


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
    sections = [Section(
        "Main comparison",
        "Trained at train_len (dashed line) and evaluated far beyond it. Lines: mean over seeds; "
        "bands and brackets: the lowest and highest seed.",
        group_by_method(main),
        [("ppl.png", ["ppl"]), ("ppl_ratio.png", ["ppl_ratio"]), ("passkey.png", ["accuracy"])])]
    if ablations:
        sections.append(Section(
            "FoPE ablations",
            "FoPE variants at seed 0 next to fope's seeds: `nocf` without the clip floor, `nofs` without the "
            "Fourier series (clipped RoPE), `sinpad0` with padded pairs an exact identity, `sigmaX` with "
            "coefficient gain X instead of 0.3.",
            group_by_method([name for name in main if method_of(name) == "fope"] + ablations),
            [("ablations.png", ["ppl_ratio", "accuracy"])]))
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


def load_results(grid, results_grid):
    """{entry: {"ppl": record or None, "passkey": record or None}} from the evaluation JSON files."""
    entries = [run.name for run in grid.runs] + [extension.name for extension in grid.extensions]
    results = {}
    for entry in entries:
        results[entry] = {}
        for kind in ("ppl", "passkey"):
            path = os.path.join(results_grid, kind, f"{entry}.json")
            try:
                with open(path) as f:
                    results[entry][kind] = json.load(f)["checkpoints"][0]
            except FileNotFoundError:
                results[entry][kind] = None
            except (ValueError, KeyError, IndexError):
                fail(f"{path} is not an evaluation result of eval_{kind}.py: delete it to evaluate again")
    return results


def values_at(results, entries, metric, length):
    """The metric at one length, one value for each entry that has it."""
    kind, key, _ = METRICS[metric]
    records = [results[entry][kind] for entry in entries if results[entry][kind]]
    return [record[key][str(length)] for record in records if str(length) in record[key]]


def train_lens(results, entries):
    """The training lengths of the entries with results (the dashed lines of a figure)."""
    return sorted({record["train_len"] for entry in entries for record in results[entry].values() if record})


def plot_figure(path, section, metrics, results, lengths):
    """One panel per metric: mean over each group's entries, the min-max band where there are several."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.3), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, entries in section.groups.items():
            points = [(n, values_at(results, entries, metric, n)) for n in lengths]
            points = [(n, values) for n, values in points if values]
            if not points:
                continue
            xs = [n for n, _ in points]
            count = max(len(values) for _, values in points)
            line, = ax.plot(xs, [statistics.mean(v) for _, v in points], marker="o",
                            label=f"{label} ({count} seeds)" if count > 1 else label)
            if count > 1:
                ax.fill_between(xs, [min(v) for _, v in points], [max(v) for _, v in points],
                                color=line.get_color(), alpha=0.2)
        for train_len in train_lens(results, section_entries(section)):
            ax.axvline(train_len, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        if metric == "accuracy":
            ax.set_ylim(-0.03, 1.03)
        else:
            ax.set_yscale("log")
            for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))  # 200, not 2x10^2
        ax.set_xlabel("evaluation length (tokens); dashed: train_len")
        ax.set_ylabel(METRICS[metric][2])
        ax.grid(True, which="both", alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle(section.title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_value(metric, value):
    """Accuracy in percent, ratios with two decimals, perplexity with one."""
    return f"{value:.0%}" if metric == "accuracy" else f"{value:.2f}" if metric == "ppl_ratio" else f"{value:.1f}"


def table(section, metric, results, lengths):
    """Markdown rows = groups, columns = lengths; 'mean (min–max)' over a group's entries."""
    lines = [f"| {TABLE_TITLES[metric]} | " + " | ".join(map(str, lengths)) + " |",
             "|---" * (len(lengths) + 1) + "|"]
    for label, entries in section.groups.items():
        cells = []
        for length in lengths:
            values = values_at(results, entries, metric, length)
            cell = format_value(metric, statistics.mean(values)) if values else "–"
            if len(values) > 1:
                cell += f" ({format_value(metric, min(values))}–{format_value(metric, max(values))})"
            cells.append(cell)
        done = sum(1 for entry in entries if results[entry][METRICS[metric][0]])
        if done:
            lines.append(f"| {row_label(label, done, len(entries))} | " + " | ".join(cells) + " |")
    return lines


def row_label(label, done, total):
    """'rope (3 seeds)', 'rope (2 of 3 seeds)', or the label alone for a single run."""
    if total == 1:
        return label
    return f"{label} ({done} seeds)" if done == total else f"{label} ({done} of {total} seeds)"


def section_entries(section):
    """Every entry of a section, group by group."""
    return [entry for group in section.groups.values() for entry in group]


def has_results(section, results):
    """Whether any entry of the section has been evaluated."""
    return any(record for entry in section_entries(section) for record in results[entry].values())


def section_markdown(section, results, lengths, figure_dir):
    """Title, text, figure links and the three tables, then the runs behind rows and those missing."""
    missing = [entry for entry in section_entries(section) if not all(results[entry].values())]
    lines = [f"#### {section.title}", "", section.text, ""]  # under the README's "### Results"
    if has_results(section, results):
        lines += [f"![{section.title}: {', '.join(METRICS[m][2] for m in metrics)}]({figure_dir}{name})"
                  for name, metrics in section.figures] + [""]
        for metric in METRICS:
            lines += table(section, metric, results, lengths) + [""]
    rows = "; ".join(f"{label} = {', '.join(group)}" for label, group in section.groups.items() if group != [label])
    if rows:
        lines += [f"Runs behind each row: {rows}.", ""]
    if missing:
        lines += [f"Not yet run: {', '.join(missing)}.", ""]
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


def measured_markdown(steps, results_grid):
    """What the grid's finished steps (plan()'s) cost and where they ran, from steps.jsonl and
    environment.json (empty when either is missing). A step finished twice counts its last run."""
    try:
        with open(os.path.join(results_grid, "steps.jsonl")) as f:
            seconds = {record["step"]: record["seconds"] for record in map(json.loads, f)}
        with open(os.path.join(results_grid, "environment.json")) as f:
            environment = json.load(f)
    except FileNotFoundError:
        return []
    titles = [step.title for step in steps]
    timed = [title for title in titles if title in seconds]
    by_kind = {}
    for title in timed:
        kind = title.split()[0]
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds[title]
    kinds = ", ".join(f"{kind} {runs.clock(total)}" for kind, total in by_kind.items())
    # a step that is done but has no time (it ran before steps.jsonl existed); steps still to run are not counted
    untimed = [step.title for step in steps if step.title not in seconds and step.skip_reason()]
    return [f"Measured: {len(timed)} of the grid's {len(titles)} steps took "
            f"{runs.clock(sum(by_kind.values()))} of wall time ({kinds})"
            + (f"; not timed: {', '.join(untimed)}" if untimed else "")
            + f". On {environment['cpu']} ({environment['cores']} cores) with Python {environment['python']} "
            f"and torch {environment['torch']}; every step's command line and time are in `steps.jsonl` "
            f"and `environment.json` beside the results.", ""]


def saved_precision(results):
    """What the saved results were computed in, from their own records (a grid's pinned precision
    may be newer than its results)."""
    def used(kind, read):
        return "/".join(sorted({read(kinds[kind]) for kinds in results.values() if kinds.get(kind)}))
    trained = used("ppl", lambda record: record.get("train_config", {}).get("dtype", "?"))
    evaluated = used("ppl", lambda record: record.get("eval_dtype", "fp32"))  # eval_ppl.py's only default before "auto"
    return f"The saved runs were trained in {trained} and their perplexity computed in {evaluated}; passkey in fp32."


def report_markdown(grid_name, grid, sections, results, figure_dir, measured):
    """The report's Markdown; figure links start with figure_dir; `measured` from measured_markdown."""
    lines = [f"Grid `{grid_name}` of `reproduce.py`. {grid.about}", "",
             f"Training: train.py's defaults with `{shlex.join(grid.training)}` "
             f"(per run: see `{grid_name}` in reproduce.py). Perplexity: eval_ppl.py "
             f"{shlex.join(grid.ppl_args) or '(every validation token)'}; passkey: eval_passkey.py "
             f"{shlex.join(grid.passkey_args)}. {saved_precision(results)} Generated by `python reproduce.py "
             f"--grid {grid_name} --report` from the evaluation JSON.", "", *measured]
    for section in sections:
        lines += section_markdown(section, results, grid.lengths, figure_dir)
    return "\n".join(lines + diagnostics_markdown(results))


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
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)
    return f"updated the {name} block of {path}"


def write_report(grid_name, grid, out_grid, results_grid):
    """Every figure, results.md and (for a grid the README shows) its README block, from saved JSON."""
    results = load_results(grid, results_grid)
    if not any(record for kinds in results.values() for record in kinds.values()):
        fail(f"no evaluation results in {results_grid}: run the grid first")
    sections = report_sections(grid)
    for section in sections:
        if has_results(section, results):
            for name, metrics in section.figures:
                plot_figure(os.path.join(results_grid, name), section, metrics, results, grid.lengths)
    measured = measured_markdown(plan(grid, grid.runs, out_grid, results_grid), results_grid)
    markdown_path = os.path.join(results_grid, "results.md")
    with open(markdown_path, "w") as f:
        f.write(f"### Results of the {grid_name} grid\n\n"
                + report_markdown(grid_name, grid, sections, results, "", measured) + "\n")
    print(f"wrote {markdown_path} and its figures")
    if grid_name in README_BLOCKS:
        figure_dir = os.path.relpath(results_grid, os.path.dirname(README)) + "/"
        block = report_markdown(grid_name, grid, sections, results, figure_dir, measured)
        print(update_readme(README, block, README_BLOCKS[grid_name]))


# -----------------------------------------------------------------------------
# the command line


def parse_args(argv):
    """The command line; argparse reports unknown options, fail() conflicting ones."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), help="which grid (default: default)")
    parser.add_argument("--quick", action="store_true", help="the same as --grid quick")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="these runs only, with the runs they start from and their extensions")
    parser.add_argument("--report", action="store_true", help="only build the report, from the saved JSON")
    parser.add_argument("--dry_run", action="store_true", help="print the steps without running them")
    parser.add_argument("--out_dir", default="out", help="checkpoints go to OUT_DIR/<grid>/ (default out)")
    parser.add_argument("--results_dir", default="results", help="results go to RESULTS_DIR/<grid>/ (default results)")
    args = parser.parse_args(argv)
    if args.quick and args.grid not in (None, "quick"):
        fail(f"--quick is --grid quick, but --grid {args.grid} was given")
    if args.report and (args.only or args.dry_run):
        fail("--report builds the report of the whole grid from saved results; drop --only and --dry_run")
    args.grid = "quick" if args.quick else args.grid or "default"
    return args


def main(argv=None):
    """Plan the grid's steps, run those not done, then write the report (or only one of these).
    I/O errors (a full disk, a folder that cannot be written) end in one line and a non-zero exit."""
    try:
        run_grid(sys.argv[1:] if argv is None else argv)
    except OSError as error:
        fail(data.error_line(error))


def run_grid(argv):
    args = parse_args(argv)
    grid = GRIDS[args.grid]
    out_grid = os.path.abspath(os.path.join(args.out_dir, args.grid))
    results_grid = os.path.abspath(os.path.join(args.results_dir, args.grid))
    if args.report:
        write_report(args.grid, grid, out_grid, results_grid)
        return
    steps = plan(grid, select_runs(grid, args.only), out_grid, results_grid)
    print(f"grid {args.grid}: {grid.about}", flush=True)
    run_steps(steps, results_grid, args.dry_run, argv, plan(grid, grid.runs, out_grid, results_grid))
    if not args.dry_run:
        write_report(args.grid, grid, out_grid, results_grid)


if __name__ == "__main__":
    main()
