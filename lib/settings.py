"""
settings.py: every setting of a training run, its default, what it allows, and the name of
the run it makes. train.py reads its command line here, and grids.py its grids' runs.

Every GPTConfig field and every training setting below is a --flag of train.py (flag(): the
setting `run` is --run_name). A run's folder, out_dir/<run>/, is named by --run_name or by the
settings that differ from the defaults.
"""

import argparse
import dataclasses
import math
import os

from lib import cli
from lib import passkey
from lib import runs
from lib.files import UserError
from fope_gpt import COPE_TAPERS, FOPE_DEPLOYED, POSITION_EMBEDDINGS, ROPE_SCALINGS, GPTConfig, kept_frequencies

MODEL_FIELDS = [f.name for f in dataclasses.fields(GPTConfig)]

# -----------------------------------------------------------------------------
# defaults: the CPU model (4 layers x 256 wide, head_dim 64 so that FoPE keeps K = 13 of 32
# pairs at train_len 256) for about 10 minutes on 2 cores. Each setting is a --flag, and
# python train.py --help prints these words beside it.

# the model: GPTConfig's fields, whose defaults are in fope_gpt.py
MODEL = {
    "vocab_size": "tokens in the vocabulary (the BPE is trained to this size; gpt2 has its own 50257)",
    "n_layer": "transformer blocks",
    "n_head": "attention heads per block",
    "n_embd": "width of the residual stream; n_embd / n_head is head_dim",
    "train_len": "L, the training context length; FoPE clips frequencies below 2 pi / L",
    "pe": "position embedding",
    "rope_theta": "RoPE's base: pair j turns at theta^(-2j/head_dim) radians per position",
    "fope_sigma": "Xavier gain of FoPE's coefficient noise (not its std)",
    "fope_fs": "FoPE's Fourier series: each pair mixes all kept frequencies",
    "fope_cf": "FoPE's clip: frequencies below 2 pi / L become zero",
    "fope_sin_pad": "sin value of FoPE's padded pairs: 1 as released, 0 for an exact identity",
    "fope_learnable": "train FoPE's coefficients (the authors freeze them)",
    "fope_cap": "at most head_dim/4 of FoPE's pairs carry position, as released (false: all K kept, as deployed)",
    "fope_shared": "one FoPE coefficient set for every layer, as deployed (false: one per layer, as released)",
    "cope_taper": "CoPE's band (the frequencies FoPE clips): cosine tapers it to zero, step zeroes it (HardClip)",
    "qk_norm": "RMS-normalise each head's q and k (one weight over head_dim) before the position embedding",
    **cli.EXTENSION_OPTIONS,
    "init": "olmo: weights N(0, 0.02) truncated, as the authors; pytorch: PyTorch's defaults",
}
# everything else: name -> (default, what it means)
TRAINING = {
    # the model: a named set of FoPE's switches (FOPE_VARIANTS); flags given override it
    "fope_variant": ("released", "FoPE as the authors released it, or as Intern-S1-Pro deploys it: "
                                 "deployed sets fope_shared, fope_cap, fope_sin_pad, fope_sigma and qk_norm"),
    # data
    "dataset": ("shakespeare", "shakespeare, a text file or folder, or hf:<name> (streamed)"),
    "tokenizer": ("bpe", "bpe: trained on the training split, vocab_size tokens; gpt2: tiktoken's"),
    "data_dir": ("data", "where the token caches are"),
    "hf_tokens": (0, "tokens to stream from hf:<name> (0: what max_steps needs, and a tenth more)"),
    # optimisation: AdamW, linear warm-up then cosine decay to min_lr_ratio x lr
    "batch_size": (16, "sequences of train_len tokens per step (over all processes)"),
    "max_steps": (800, "where the run stops"),
    "decay_steps": (0, "steps of the cosine decay to min_lr_ratio x lr (0: max_steps)"),
    "lr": (2e-3, "peak learning rate"),
    "warmup_steps": (40, "steps of linear warm-up to lr"),
    "min_lr_ratio": (0.1, "the learning rate at the end of the decay, as a fraction of lr"),
    "weight_decay": (0.1, "AdamW's weight decay, on every trained parameter"),
    "beta1": (0.9, "AdamW's beta1"),
    "beta2": (0.95, "AdamW's beta2"),
    "grad_clip": (1.0, "largest gradient norm"),
    # the passkey task mixed into training
    "passkey_frac": (0.0, "fraction of the training sequences that are passkey prompts"),
    "passkey_loss": ("answer+repeat", "where a passkey sequence has loss: the answer, and the key's repeat"),
    "passkey_seed": (1000, "seed of the passkey sequences"),
    "seed": (1337, "seed of the model's initialisation and of the text batches"),
    # starting from another run
    "init_from": ("", "a checkpoint to start from (e.g. at a longer train_len)"),
    "fope_grow": ("fresh", "with init_from: FoPE's new coefficients start fresh or at zero"),
    # evaluation and logging
    "eval_interval": (100, "steps between validation losses, each followed by a checkpoint"),
    "eval_batches": (20, "validation batches per evaluation"),
    "log_interval": (25, "steps between log lines"),
    # hardware and files
    "dtype": ("auto", cli.DTYPE_HELP),
    "compile": (False, "torch.compile the model"),
    "device": ("auto", cli.DEVICE_HELP),
    "out_dir": ("out", "runs go to out_dir/<run name>/"),
    "run": ("", "the run's name, its folder out_dir/<run>/ (empty: named by the settings that differ from the "
                "defaults)"),
}
DEFAULTS = {**{f.name: f.default for f in dataclasses.fields(GPTConfig)},
            **{key: default for key, (default, _) in TRAINING.items()}}
MEANING = {**MODEL, **{key: words for key, (_, words) in TRAINING.items()}}
PRESETS = {
    "cpu": {},
    # The CPU model as the default grid trains it: the settings that teach RoPE, FoPE and ALiBi
    # passkey retrieval (EXPERIMENTS.md; FAITHFULNESS.md). 3200 steps because each seed learns the
    # copy in a burst that starts anywhere from about step 1000 to 1800, and a schedule whose
    # learning rate has decayed by then leaves it half-learned.
    # Byte-level tokens (vocab_size 257: the 256 bytes and end of text), so perplexities are per byte;
    # train_len 384 so that a prompt holds the benchmark's 247 bytes of fixed text and some filler;
    # PyTorch's default initialisation; loss on the answer alone; half the sequences passkey prompts.
    "retrieval": dict(vocab_size=257, train_len=384, init="pytorch", passkey_frac=0.5, passkey_loss="answer",
                      max_steps=3200),
    # The paper's 60M model (the authors' OLMo-60M configs) at L = 512; for one GPU (untested on a GPU here).
    "gpu60m": dict(n_layer=8, n_head=8, n_embd=512, train_len=512, batch_size=64,
                   max_steps=20000, lr=6e-4, warmup_steps=1000, eval_interval=1000),
}
# Settings that may change when a run is resumed: where it stops, how fast it runs, what it
# reports, where its files are; none changes the steps already computed (a run keeps the
# precision it started with unless --dtype is given again). decay_steps re-stretches the
# schedule from the resumed step on, which is why it is only changed when given.
RESUMABLE = {"max_steps", "decay_steps", "eval_interval", "log_interval", "compile", "device", "dtype", "resume",
             "out_dir", "preset", "run", "data_dir"}
# Settings that do not name a run.
UNNAMED = RESUMABLE | {"eval_batches"}
# The allowed values of the training settings (GPTConfig checks its own fields), in words for
# the error and --help. A NaN fails every comparison, so it is refused too.
ALLOWED = {
    "lr": (lambda v: v > 0, "> 0"),
    "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "grad_clip": (lambda v: v > 0, "> 0"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "passkey_frac": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "passkey_loss": (lambda v: v in passkey.PASSKEY_LOSSES, " or ".join(passkey.PASSKEY_LOSSES)),
    "hf_tokens": (lambda v: v >= 0, ">= 0 (0: what max_steps needs)"),
    "max_steps": (lambda v: v >= 1, ">= 1"),
    "decay_steps": (lambda v: v >= 0, ">= 0"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "eval_interval": (lambda v: v >= 1, ">= 1"),
    "eval_batches": (lambda v: v >= 1, ">= 1"),
    "log_interval": (lambda v: v >= 1, ">= 1"),
    "seed": (lambda v: v >= 0, ">= 0"),
    "passkey_seed": (lambda v: v >= 0, ">= 0"),
    "fope_grow": (lambda v: v in ("fresh", "zeros"), "fresh or zeros"),
    "tokenizer": (lambda v: v in ("bpe", "gpt2"), "bpe or gpt2"),
}
FOPE_VARIANTS = {"released": {}, "deployed": FOPE_DEPLOYED}
CHOICES = {"fope_variant": tuple(FOPE_VARIANTS), "pe": POSITION_EMBEDDINGS, "rope_scaling": ROPE_SCALINGS, "init": ("olmo", "pytorch"), "cope_taper": COPE_TAPERS}
# What --help adds to a setting's meaning.
NOTES = {
    "max_steps": "with --resume it may grow or shrink, and the learning-rate schedule keeps its length "
                 "(see --decay_steps)",
    "decay_steps": "fixed when the run starts: a run resumed with a larger --max_steps trains the extra steps "
                   "at the final learning rate. Given with --resume, it re-stretches the schedule from the "
                   "resumed step on",
}


def flag(key):
    """The command-line flag of a setting: --<key>, except for the run's name, --run_name: torchrun
    would read --run as an abbreviation of its own --run-path."""
    return "--run_name" if key == "run" else f"--{key}"


def parse_args(argv=None, description=None):
    """(args, settings, given): the parsed command line, every setting (defaults, then the preset,
    then the flags given) and the settings given as flags."""
    parser = argparse.ArgumentParser(description=description, formatter_class=cli.HelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="; ".join(
        f"{name}: " + (", ".join(f"{k}={v}" for k, v in preset.items()) or "the defaults below")
        for name, preset in PRESETS.items()) + " (flags given override a preset's values; default: cpu)")
    parser.add_argument("--resume", action="store_true",
                        help="continue out/<run-name>/ckpt.pt, on the same data and tokenizer")
    for key, default in DEFAULTS.items():
        if key == "device":  # declared once for every script
            cli.add_device_option(parser)
            continue
        if key == "dtype":
            cli.add_dtype_option(parser)
            continue
        words = "; ".join(part for part in (MEANING[key], NOTES.get(key), key in ALLOWED and
                                            f"allowed: {ALLOWED[key][1]}", f"default: {str(default).lower() if isinstance(default, bool) else repr(default)}") if part)
        words = words.replace("%", "%%")  # argparse formats help with %
        if isinstance(default, bool):
            parser.add_argument(flag(key), dest=key, type=parse_bool, metavar="true|false", help=words)
        elif key in CHOICES:
            parser.add_argument(flag(key), dest=key, choices=CHOICES[key], help=words)
        else:
            parser.add_argument(flag(key), dest=key, type=cli.parse_int if isinstance(default, int) else type(default),
                                metavar=type(default).__name__.upper(), help=words)
    parser.set_defaults(**{k: None for k in DEFAULTS})
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    return args, with_variant({**DEFAULTS, **PRESETS[args.preset]}, given), given


def with_variant(base, given):
    """The settings `base` with FoPE's variant (given, else the base's) and then the flags given."""
    return {**base, **FOPE_VARIANTS[given.get("fope_variant", base["fope_variant"])], **given}


def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def validate_settings(settings):
    """Raise UserError, naming the flag and what it allows, for a setting out of range. The
    range checks are all here, made before anything is read or written."""
    for key, value in settings.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag(key)} must be a finite number, got {value}")
    for key, (allowed, words) in ALLOWED.items():
        if not allowed(settings[key]):
            raise UserError(f"{flag(key)} must be {words}, got {settings[key]!r}")
    if settings["tokenizer"] == "bpe" and settings["vocab_size"] < 257:
        raise UserError(f"--vocab_size must be >= 257 with --tokenizer bpe (256 bytes and end of text), "
                         f"got {settings['vocab_size']}")
    if settings["run"] in (".", "..") or os.path.basename(settings["run"]) != settings["run"]:
        raise UserError(f"--run_name must be a folder name, not a path, got {settings['run']!r}")
    try:
        config = GPTConfig(**{k: settings[k] for k in MODEL_FIELDS})
    except ValueError as e:
        raise UserError(str(e).replace("GPTConfig.", "--")) from None  # each GPTConfig field is a flag
    if config.pe == "fope":
        if not len(kept_frequencies(config.head_dim, config.train_len, config.rope_theta, clip=config.fope_cf)):
            raise UserError(f"--pe fope keeps no frequency at --train_len {config.train_len} (K = 0: even the "
                             f"fastest period, 2 pi, is longer); use --train_len 7 or more")
        if config.fope_fs and config.fope_cf and config.head_dim < 4:
            raise UserError(f"--pe fope mixes frequencies into head_dim / 4 pairs: it needs n_embd / n_head >= 4, "
                             f"got {config.head_dim}")


def run_name(settings, preset):
    """The name of the run these settings train: --run_name if given, else pe plus every naming
    setting that differs from the defaults, e.g. 'fope-seed1'. (runs.run_of reads it back from a
    checkpoint's path.)"""
    if settings["run"]:
        return settings["run"]
    base = {**DEFAULTS, **PRESETS[preset]}
    baseline = {**with_variant(base, {"fope_variant": settings["fope_variant"]}), "fope_variant": base["fope_variant"]}
    parts = [settings["pe"]] + ([preset] if preset != "cpu" else [])
    for key in sorted(k for k in DEFAULTS if k not in UNNAMED and k != "pe"):
        if settings[key] != baseline[key]:
            value = settings[key]
            if key == "dataset":  # a path names the run by its file or folder name
                value = os.path.splitext(os.path.basename(value.rstrip("/")))[0].replace(":", "_")
            if key == "init_from":  # a checkpoint names the run by the run it continues
                value = runs.run_of(value)
            parts.append(f"{key}{value}")
    return "-".join(parts)


def schedule_steps(config):
    """The length of a run's learning-rate schedule: decay_steps, or max_steps where that is 0.
    Raises UserError for settings that are not a run's."""
    try:
        return config["decay_steps"] or config["max_steps"]
    except (KeyError, TypeError):
        raise UserError("these are not the settings of a train.py run: they have no decay_steps and max_steps") from None


def resumed_settings(saved, given, ckpt_path):
    """The checkpoint's settings, with the given ones that may change on resume (RESUMABLE); any
    other given setting must equal the checkpoint's. Raises UserError."""
    if not isinstance(saved, dict) or set(saved) != set(DEFAULTS):
        raise UserError(f"cannot resume: the train_config of {ckpt_path} does not hold this train.py's settings "
                        f"(checkpoint.py lists what train.py writes)")
    for key, value in given.items():
        if key not in RESUMABLE and saved[key] != value:
            raise UserError(f"{ckpt_path} was trained with {key}={saved[key]!r} but {flag(key)} {value!r} was given")
    return {**saved, **{k: v for k, v in given.items() if k in RESUMABLE}}
