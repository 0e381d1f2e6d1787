"""
eval_ppl.py: perplexity of the validation split as the context grows past the training length.

    python eval_ppl.py --ckpt out/fope/ckpt.pt out/rope/ckpt.pt
    python eval_ppl.py --ckpt out/fope/ckpt.pt --lengths 256,1024,4096 --mode sliding

The default protocol is the authors' (notes §6.1): cut the validation token stream into
non-overlapping chunks of exactly T tokens, run each chunk as one forward pass from position 0,
and average the next-token cross-entropy over every target. Every length therefore includes
many early, little-context tokens, and only the positions past train_len are new to the model.
`--mode sliding` instead scores each token once with up to T tokens of context (stride T/2).

Writes a JSON of the numbers and a PNG of perplexity vs length next to it.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import hardware
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint


def fail(message):
    sys.exit(f"eval_ppl.py: error: {message}")


def parse_lengths(text):
    """argparse type: '128,256,512' -> [128, 256, 512] (sorted, without repeats, each >= 2)."""
    try:
        lengths = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        lengths = []
    if not lengths or lengths[0] < 2:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers of at least 2, got {text!r}")
    return lengths


def default_lengths(train_len):
    """128, 256, ... up to 16x the training length, with train_len itself included."""
    lengths, length = {train_len}, 128
    while length <= 16 * train_len:
        lengths.add(length)
        length *= 2
    return sorted(lengths)


def validation_tokens(state, data_dir):
    """The validation split the checkpoint was trained beside, tokenized by its own tokenizer."""
    settings, meta = state.get("train_config") or {}, state.get("data") or {}
    try:
        prepared = data.prepare_data(settings["dataset"], settings["tokenizer"], settings["vocab_size"], data_dir,
                                     log=lambda line: print(line, file=sys.stderr), hf_tokens=settings.get("hf_tokens") or 0)
    except KeyError:
        fail("the checkpoint does not record its dataset")
    except data.DataError as e:
        fail(str(e))
    if prepared.meta["hash"] != meta.get("hash"):
        fail(f"the token cache in {data_dir} for {settings['dataset']} differs from the one the checkpoint was trained on")
    return prepared.val


@torch.no_grad()
def mean_loss(model, windows, score_from, batch_size, device, dtype):
    """Mean next-token loss over windows (N, T); in each window only targets at positions
    >= score_from count. Returns (sum of losses, number of targets)."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = torch.from_numpy(windows[i:i + batch_size].astype(np.int64)).to(device)
        with hardware.autocast(dtype, device):
            logits, _ = model(batch[:, :-1])
        losses = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none")  # (B, T-1)
        total += losses[:, score_from:].double().sum().item()
        count += losses[:, score_from:].numel()
    return total, count


def chunked_ppl(model, tokens, length, batch_size, device, dtype):
    """The authors' protocol: non-overlapping chunks of `length` tokens, each from position 0."""
    n = len(tokens) // length
    chunks = np.asarray(tokens[:n * length]).reshape(n, length)
    total, count = mean_loss(model, chunks, 0, batch_size, device, dtype)
    return total / count, count


def sliding_ppl(model, tokens, length, batch_size, device, dtype):
    """Windows of `length` tokens at stride length/2; after the first window only the second
    half of each is scored, so every token counts once with at least length/2 of context."""
    stride = length // 2
    starts = range(0, len(tokens) - length + 1, stride)
    windows = np.stack([np.asarray(tokens[s:s + length]) for s in starts])
    first_total, first_count = mean_loss(model, windows[:1], 0, 1, device, dtype)
    total, count = mean_loss(model, windows[1:], length - 1 - stride, batch_size, device, dtype)
    return (first_total + total) / (first_count + count), first_count + count


def add_extension_options(parser):
    """Context extension without training, applied to every rope/fope checkpoint given."""
    parser.add_argument("--rope_scaling", choices=("none", "pi", "ntk", "yarn"))
    parser.add_argument("--rope_scale", type=float, help="s, the factor by which the context grows")
    parser.add_argument("--rope_original_len", type=int, help="YaRN's L0 (default: train_len)")


def extension_overrides(args):
    return {k: getattr(args, k) for k in ("rope_scaling", "rope_scale", "rope_original_len") if getattr(args, k) is not None}


def curve_label(config):
    """'fope', or 'rope+yarn16' for a checkpoint evaluated with context extension."""
    scaling = config.get("rope_scaling", "none")
    return config["pe"] if scaling == "none" else f"{config['pe']}+{scaling}{config['rope_scale']:g}"


def label_runs(results, name_key="run"):
    """Label curves by pe (and extension), e.g. 'rope+yarn16', adding the run name (the record's
    `name_key` field) where two labels coincide."""
    labels = [curve_label(r["model_config"]) for r in results]
    return [label if labels.count(label) == 1 else f"{label} ({r[name_key]})" for label, r in zip(labels, results)]


def plot(results, path, ylabel, key, log_y=True):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for result, label in zip(results, label_runs(results)):
        lengths = [int(k) for k in result[key]]
        ax.plot(lengths, list(result[key].values()), marker="o", label=label)
    for train_len in sorted({r["train_len"] for r in results}):
        ax.axvline(train_len, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens); dashed: train_len")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", nargs="+", required=True, help="one or more checkpoints")
    parser.add_argument("--lengths", type=parse_lengths,
                        help="comma-separated lengths (default: 128 doubling to 16x train_len)")
    parser.add_argument("--mode", choices=("chunks", "sliding"), default="chunks")
    parser.add_argument("--max_tokens", type=int, default=0, help="evaluate only the first N validation tokens (0: all)")
    parser.add_argument("--batch_tokens", type=int, default=16384, help="tokens per forward pass")
    parser.add_argument("--dtype", choices=hardware.DTYPES, default="auto",
                        help="bf16 autocast or float32; auto: bf16 where the hardware has it natively")
    parser.add_argument("--device", default="auto", help="auto: cuda if PyTorch sees a GPU, else cpu")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--out", default="results/ppl.json", help="JSON path; the PNG goes beside it")
    add_extension_options(parser)
    args = parser.parse_args(argv)
    if not args.out.endswith(".json"):
        fail(f"--out must end in .json, got {args.out!r}")
    try:
        args.device = hardware.resolve_device(args.device)
        args.dtype = hardware.resolve_dtype(args.dtype, args.device)  # the JSON records what was used
    except hardware.HardwareError as e:
        fail(str(e))

    states = []
    for path in args.ckpt:
        try:
            states.append((path, load_checkpoint(path)))
        except CheckpointError as e:
            fail(str(e))
    lengths = args.lengths or default_lengths(
        max(s["model_config"]["train_len"] for _, s in states))

    results = []
    for path, state in states:
        try:
            model = model_from_checkpoint(state, args.device, **extension_overrides(args))
        except (CheckpointError, ValueError) as e:
            fail(f"{path}: {e}")
        tokens = validation_tokens(state, args.data_dir)
        if args.max_tokens:
            tokens = tokens[:args.max_tokens]
        if max(lengths) > len(tokens):
            fail(f"length {max(lengths)} is larger than the validation split ({len(tokens)} tokens)")
        config = dataclasses.asdict(model.config)
        result = {"path": path, "run": os.path.basename(os.path.dirname(os.path.abspath(path))), "pe": config["pe"],
                  "train_len": config["train_len"], "model_config": config, "step": state["step"],
                  "train_config": state.get("train_config", {}), "eval_dtype": args.dtype,
                  "loss": {}, "ppl": {}, "tokens": {}}
        for length in lengths:
            start = time.time()
            evaluate = chunked_ppl if args.mode == "chunks" else sliding_ppl
            loss, count = evaluate(model, tokens, length, max(1, args.batch_tokens // length), args.device, args.dtype)
            result["loss"][str(length)], result["ppl"][str(length)] = loss, math.exp(loss)
            result["tokens"][str(length)] = count
            print(f"{path} [{config['pe']}] length {length}: ppl {math.exp(loss):.2f} "
                  f"({count} targets, {time.time() - start:.1f} s)", flush=True)
        first = result["ppl"][str(min(lengths))]
        result["ppl_ratio"] = {k: v / result["ppl"].get(str(config["train_len"]), first) for k, v in result["ppl"].items()}
        results.append(result)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    report = {"mode": args.mode, "lengths": lengths, "dtype": args.dtype, "max_tokens": args.max_tokens, "checkpoints": results}
    data.write_atomically(Path(args.out), (json.dumps(report, indent=2) + "\n").encode())
    png = Path(args.out).with_suffix(".png")
    plot(results, png, f"validation perplexity ({args.mode})", "ppl")
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
