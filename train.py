"""
train.py: train one model and leave a checkpoint that the evaluation scripts can measure.

    python train.py --pe fope                       # the default CPU model on Shakespeare
    python train.py --pe rope --seed 1              # another run, in its own folder
    python train.py --pe fope --resume              # continue out/<run>/ after a stop
    python train.py --preset retrieval --pe fope    # as the default grid trains it (byte level, passkey mix)
    python train.py --preset gpu60m --pe fope       # the paper's 60M shape, for one GPU
    torchrun --standalone --nproc_per_node=8 train.py --preset gpu60m   # the same on 8 GPUs

Every GPTConfig field and every training setting is a --flag, listed with its default and
meaning at the top of settings.py (python train.py --help prints the same). The run folder
out/<run-name>/ holds ckpt.pt (written atomically), log.jsonl and config.json; its name
follows from the settings that differ from the defaults. Every setting is checked before
anything is read or written, and one process at a time writes a run folder (its train.lock).

Under torchrun, N processes train one model with DistributedDataParallel (NCCL on GPUs,
gloo on CPUs): each computes its share of the same global batch of --batch_size sequences,
rank 0 writes the checkpoints and the log, and a run resumes on any number of processes.
"""

import contextlib
import dataclasses
import inspect
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lib import cli
from lib import data
from lib import hardware
from lib import memory
from lib import passkey
from lib import runs
from lib import settings as run_settings
from lib.checkpoint import CheckpointError, load_checkpoint, run_lock, save_checkpoint
from lib.files import UserError, error_line, write_atomically
from fope_gpt import GPT, GPTConfig
from lib.tokenizer import tokenizer_state


# -----------------------------------------------------------------------------
# data


class Batches:
    """Random windows of train_len + 1 tokens from the training split, a fraction of them
    replaced by passkey sequences. Its random state is saved in checkpoints, so a resumed
    run sees the batches an uninterrupted run would have seen."""

    def __init__(self, tokens, settings, enc, eot):
        self.tokens, self.enc, self.eot = tokens, enc, eot
        self.batch_size, self.seq_len = settings["batch_size"], settings["train_len"]
        self.passkey_frac, self.passkey_loss = settings["passkey_frac"], settings["passkey_loss"]
        self.rng = np.random.default_rng(settings["seed"])
        self.passkey_rng = np.random.default_rng(settings["passkey_seed"])
        if len(tokens) <= self.seq_len + 1:
            raise data.DataError(f"the training split has {len(tokens)} tokens, fewer than train_len + 1 = {self.seq_len + 1}")

    def next(self):
        x = np.empty((self.batch_size, self.seq_len), dtype=np.int64)
        y = np.empty_like(x)
        for row in range(self.batch_size):
            if self.passkey_frac > 0 and self.passkey_rng.random() < self.passkey_frac:
                x[row], y[row] = passkey.training_sequence(self.enc, self.passkey_rng, self.seq_len, self.eot,
                                                           self.passkey_loss)
            else:
                start = self.rng.integers(0, len(self.tokens) - self.seq_len - 1)
                window = self.tokens[start:start + self.seq_len + 1].astype(np.int64)
                x[row], y[row] = window[:-1], window[1:]
        return torch.from_numpy(x), torch.from_numpy(y)

    def state(self):
        return {"rng": self.rng.bit_generator.state, "passkey_rng": self.passkey_rng.bit_generator.state}

    def load_state(self, state):
        self.rng.bit_generator.state = state["rng"]
        self.passkey_rng.bit_generator.state = state["passkey_rng"]


def validation_batches(tokens, seq_len, batch_size, num_batches):
    """A fixed set of evenly spaced validation windows: the same every evaluation and every run."""
    count = min(batch_size * num_batches, (len(tokens) - 1) // seq_len)
    if count == 0:
        raise data.DataError(f"the validation split has {len(tokens)} tokens, fewer than train_len + 1 = {seq_len + 1}")
    starts = np.linspace(0, len(tokens) - seq_len - 1, count).astype(np.int64)
    windows = np.stack([tokens[s:s + seq_len + 1].astype(np.int64) for s in starts])
    return [(torch.from_numpy(w[:, :-1]), torch.from_numpy(w[:, 1:])) for w in np.array_split(windows, num_batches) if len(w)]


# -----------------------------------------------------------------------------
# optimisation


def learning_rate(step, settings):
    """Linear warm-up, then cosine decay over decay_steps to min_lr_ratio x the peak (as in the authors' OLMo configs),
    which holds for any steps past decay_steps."""
    peak, warmup, total = settings["lr"], settings["warmup_steps"], settings["decay_steps"]
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (settings["min_lr_ratio"] + (1 - settings["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, settings):
    # As in the authors' OLMo configs, weight decay applies to every trained parameter
    # (norms and embeddings too). FoPE's frozen coefficients are not trained at all.
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=settings["lr"], betas=(settings["beta1"], settings["beta2"]),
                             weight_decay=settings["weight_decay"], fused=True)


@torch.no_grad()
def evaluate(model, batches, settings, device):
    model.eval()
    losses = []
    for x, y in batches:
        with hardware.autocast(settings["dtype"], device):
            losses.append(model(x.to(device), y.to(device))[1].item())
    model.train()
    return float(np.mean(losses))


# -----------------------------------------------------------------------------
# the run


def main(argv=None):
    """Train one run. The errors a user can fix, and a stop (Ctrl-C, SIGTERM: where the run stopped),
    end in one line on stderr and a non-zero exit (cli.run); the run folder's lock is released
    however the run ends (after a kill -9, the next run finds it stale)."""
    progress = runs.Progress()
    with contextlib.ExitStack() as held:
        cli.run("train.py", lambda: train(argv, held, progress), stopped=progress.stop_line)


def train(argv, held, progress):
    """The run itself; `held` keeps the run folder's lock until main() ends, `progress` where it is."""
    settings, run_dir, ckpt_path, resumed, seen = settings_of_run(argv)
    rank, world, device = start_processes(settings["device"])
    asked = settings["dtype"]
    settings["dtype"] = hardware.resolve_dtype(asked, device)  # the run keeps what "auto" chose
    if settings["batch_size"] % world:
        raise UserError(f"--batch_size {settings['batch_size']} must be divisible by the {world} processes")
    memory.check_training(settings, world, device)  # before anything is allocated, read or written
    rows = slice(rank * settings["batch_size"] // world, (rank + 1) * settings["batch_size"] // world)
    leader = rank == 0  # the one process that prints, logs and writes checkpoints
    if leader:
        held.enter_context(run_lock(run_dir))  # before anything is written: data cache or run folder
        runs.check_unchanged(ckpt_path, seen)  # another process may have finished or saved the run meanwhile
        why = ("native bf16 here" if settings["dtype"] == "bf16" else "no native bf16 here") if asked == "auto" else "as asked"
        print(f"run {run_dir}: {settings['pe']} on {device}" + (f" x {world} processes" if world > 1 else "")
              + f", precision {settings['dtype']} ({why})", flush=True)

    prepared = prepare_data(settings, leader, world)
    if resumed is not None:
        runs.check_same_data(f"cannot resume: {ckpt_path}", resumed, prepared,
                             "restore the text it was trained on, or train a new run (--run_name)")

    torch.manual_seed(settings["seed"])
    try:  # the tokenizer decides the vocabulary (a tiny corpus may give fewer tokens than asked)
        config = GPTConfig(**{**{k: settings[k] for k in run_settings.MODEL_FIELDS}, "vocab_size": prepared.vocab_size})
    except ValueError as e:
        raise UserError(str(e)) from None
    model = GPT(config).to(device)
    optimizer = make_optimizer(model, settings)
    batches = Batches(prepared.train, settings, prepared.enc, prepared.eot)
    val_batches = validation_batches(prepared.val, settings["train_len"], settings["batch_size"], settings["eval_batches"])
    step, val_loss = 0, None
    earlier = {"seconds": 0.0, "machines": []}  # what processes before this one spent training the run, and where
    if resumed is not None:
        step, val_loss = restore(resumed, model, optimizer, batches, ckpt_path)
        earlier, progress.saved = resumed["trained"], step
    elif settings["init_from"]:
        start_from_checkpoint(model, settings["init_from"], settings["fope_grow"], prepared)
    first_step = progress.step = step
    if step >= settings["max_steps"]:
        if leader:
            print(f"{run_dir}: already finished ({step} steps, val loss {val_loss:.4f})")
        return stop_processes(world)

    log_path = os.path.join(run_dir, runs.LOG_NAME)
    if leader:
        os.makedirs(run_dir, exist_ok=True)
        runs.truncate_log(log_path, step)
        print(f"model: {model.num_params() / 1e6:.2f}M parameters, {len(prepared.train) / 1e6:.2f}M training tokens"
              + (f", resuming at step {step}" if step else ""), flush=True)

    this_machine = f"{hardware.machine_name(device)} ({os.cpu_count()} cores)" + (f" x {world} processes" if world > 1 else "")

    def trained():
        """The run's training time up to now, over every process that trained it, and the machines
        they ran on: what the run cost, resumed or not (a grid's report sums it)."""
        return {"seconds": round(earlier["seconds"] + time.time() - t_start, 3),
                "machines": list(dict.fromkeys([*earlier["machines"], this_machine]))}

    def checkpoint():
        """config.json and the checkpoint (a stop waits for both): a run refused earlier changes neither."""
        with cli.uninterrupted():
            write_atomically(os.path.join(run_dir, runs.CONFIG_NAME), json.dumps(settings, indent=2).encode())
            save_checkpoint(ckpt_path, {
                "model_config": dataclasses.asdict(config), "train_config": settings,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "rng": {"torch": torch.get_rng_state(), "batches": batches.state()},
                "tokenizer": tokenizer_state(prepared.enc), "data": prepared.meta, "val_loss": val_loss,
                "trained": trained(),
            })
            progress.saved = step

    train_step = torch.compile(model) if settings["compile"] else model
    if world > 1:
        # The rotary tables are buffers that every process builds alike: nothing to sync per step
        # (the switch is forward_sync_buffers from torch 2.13 on, broadcast_buffers below it).
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
            else "broadcast_buffers"
        train_step = DistributedDataParallel(train_step, device_ids=[device] if device.startswith("cuda") else None,
                                             **{no_sync: False})
    tokens_per_step = settings["batch_size"] * settings["train_len"]
    t_start = t_last = time.time()
    steps_timed = 0
    with open(log_path, "a") if leader else contextlib.nullcontext() as log:
        while step < settings["max_steps"]:
            lr = learning_rate(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Every process draws the whole global batch (the same random state everywhere, so a
            # run resumes on any number of processes) and trains on its own rows of it.
            x, y = batches.next()  # (batch_size, train_len) each
            share = int((y[rows] >= 0).sum()) / int((y >= 0).sum())  # its part of the batch's loss targets
            if device.startswith("cuda"):  # page-locked, so the copy need not wait for the GPU
                x, y = x.pin_memory(), y.pin_memory()
            with hardware.autocast(settings["dtype"], device):
                _, loss = train_step(x[rows].to(device, non_blocking=True), y[rows].to(device, non_blocking=True))
            # DDP averages gradients over processes; weighting each process's mean loss by its
            # share of the targets makes that average the gradient of the whole batch's mean loss,
            # even when passkey rows (loss on few tokens) fall unevenly. One process: share = 1.
            loss = loss * share
            (loss * world).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_timed += 1
            progress.step = step

            if step % settings["log_interval"] == 0 or step == settings["max_steps"]:
                if world > 1:
                    loss = loss.detach().clone()
                    dist.all_reduce(loss)  # the shares add up to the whole batch's mean loss
                loss_value = loss.item()  # the only host sync of a step, once per log interval
                if not math.isfinite(loss_value):
                    raise UserError(f"loss became {loss_value} at step {step}; {what_is_kept(ckpt_path)}")
                now = time.time()
                tok_s = steps_timed * tokens_per_step / (now - t_last)
                eta = (settings["max_steps"] - step) * tokens_per_step / tok_s
                if leader:
                    print(f"step {step}/{settings['max_steps']} | loss {loss_value:.4f} | lr {lr:.2e} | "
                          f"{tok_s / 1e3:.1f}k tok/s | {runs.clock(now - t_start)} elapsed | ETA {runs.clock(eta)}", flush=True)
                    log.write(json.dumps({"step": step, "loss": loss_value, "lr": lr, "tok_per_s": round(tok_s)}) + "\n")
                    log.flush()
                t_last, steps_timed = now, 0

            if step % settings["eval_interval"] == 0 or step == settings["max_steps"]:
                # every process measures the same fixed windows, so no process waits for another's number
                val_loss = evaluate(model, val_batches, settings, device)
                if not math.isfinite(val_loss):
                    raise UserError(f"validation loss became {val_loss} at step {step}; {what_is_kept(ckpt_path)}")
                if leader:
                    print(f"step {step}: val loss {val_loss:.4f} (ppl {math.exp(val_loss):.2f})", flush=True)
                    log.write(json.dumps({"step": step, "val_loss": val_loss}) + "\n")
                    log.flush()
                    checkpoint()
                t_last, steps_timed = time.time(), 0  # evaluation time is not training time
    if leader:
        resumed_at = f" (from step {first_step}, {runs.clock(trained()['seconds'])} since step 0)" if first_step else ""
        print(f"done: {step} steps in {runs.clock(time.time() - t_start)}{resumed_at}, val loss {val_loss:.4f}; "
              f"checkpoint {ckpt_path}")
    stop_processes(world)


# -----------------------------------------------------------------------------
# what the run starts from: its settings, its processes and data, a checkpoint to resume or to
# begin from


def settings_of_run(argv):
    """The run's settings, its folder and checkpoint path, and the checkpoint to resume (None
    for a new run); every setting checked before anything is read or written."""
    args, settings, given = run_settings.parse_args(argv, description=__doc__)
    run_settings.validate_settings(settings)
    name = run_settings.run_name(settings, args.preset)
    run_dir = os.path.join(settings["out_dir"], name)
    ckpt_path = runs.checkpoint_path(settings["out_dir"], name)

    resumed, seen = None, runs.file_identity(ckpt_path)  # checked again under the run's lock
    if args.resume:
        resumed = runs.checkpoint_to_resume(ckpt_path)
        settings = run_settings.resumed_settings(resumed["train_config"], given, ckpt_path)
    elif seen is not None:
        raise UserError(f"{ckpt_path} exists: pass --resume to continue it, or --run_name to start another run")
    # config.json and the checkpoint record the run's name, and the schedule's length, as resolved
    settings = {**settings, "run": name, "decay_steps": run_settings.schedule_steps(settings)}
    return settings, run_dir, ckpt_path, resumed, seen



def start_processes(device_setting):
    """(rank, world size, device) of this process. Under torchrun (which sets RANK, LOCAL_RANK
    and WORLD_SIZE) join the process group: process i takes GPU i of its node, or the CPU."""
    device = hardware.resolve_device(device_setting)
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def prepare_data(settings, leader, world):
    """The run's tokenized data: rank 0 tokenizes and caches it, the others then read its cache."""
    if settings["dataset"].startswith("hf:") and not settings["hf_tokens"]:
        # stream what one pass over the run's training tokens needs, and a tenth more for validation
        settings["hf_tokens"] = math.ceil(1.1 * settings["max_steps"] * settings["batch_size"] * settings["train_len"])
    if leader:
        prepared = runs.prepare(settings)
    if world > 1:
        dist.barrier()
    if not leader:
        prepared = runs.prepare(settings, log=lambda message: None)
    return prepared


def stop_processes(world):
    if world > 1:
        dist.destroy_process_group()


def what_is_kept(ckpt_path):
    """The end of a stopped run's last line: whether an earlier checkpoint is there to go back to."""
    if os.path.exists(ckpt_path):
        return f"the last good checkpoint {ckpt_path} is kept"
    return "no checkpoint was written yet, so there is nothing to resume"


def weights_mismatch(own, saved):
    """How a state dict differs from the model's own, in a few words; None if it fits."""
    if not isinstance(saved, dict):
        return "its weights are not a state dict"
    problems = [f"{name} has shape {tuple(getattr(saved[name], 'shape', ()))}, the model needs {tuple(tensor.shape)}"
                for name, tensor in own.items()
                if name in saved and tuple(getattr(saved[name], "shape", ())) != tuple(tensor.shape)][:1]
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing:
        problems.append(f"it lacks {', '.join(missing[:3])}")
    if extra:
        problems.append(f"it has unexpected {', '.join(extra[:3])}")
    return "; ".join(problems) or None


def restore(resumed, model, optimizer, batches, ckpt_path):
    """Load a checkpoint's weights, optimizer, sampler and random states into the run; returns
    (step, val_loss)."""
    mismatch = weights_mismatch(model.state_dict(), resumed["model"])
    if mismatch:
        raise CheckpointError(f"cannot resume: {ckpt_path} does not fit the model its train_config describes: {mismatch}")
    try:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        batches.load_state(resumed["rng"]["batches"])
        torch.set_rng_state(resumed["rng"]["torch"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"cannot resume: the saved state in {ckpt_path} is damaged: {error_line(e)}") from None
    return resumed["step"], resumed["val_loss"]


def start_from_checkpoint(model, path, grow, prepared):
    """Begin from another run's weights, e.g. at a longer train_len (the paper's extension
    experiment). FoPE's coefficient tensors grow with K and M (as in the authors' olmo/checkpoint.py): the old block is
    pasted into the top-left of a fresh initialisation ("fresh", the authors' x+fope configs)
    or of zeros ("zeros", their yarn_after configs). From RoPE, FoPE keeps its fresh init.
    Deviation: the optimizer starts afresh; the authors resume its state and the LR schedule."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"--init_from: {e}") from None
    runs.check_same_data(f"--init_from {path}", state, prepared,
                    "a run starts from a checkpoint of the same data and tokenizer")
    own = model.state_dict()
    with torch.no_grad():
        for name, old in state["model"].items():
            if name not in own:
                continue  # FoPE's coefficients when starting a RoPE model from FoPE
            new = own[name]
            if name.endswith(("sin_coef", "cos_coef")):
                if grow == "zeros":
                    new.zero_()
                k, m = min(old.shape[1], new.shape[1]), min(old.shape[2], new.shape[2])
                new[:, :k, :m] = old[:, :k, :m]
            elif new.shape != old.shape:
                raise CheckpointError(f"--init_from {path}: {name} has shape {tuple(old.shape)}, "
                                      f"this model needs {tuple(new.shape)}")
            else:
                new.copy_(old)
    model.load_state_dict(own)  # also rebuilds FoPE's tables from the grown coefficients


if __name__ == "__main__":
    main()
