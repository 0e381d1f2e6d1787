"""
checkpoint.py: a run's state on disk, written so that a crash never costs a good checkpoint.

A checkpoint is one torch file holding everything needed to continue a run or to measure it:
    model_config   the GPTConfig fields (train_len included: FoPE's floor depends on it)
    train_config   every training setting of the run
    model          the state dict (FoPE's frozen coefficients included)
    optimizer      AdamW state
    step           optimizer steps done
    rng            torch and data-sampler random states, so a resumed run repeats an uninterrupted one
    tokenizer      the tokenizer itself (see tokenizer.tokenizer_state), so evaluation needs no cache
    data           the token cache's metadata (dataset, token counts, source hash)
    val_loss       the last validation loss
    trained        {"seconds": training time up to this checkpoint, summed over every process that
                   trained the run, "machines": where they ran, e.g. ["AMD EPYC (2 cores)"]}

While train.py writes a run folder it holds the folder's lock file (run_lock), so that a second
process never writes the same run.
"""

import contextlib
import dataclasses
import os

import torch

from lib.files import UserError, write_atomically
from fope_gpt import GPT, GPTConfig

LOCK_NAME = "train.lock"


class CheckpointError(UserError):
    """A checkpoint that cannot be used or written."""


class LockError(UserError):
    """A run folder that another process is writing."""


def save_checkpoint(path, state):
    """Write the checkpoint atomically (files.write_atomically): a partly written file never
    replaces a good one. A failed write (a full disk) raises CheckpointError."""
    try:
        write_atomically(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as error:
        if isinstance(error, OSError) and error.strerror:
            reason = error.strerror
        else:
            reason = str(error).strip().splitlines()[-1]
        kept = "the previous checkpoint is kept" if os.path.exists(path) else "there is no earlier checkpoint"
        raise CheckpointError(f"could not write checkpoint {path}: {reason}; {kept}") from None


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated or not a torch file at all
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt): {type(e).__name__}") from None
    missing = [k for k in ("model_config", "model", "step") if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a fope-gpt checkpoint (missing {', '.join(missing)})")
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint {path} is damaged: its step is {str(step)[:40]!r}, not a count of steps")
    return state


def model_from_checkpoint(state, device="cpu", **overrides):
    """Rebuild the GPT of a checkpoint, in eval mode. `overrides` change config fields that
    need no new weights, e.g. rope_scaling for context extension without training; a bad
    override raises ValueError (the user's mistake), a bad checkpoint CheckpointError."""
    saved = state["model_config"]
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    if not isinstance(saved, dict) or set(saved) != fields:
        differ = sorted(fields ^ set(saved)) if isinstance(saved, dict) else ["all"]
        raise CheckpointError(f"checkpoint model_config is invalid: its fields are not GPTConfig's "
                              f"(they differ in {', '.join(differ)})")
    try:
        GPT(GPTConfig(**saved))  # FoPE's coefficient shapes can fail too (train_len too short)
    except (TypeError, ValueError, ZeroDivisionError) as error:
        raise CheckpointError(f"checkpoint model_config is invalid: {error}") from None
    model = GPT(GPTConfig(**{**saved, **overrides}))
    try:
        model.load_state_dict(state["model"])
    except (AttributeError, RuntimeError, TypeError):
        raise CheckpointError("checkpoint weights do not match its own model_config (corrupt checkpoint)") from None
    if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
        raise CheckpointError("checkpoint weights are not finite (NaN or inf): its run diverged")
    return model.to(device).eval()


@contextlib.contextmanager
def run_lock(folder):
    """Hold `folder`/train.lock while the block runs: one writer per run folder.

    The lock file is created atomically (O_CREAT | O_EXCL) and holds the owner's process id.
    A lock whose process is gone (a run killed with kill -9, a power loss) is stale: it is
    replaced. A folder created here and still empty at the end is removed again, so a run
    refused before its first file leaves nothing behind."""
    created = not os.path.isdir(folder)
    path = os.path.join(folder, LOCK_NAME)
    take_lock(folder, path)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        if created:
            with contextlib.suppress(OSError):  # not empty, or already gone
                os.rmdir(folder)


def take_lock(folder, path):
    for _ in range(3):  # a lock released or found stale between two looks: try again
        os.makedirs(folder, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = lock_owner(path)
            if owner == "gone":
                continue
            if owner is None:
                raise LockError(f"{folder} is locked by {path}, which holds no process id: "
                                f"delete it if no train.py is writing this run") from None
            if process_alive(owner):
                raise LockError(f"{folder} is being written by process {owner} (lock {path}): "
                                f"wait for it to end, or give another --run_name") from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return
    raise LockError(f"could not take the lock {path}: other processes keep taking it")


def lock_owner(path):
    """The process id in a lock file; None if it holds none, "gone" if the file is gone."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return "gone"
    return int(text) if text.isdigit() else None


def process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
