"""
eval_ppl.py: perplexity of the validation split, or of another text, as the context grows past the
training length.

    python eval_ppl.py --ckpt out/fope/ckpt.pt out/rope/ckpt.pt
    python eval_ppl.py --ckpt out/fope/ckpt.pt --lengths 256,1024,4096 --mode sliding
    python eval_ppl.py --ckpt out/fope/ckpt.pt out/rope/ckpt.pt --text sotu --max_tokens 131072

The default protocol is the authors' (the evaluators of their OLMo configs): cut the validation token stream into
non-overlapping chunks of exactly T tokens, run each chunk as one forward pass from position 0,
and average the next-token cross-entropy over every target. Every length therefore includes
many early, little-context tokens, and only the positions past train_len are new to the model.
`--mode sliding` instead scores each token once with up to T tokens of context (stride T/2).
`--text` evaluates every checkpoint on one other text instead of its validation split, to see whether
what a position embedding does past train_len holds on text unlike the training data; each
checkpoint reads it through its own tokenizer, documents joined by end-of-text as in training.

Writes a JSON of the numbers and a PNG of perplexity vs length next to it (by default
out/eval/ppl.json, outside the committed results). The text, every checkpoint, its data and the
output folder are checked before the first evaluation, so that a mistake never costs the work.
"""

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lib import cli
from lib import data
from lib import hardware
from lib import memory
from lib import runs
from lib import token_cache
from lib.files import UserError, check_writable_folder, pyplot, write_atomically, write_figure


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


def draw(results, ylabel, key):
    """The figure of the JSON records `results`: `key` (e.g. "ppl") against the length, one
    curve per checkpoint, train_len dashed."""
    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    for result, label in zip(results, runs.label_runs(results)):
        lengths = [int(k) for k in result[key]]
        ax.plot(lengths, list(result[key].values()), marker="o", label=label)
    for train_len in sorted({r["train_len"] for r in results}):
        ax.axvline(train_len, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens); dashed: train_len")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def parse_args(argv=None):
    """The command line, checked; argparse reports unknown options, UserError bad values."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--ckpt", nargs="+", required=True, help="one or more checkpoints")
    cli.add_lengths_option(parser, "evaluation lengths")
    parser.add_argument("--mode", choices=("chunks", "sliding"), default="chunks",
                        help="chunks: the authors' protocol; sliding: every token with up to T tokens of context")
    parser.add_argument("--text", help="evaluate on this text, in each checkpoint's own tokenizer, instead of its "
                        "validation split: 'sotu' (the presidents' annual messages to Congress of 1790-1899, prose "
                        "shipped by the sotu package), a text file, or a folder of .txt/.md files "
                        "(default: the validation split)")
    parser.add_argument("--max_tokens", type=cli.parse_int, default=0, help="evaluate only the first N tokens (0: all)")
    parser.add_argument("--batch_tokens", type=cli.parse_int, default=16384, help="tokens per forward pass")
    cli.add_dtype_option(parser)
    cli.add_device_option(parser)
    parser.add_argument("--data_dir", default="data", help="where the token caches of the validation splits are")
    parser.add_argument("--out", default="out/eval/ppl.json", help="JSON path; the PNG goes beside it")
    parser.add_argument("--no_figures", action="store_true",
                        help="write the JSON only (a grid's report draws the same curves from the JSON)")
    cli.add_extension_options(parser)
    args = parser.parse_args(argv)
    if not args.out.endswith(".json") or os.path.isdir(args.out):
        raise UserError(f"--out must be a path ending in .json, got {args.out!r}")
    if args.max_tokens < 0 or args.batch_tokens < 1:
        raise UserError("--max_tokens must be >= 0 and --batch_tokens >= 1")
    args.overrides = cli.extension_overrides(args)
    args.device = hardware.resolve_device(args.device)
    args.dtype = hardware.resolve_dtype(args.dtype, args.device)  # the JSON records what was used
    return args


def main(argv=None):
    """Evaluate every checkpoint; the errors a user can fix end in one line (cli.run)."""
    cli.run("eval_ppl.py", lambda: evaluate_all(parse_args(argv)))


def load_all(args, documents):
    """Every checkpoint's model and the tokens it is evaluated on, all checked before any evaluation:
    its validation split, or `documents` (--text) in its own tokenizer, joined by its end-of-text token."""
    loaded = []
    for path in args.ckpt:
        state, model = runs.load_model(path, args.device, **args.overrides)
        if documents is not None:
            enc = runs.load_tokenizer(path, state, model)
            tokens = np.array(token_cache.encode_documents(enc, documents, enc.eot_token), dtype=np.int64)
        else:
            tokens = runs.load_validation(path, state, args.data_dir)
        loaded.append((path, state, model, tokens[:args.max_tokens] if args.max_tokens else tokens))
    return loaded


def evaluate_all(args):
    """Check the text, every checkpoint, its data and the output folder, then evaluate and write."""
    # the JSON's "text": 'validation', 'sotu' or an absolute path
    text, documents = data.load_evaluation_text(args.text) if args.text else ("validation", None)
    loaded = load_all(args, documents)
    lengths = args.lengths or cli.evaluation_lengths(max(model.config.train_len for _, _, model, _ in loaded))
    for path, _, model, tokens in loaded:
        if max(lengths) > len(tokens):
            what = f"the text {args.text}" if args.text else "the validation split"
            raise UserError(f"{path}: length {max(lengths)} is larger than {what} ({len(tokens)} tokens)")
        stacked = 16 * len(tokens) if args.mode == "sliding" else 0  # sliding stacks every window of a length

        def need(length, config=model.config, count=len(tokens)):
            windows = count // length if args.mode == "chunks" else (count - length) // (length // 2) + 1
            batch = max(1, min(args.batch_tokens // length, windows))
            return memory.forward_bytes(config, batch, length), stacked + 8 * batch * length, batch

        memory.check_lengths(f"evaluating {path}", lengths, args.device, need,
                             "give shorter --lengths or fewer --batch_tokens")
        if args.max_tokens > len(tokens):
            print(f"{path}: evaluating all {len(tokens):,} tokens of the text (--max_tokens {args.max_tokens:,})")
    check_writable_folder(os.path.dirname(os.path.abspath(args.out)))

    results = []
    for path, state, model, tokens in loaded:
        config = dataclasses.asdict(model.config)
        result = {"path": path, "run": runs.run_of(path), "pe": config["pe"],
                  "train_len": config["train_len"], "model_config": config, "step": state["step"],
                  "train_config": state.get("train_config", {}), "eval_dtype": args.dtype,
                  "text": text, "text_tokens": len(tokens), "loss": {}, "ppl": {}, "tokens": {}}
        for length in lengths:
            start = time.time()
            evaluate = chunked_ppl if args.mode == "chunks" else sliding_ppl
            loss, count = evaluate(model, tokens, length, max(1, args.batch_tokens // length), args.device, args.dtype)
            ppl = math.exp(loss) if loss < 700 else math.inf  # a NaN loss gives inf too
            if not math.isfinite(ppl):  # JSON has no NaN or inf: refused rather than written as invalid JSON
                raise UserError(f"{path}: the loss at length {length} is {loss}, so there is no perplexity to write")
            result["loss"][str(length)], result["ppl"][str(length)] = loss, ppl
            result["tokens"][str(length)] = count
            print(f"{path} [{config['pe']}] length {length}: ppl {ppl:.2f} "
                  f"({count} targets, {time.time() - start:.1f} s)", flush=True)
        first = result["ppl"][str(min(lengths))]
        result["ppl_ratio"] = {k: v / result["ppl"].get(str(config["train_len"]), first) for k, v in result["ppl"].items()}
        results.append(result)

    report = {"mode": args.mode, "lengths": lengths, "dtype": args.dtype, "max_tokens": args.max_tokens, "checkpoints": results}
    png = Path(args.out).with_suffix(".png")
    what = f"perplexity on {Path(args.text).name}" if args.text else "validation perplexity"
    fig = None if args.no_figures else draw(results, f"{what} ({args.mode})", "ppl")
    with cli.uninterrupted(cli.WRITTEN):  # a stop waits for the JSON and its figure
        write_atomically(Path(args.out), (json.dumps(report, indent=2) + "\n").encode())
        if fig is not None:
            write_figure(png, fig, dpi=120)
    print(f"wrote {args.out}" + ("" if fig is None else f" and {png}"))


if __name__ == "__main__":
    main()
