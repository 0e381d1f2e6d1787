"""
train.py: train one model and leave a checkpoint that the evaluation scripts can measure.

    python train.py --pe fope                       # the default CPU model on Shakespeare
    python train.py --pe rope --seed 1              # another run, in its own folder
    python train.py --pe fope --resume              # continue out/<run>/ after a stop
    python train.py --preset gpu60m --pe fope       # the paper's 60M shape, for one GPU
    torchrun --standalone --nproc_per_node=8 train.py --preset gpu60m   # the same on 8 GPUs

Every GPTConfig field and every training setting below is a --flag. The run folder
out/<run-name>/ holds ckpt.pt (written atomically), log.jsonl and config.json; its name
follows from the settings that differ from the defaults.

Under torchrun, N processes train one model with DistributedDataParallel (NCCL on GPUs,
gloo on CPUs): each computes its share of the same global batch of --batch_size sequences,
rank 0 writes the checkpoints and the log, and a run resumes on any number of processes.
"""

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
import hardware
import passkey
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fope_gpt import GPT, GPTConfig

# -----------------------------------------------------------------------------
# settings

MODEL_FIELDS = [f.name for f in dataclasses.fields(GPTConfig)]
# Defaults: the CPU model (4 layers x 256 wide, head_dim 64 so that FoPE keeps K = 13 of 32
# pairs at train_len 256) for about 10 minutes on 2 cores.
DEFAULTS = dict(
    **{f.name: f.default for f in dataclasses.fields(GPTConfig)},
    dataset="shakespeare", tokenizer="bpe", data_dir="data", hf_tokens=0,
    batch_size=16, max_steps=800, lr=2e-3, warmup_steps=40, min_lr_ratio=0.1,
    weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
    passkey_frac=0.0, passkey_loss="answer+repeat", passkey_seed=1000, seed=1337, init_from="", fope_grow="fresh",
    eval_interval=100, eval_batches=20, log_interval=25,
    dtype="auto", compile=False, device="auto", out_dir="out", run_name="",
)
PRESETS = {
    "cpu": {},
    # The paper's 60M model (notes §5) at L = 512; for one GPU (untested on a GPU here).
    "gpu60m": dict(n_layer=8, n_head=8, n_embd=512, train_len=512, batch_size=64,
                   max_steps=20000, lr=6e-4, warmup_steps=1000, eval_interval=1000),
}
# Settings that may change when a run is resumed: where and how fast it runs, not what it
# learns (a run keeps the precision it started with unless --dtype is given again).
RESUMABLE = {"max_steps", "eval_interval", "log_interval", "compile", "device", "dtype", "resume", "out_dir", "preset"}
# Settings that do not name a run.
UNNAMED = RESUMABLE | {"run_name", "data_dir", "eval_batches"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--resume", action="store_true", help="continue out/<run-name>/ckpt.pt")
    for key, default in DEFAULTS.items():
        if isinstance(default, bool):
            parser.add_argument(f"--{key}", type=parse_bool, metavar="true|false")
        else:
            parser.add_argument(f"--{key}", type=type(default), metavar=type(default).__name__.upper())
    parser.set_defaults(**{k: None for k in DEFAULTS})
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    settings = {**DEFAULTS, **PRESETS[args.preset], **given}
    if settings["pe"] not in ("rope", "fope", "alibi", "nope"):
        parser.error(f"--pe must be one of rope, fope, alibi, nope (got {settings['pe']!r})")
    return args, settings, given


def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def run_name(settings, preset):
    """pe plus every naming setting that differs from the defaults, e.g. 'fope-seed1'."""
    baseline = {**DEFAULTS, **PRESETS[preset]}
    parts = [settings["pe"]] + ([preset] if preset != "cpu" else [])
    for key in sorted(k for k in DEFAULTS if k not in UNNAMED and k != "pe"):
        if settings[key] != baseline[key]:
            value = settings[key]
            if key == "dataset":  # a path names the run by its file or folder name
                value = os.path.splitext(os.path.basename(value.rstrip("/")))[0].replace(":", "_")
            if key == "init_from":  # a checkpoint names the run by its run folder
                value = os.path.basename(os.path.dirname(os.path.abspath(value)))
            parts.append(f"{key}{value}")
    return "-".join(parts)


def fail(message):
    sys.exit(f"train.py: error: {message}")


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
            fail(f"the training split has {len(tokens)} tokens, fewer than train_len + 1 = {self.seq_len + 1}")

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
        fail(f"the validation split has {len(tokens)} tokens, fewer than train_len + 1 = {seq_len + 1}")
    starts = np.linspace(0, len(tokens) - seq_len - 1, count).astype(np.int64)
    windows = np.stack([tokens[s:s + seq_len + 1].astype(np.int64) for s in starts])
    return [(torch.from_numpy(w[:, :-1]), torch.from_numpy(w[:, 1:])) for w in np.array_split(windows, num_batches) if len(w)]


# -----------------------------------------------------------------------------
# optimisation


def learning_rate(step, settings):
    """Linear warm-up, then cosine decay to min_lr_ratio x the peak (notes §5)."""
    peak, warmup, total = settings["lr"], settings["warmup_steps"], settings["max_steps"]
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
    args, settings, given = parse_args(argv)
    if settings["fope_grow"] not in ("fresh", "zeros"):
        fail(f"--fope_grow must be fresh or zeros (got {settings['fope_grow']!r})")
    if settings["passkey_loss"] not in passkey.PASSKEY_LOSSES:
        fail(f"--passkey_loss must be one of {', '.join(passkey.PASSKEY_LOSSES)} (got {settings['passkey_loss']!r})")
    if not 0.0 <= settings["passkey_frac"] <= 1.0:
        fail(f"--passkey_frac must be between 0 and 1 (got {settings['passkey_frac']})")
    name = settings["run_name"] or run_name(settings, args.preset)
    run_dir = os.path.join(settings["out_dir"], name)
    ckpt_path = os.path.join(run_dir, "ckpt.pt")

    resumed = None
    if args.resume:
        try:
            resumed = load_checkpoint(ckpt_path)
        except CheckpointError as e:
            fail(f"cannot resume: {e}")
        saved = resumed["train_config"]
        for key, value in given.items():
            if key not in RESUMABLE and key in saved and saved[key] != value:
                fail(f"{ckpt_path} was trained with {key}={saved[key]!r} but --{key} {value!r} was given")
        settings = {**saved, **{k: v for k, v in given.items() if k in RESUMABLE}}
    elif os.path.exists(ckpt_path):
        fail(f"{ckpt_path} exists: pass --resume to continue it, or --run_name to start another run")

    try:
        rank, world, device = start_processes(settings["device"])
        asked = settings["dtype"]
        settings["dtype"] = hardware.resolve_dtype(asked, device)  # the run keeps what "auto" chose
    except hardware.HardwareError as e:
        fail(str(e))
    if settings["batch_size"] % world:
        fail(f"--batch_size {settings['batch_size']} must be divisible by the {world} processes")
    rows = slice(rank * settings["batch_size"] // world, (rank + 1) * settings["batch_size"] // world)
    leader = rank == 0  # the one process that prints, logs and writes checkpoints
    if leader:
        why = ("native bf16 here" if settings["dtype"] == "bf16" else "no native bf16 here") if asked == "auto" else "as asked"
        print(f"run {run_dir}: {settings['pe']} on {device}" + (f" x {world} processes" if world > 1 else "")
              + f", precision {settings['dtype']} ({why})", flush=True)

    if settings["dataset"].startswith("hf:") and not settings["hf_tokens"]:
        # stream what one pass over the run's training tokens needs, and a tenth more for validation
        settings["hf_tokens"] = math.ceil(1.1 * settings["max_steps"] * settings["batch_size"] * settings["train_len"])
    try:  # rank 0 tokenizes and caches the data; the others then read its cache
        if leader:
            prepared = prepare(settings)
        if world > 1:
            dist.barrier()
        if not leader:
            prepared = prepare(settings, log=lambda message: None)
    except data.DataError as e:
        fail(str(e))

    torch.manual_seed(settings["seed"])
    try:  # the tokenizer decides the vocabulary (a tiny corpus may give fewer tokens than asked)
        config = GPTConfig(**{**{k: settings[k] for k in MODEL_FIELDS}, "vocab_size": prepared.vocab_size})
    except ValueError as e:
        fail(str(e))
    model = GPT(config).to(device)
    optimizer = make_optimizer(model, settings)
    batches = Batches(prepared.train, settings, prepared.enc, prepared.eot)
    val_batches = validation_batches(prepared.val, settings["train_len"], settings["batch_size"], settings["eval_batches"])
    step, val_loss = 0, None
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        batches.load_state(resumed["rng"]["batches"])
        torch.set_rng_state(resumed["rng"]["torch"])
        step, val_loss = resumed["step"], resumed.get("val_loss")
    elif settings["init_from"]:
        start_from_checkpoint(model, settings["init_from"], settings["fope_grow"], prepared.meta)
    if step >= settings["max_steps"]:
        if leader:
            print(f"{run_dir}: already finished ({step} steps, val loss {val_loss:.4f})")
        return stop_processes(world)

    log_path = os.path.join(run_dir, "log.jsonl")
    if leader:
        os.makedirs(run_dir, exist_ok=True)
        truncate_log(log_path, step)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(settings, f, indent=2)
        print(f"model: {model.num_params() / 1e6:.2f}M parameters, {len(prepared.train) / 1e6:.2f}M training tokens"
              + (f", resuming at step {step}" if step else ""), flush=True)

    def checkpoint():
        save_checkpoint(ckpt_path, {
            "model_config": dataclasses.asdict(config), "train_config": settings,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "rng": {"torch": torch.get_rng_state(), "batches": batches.state()},
            "tokenizer": data.tokenizer_state(prepared), "data": prepared.meta, "val_loss": val_loss,
        })

    train_step = torch.compile(model) if settings["compile"] else model
    if world > 1:
        # The rotary tables are buffers that every process builds alike: nothing to sync per step
        # (torch 2.13 renamed the switch; older versions know only the first name).
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
            with hardware.autocast(settings["dtype"], device):
                _, loss = train_step(x[rows].to(device), y[rows].to(device))
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

            if step % settings["log_interval"] == 0 or step == settings["max_steps"]:
                if world > 1:
                    loss = loss.detach().clone()
                    dist.all_reduce(loss)  # the shares add up to the whole batch's mean loss
                loss_value = loss.item()  # the only host sync of a step, once per log interval
                if not math.isfinite(loss_value):
                    fail(f"loss became {loss_value} at step {step}; the last good checkpoint {ckpt_path} is kept")
                now = time.time()
                tok_s = steps_timed * tokens_per_step / (now - t_last)
                eta = (settings["max_steps"] - step) * tokens_per_step / tok_s
                if leader:
                    print(f"step {step}/{settings['max_steps']} | loss {loss_value:.4f} | lr {lr:.2e} | "
                          f"{tok_s / 1e3:.1f}k tok/s | {clock(now - t_start)} elapsed | ETA {clock(eta)}", flush=True)
                    log.write(json.dumps({"step": step, "loss": loss_value, "lr": lr, "tok_per_s": round(tok_s)}) + "\n")
                    log.flush()
                t_last, steps_timed = now, 0

            if step % settings["eval_interval"] == 0 or step == settings["max_steps"]:
                # every process measures the same fixed windows, so no process waits for another's number
                val_loss = evaluate(model, val_batches, settings, device)
                if not math.isfinite(val_loss):
                    fail(f"validation loss became {val_loss} at step {step}; the last good checkpoint {ckpt_path} is kept")
                if leader:
                    print(f"step {step}: val loss {val_loss:.4f} (ppl {math.exp(val_loss):.2f})", flush=True)
                    log.write(json.dumps({"step": step, "val_loss": val_loss}) + "\n")
                    log.flush()
                    checkpoint()
                t_last, steps_timed = time.time(), 0  # evaluation time is not training time
    if leader:
        print(f"done: {step} steps in {clock(time.time() - t_start)}, val loss {val_loss:.4f}; checkpoint {ckpt_path}")
    stop_processes(world)


def prepare(settings, log=print):
    """The run's tokenized data, from the cache in data_dir (built on first use)."""
    return data.prepare_data(settings["dataset"], settings["tokenizer"], settings["vocab_size"], settings["data_dir"],
                             log=log, hf_tokens=settings.get("hf_tokens") or 0)


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


def stop_processes(world):
    if world > 1:
        dist.destroy_process_group()


def start_from_checkpoint(model, path, grow, data_meta):
    """Begin from another run's weights, e.g. at a longer train_len (the paper's extension
    experiment). FoPE's coefficient tensors grow with K and M (notes §4.4): the old block is
    pasted into the top-left of a fresh initialisation ("fresh", the authors' x+fope configs)
    or of zeros ("zeros", their yarn_after configs). From RoPE, FoPE keeps its fresh init.
    Deviation: the optimizer starts afresh; the authors resume its state and the LR schedule."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        fail(f"--init_from: {e}")
    if state.get("data", {}).get("hash") != data_meta["hash"]:
        fail(f"--init_from {path} was trained on other data or another tokenizer")
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
                fail(f"--init_from {path}: {name} has shape {tuple(old.shape)}, this model needs {tuple(new.shape)}")
            else:
                new.copy_(old)
    model.load_state_dict(own)  # also rebuilds FoPE's tables from the grown coefficients


def truncate_log(path, step):
    """On resume, drop log lines written after the checkpoint's step: they will be redone."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if json.loads(line)["step"] <= step]
    with open(f"{path}.tmp", "w") as f:
        f.writelines(lines)
    os.replace(f"{path}.tmp", path)


def clock(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


if __name__ == "__main__":
    main()
