"""
checkpoint.py: a run's state on disk, written so that a crash never costs a good checkpoint.

A checkpoint is one torch file holding everything needed to continue a run or to measure it:
    model_config   the GPTConfig fields (train_len included: FoPE's floor depends on it)
    train_config   every training setting of the run
    model          the state dict (FoPE's frozen coefficients included)
    optimizer      AdamW state
    step           optimizer steps done
    rng            torch and data-sampler random states, so a resumed run repeats an uninterrupted one
    tokenizer      the tokenizer itself (see data.tokenizer_state), so evaluation needs no cache
    data           the token cache's metadata (dataset, token counts, source hash)
    val_loss       the last validation loss
"""

import dataclasses
import os

import torch

from fope_gpt import GPT, GPTConfig


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line for the user."""


def save_checkpoint(path, state):
    """Write to a temporary file beside `path`, then rename over it: a partly written file
    never replaces a good one (os.replace is atomic within a file system)."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


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
    return state


def model_from_checkpoint(state, device="cpu", **overrides):
    """Rebuild the GPT of a checkpoint, in eval mode. `overrides` change config fields that
    need no new weights, e.g. rope_scaling for context extension without training."""
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    config = GPTConfig(**{k: v for k, v in {**state["model_config"], **overrides}.items() if k in known})
    model = GPT(config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise CheckpointError("checkpoint weights do not match its own model_config (corrupt checkpoint)") from None
    return model.to(device).eval()
