"""
runs.py: what the scripts share about a run: where its files are, how its checkpoint is loaded
with its tokenizer and validation split, and how it is labelled in figures.

A run folder, out/<run name>/, holds
    ckpt.pt       the checkpoint (checkpoint.py), written atomically
    log.jsonl     one line per logged step: loss, lr, tokens/s; or val_loss
    config.json   every setting of the run
    train.lock    while a train.py writes it

Everything here raises a files.UserError (CheckpointError, data.DataError), which a script's
main (cli.run) turns into one line.
"""

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass

from lib import data
from lib import files
from lib import token_cache
from lib.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from lib.tokenizer import encoding_from_state, tokenizer_state

CKPT_NAME, LOG_NAME, CONFIG_NAME = "ckpt.pt", "log.jsonl", "config.json"


def checkpoint_path(out_dir, name):
    """Where train.py leaves the checkpoint of run `name`."""
    return os.path.join(out_dir, name, CKPT_NAME)


def run_of(path):
    """The run a checkpoint belongs to: the name of its folder, out_dir/<run>/ckpt.pt (train.py
    names a run with settings.run_name)."""
    return os.path.basename(os.path.dirname(os.path.abspath(path)))


@dataclass
class Progress:
    """Where a training process is, for the line that a stop (Ctrl-C, SIGTERM) ends it with."""
    step: int = None   # steps done; None before training began
    saved: int = None  # the step of the run's checkpoint on disk; None while there is none

    def stop_line(self, signal_name):
        """'stopped at step 12 (SIGINT); the checkpoint is at step 10; continue with --resume'."""
        where = "stopped before training began" if self.step is None else f"stopped at step {self.step}"
        if self.saved is None:
            return f"{where} ({signal_name}); no checkpoint was written, so the run starts over when run again"
        return f"{where} ({signal_name}); the checkpoint is at step {self.saved}; continue with --resume"


def file_identity(path):
    """(inode, modification time, size) of a file, None if there is none: a file replaced or
    rewritten since (write_atomically makes a new inode) has another identity."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def check_unchanged(ckpt_path, seen):
    """Under the run's lock: the checkpoint is as it was when the run looked at it (file_identity
    `seen`), so that a run finished or saved by another process meanwhile is neither overwritten by
    a new run nor continued from an older state. Raises UserError."""
    now = file_identity(ckpt_path)
    if now == seen:
        return
    if seen is None:
        raise files.UserError(f"{ckpt_path} exists: another process wrote it while this one started; pass "
                              f"--resume to continue it, or --run_name to start another run")
    raise files.UserError(f"{ckpt_path} was rewritten by another process while this one started: run the command again")


def clock(seconds):
    """Seconds as h:mm:ss."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# -----------------------------------------------------------------------------
# a run's data


def prepare(settings, log=print):
    """The run's tokenized data, from the cache in data_dir (built on first use)."""
    return token_cache.prepare_data(settings["dataset"], settings["tokenizer"], settings["vocab_size"], settings["data_dir"],
                             log=log, hf_tokens=settings.get("hf_tokens") or 0)


def validation_tokens(state, data_dir):
    """The validation split the checkpoint was trained beside, tokenized by its own tokenizer;
    raises data.DataError if it is not there."""
    settings, meta = state.get("train_config") or {}, state.get("data") or {}
    try:
        prepared = prepare({**settings, "data_dir": data_dir}, log=lambda line: print(line, file=sys.stderr))
    except KeyError:
        raise data.DataError("the checkpoint does not record its dataset") from None
    if prepared.meta["hash"] != meta.get("hash"):
        raise data.DataError(f"the token cache in {data_dir} for {settings['dataset']} (hash "
                             f"{prepared.meta['hash'][:12]}) differs from the one the checkpoint was trained on "
                             f"(hash {str(meta.get('hash'))[:12]}): the text changed")
    return prepared.val


def describe_data(meta):
    """A token cache in a few words: its source, size and hash."""
    if not meta.get("hash"):
        return "data it does not record"
    size = meta["train_chars"] + meta["val_chars"]
    return f"{meta['source']} ({size:,} characters, hash {meta['hash'][:12]})"


def describe_tokenizer(state):
    """A tokenizer state (tokenizer.tokenizer_state) in a few words: its name, size and merges' hash."""
    if not isinstance(state, dict) or "ranks" not in state:
        return "none recorded"
    size = len(state["ranks"].splitlines()) + len(state.get("special_tokens", {}))
    merges = hashlib.sha256(state["ranks"].encode()).hexdigest()[:12]
    return f"{state.get('name')} ({size} tokens, merges hash {merges})"


def check_same_data(what, state, prepared, advice):
    """Raise data.DataError for a checkpoint trained on other data or with another tokenizer than
    `prepared`: its token ids would mean other text. The data's hash and the tokenizer are
    compared, not paths or names, so a copied or moved run folder still resumes."""
    saved = state.get("data") or {}
    if saved.get("hash") != prepared.meta["hash"]:
        raise data.DataError(f"{what} was trained on {describe_data(saved)}, but these settings prepare "
                             f"{describe_data(prepared.meta)}; {advice}")
    tokenizer = tokenizer_state(prepared.enc)
    if state.get("tokenizer") != tokenizer:
        raise data.DataError(f"{what} was trained with tokenizer {describe_tokenizer(state.get('tokenizer'))}, "
                             f"but these settings prepare {describe_tokenizer(tokenizer)}; {advice}")


# -----------------------------------------------------------------------------
# loading a checkpoint


def load_model(path, device, **overrides):
    """(state, model) of a checkpoint, the model in eval mode with `overrides` of its config
    (context extension); raises CheckpointError naming the path."""
    state = load_checkpoint(path)
    try:
        return state, model_from_checkpoint(state, device, **overrides)
    except (CheckpointError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_tokenizer(path, state, model):
    """The tokenizer a checkpoint carries (tokenizer.tokenizer_state), so that any text can be
    tokenized as the run's own data was; raises CheckpointError naming the path for a missing or
    damaged one, or one with more tokens than the model embeds."""
    if "tokenizer" not in state:
        raise CheckpointError(f"checkpoint {path} carries no tokenizer")
    try:
        enc = encoding_from_state(state["tokenizer"])
    except (KeyError, TypeError, ValueError) as error:  # a damaged tokenizer
        raise CheckpointError(f"checkpoint {path} is corrupt: {type(error).__name__}: {error}") from None
    if enc.n_vocab > model.config.vocab_size:
        raise CheckpointError(
            f"checkpoint {path}: tokenizer has {enc.n_vocab} tokens but the model only {model.config.vocab_size}"
        )
    return enc


def load_validation(path, state, data_dir):
    """validation_tokens(), its errors naming the checkpoint."""
    try:
        return validation_tokens(state, data_dir)
    except data.DataError as e:
        raise data.DataError(f"{path}: {e}") from None


def checkpoint_to_resume(path):
    """The checkpoint of the run to continue, with everything that resuming needs."""
    if not os.path.exists(path):
        raise CheckpointError(f"cannot resume: {path} does not exist; start the run without --resume")
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume: {e}") from None
    missing = [key for key in ("train_config", "optimizer", "rng", "tokenizer", "data", "trained") if not state.get(key)]
    if missing:
        raise CheckpointError(f"cannot resume: {path} has no {', '.join(missing)} (checkpoint.py lists what train.py "
                              f"writes); it can be evaluated but not continued")
    trained, val_loss = state["trained"], state.get("val_loss")
    if not (isinstance(trained, dict) and is_number(trained.get("seconds"))
            and isinstance(trained.get("machines"), list)):
        raise CheckpointError(f"cannot resume: {path} is damaged: its trained is {str(trained)[:60]!r}, not the time "
                              f"and machines of its training")
    if not is_number(val_loss):
        raise CheckpointError(f"cannot resume: {path} is damaged: its val_loss is {str(val_loss)[:60]!r}, not a number")
    return state


def is_number(value):
    """Whether a value is a finite int or float (a bool is not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def training_time(path):
    """{"seconds", "machines"}: what a run's checkpoint records it cost (checkpoint.py, "trained");
    raises CheckpointError for a checkpoint that does not record it."""
    state = load_checkpoint(path)
    if not isinstance(state.get("trained"), dict):
        raise CheckpointError(f"{path} does not record its training time (checkpoint.py lists what train.py writes)")
    return state["trained"]


def truncate_log(path, step):
    """On resume, drop log lines written after the checkpoint's step: they will be redone. So
    is a last line without its newline, cut short by a crash or a full disk (always after the
    checkpoint: a checkpoint is written after the lines of its step). A log with nothing to drop
    is left as it is."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:  # a power loss can leave any bytes at the end
        lines = f.readlines()
    whole = lines[:-1] if lines and not lines[-1].endswith("\n") else lines
    kept = []
    for number, line in enumerate(whole, 1):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{path} line {number} is not a log record: repair or delete that line, "
                                  f"then resume again") from None
    if kept != lines:
        files.write_atomically(path, "".join(kept).encode())


# -----------------------------------------------------------------------------
# how a run is labelled in figures


def curve_label(config):
    """'fope', or 'rope+yarn16' for a checkpoint evaluated with context extension."""
    scaling = config["rope_scaling"]
    return config["pe"] if scaling == "none" else f"{config['pe']}+{scaling}{config['rope_scale']:g}"


def label_runs(results):
    """Label curves by pe (and extension), e.g. 'rope+yarn16', adding the run (the record's "run")
    where two labels coincide."""
    labels = [curve_label(r["model_config"]) for r in results]
    return [label if labels.count(label) == 1 else f"{label} ({r['run']})" for label, r in zip(labels, results)]
