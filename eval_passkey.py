"""
eval_passkey.py: passkey-retrieval accuracy versus prompt length, for one or more checkpoints.

    python eval_passkey.py --ckpt out/fope/ckpt.pt out/rope/ckpt.pt
    python eval_passkey.py --ckpt out/rope/ckpt.pt --rope_scaling yarn --rope_scale 16   # extension, no training

For each prompt length every checkpoint answers the same trials (keys and needle depths come
from --seed alone), by greedy decoding of up to 10 tokens; a trial is correct when the first
number in the answer is the key (protocol: the authors' eval_passkey/eval_passkey.py; prompts:
passkey.py; what differs: FAITHFULNESS.md).
Writes a JSON file (by default out/eval/passkey.json, outside the committed results) and two
figures next to it: accuracy versus length, and a heatmap of accuracy over length x needle
depth per checkpoint. The JSON also holds, per checkpoint, two diagnostics at train_len that
tell why retrieval fails when it does (see diagnostics()).
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path


import numpy as np
import torch

from lib import cli
from lib import hardware
from lib import memory
from lib.files import UserError, check_writable_folder, pyplot, write_atomically, write_figure
from lib.passkey import (MAX_KEY, NEEDLE, NEEDLE_FURTHER, build_prompt, completion_text, feasible_lengths,
                     needle_repeat_digits, score, shortest_prompt_len, teacher_forced_digits, TRIAL_SEED,
                     trial_settings)
from lib.runs import label_runs, load_model, load_tokenizer, run_of

MAX_NEW_TOKENS = 10  # as in the authors' script
# Default prompts per forward pass: about this many tokens, so that the activations of a batch
# stay bounded as prompts grow.
TOKENS_PER_FORWARD = 2**15

# Evaluation runs in float32. On a 2-core CPU, 100 trials at 4096 tokens (4 layers, 256 wide,
# vocab 4096) take about 90 s; bf16 autocast saves only a third of that, while its logits are
# off by up to ~0.02. Where retrieval starts to fail the key's digits are near-ties, so bf16
# could flip greedy answers and make accuracy depend on the precision, not on the position
# embedding.


def parse_args(argv=None):
    """The command line, checked; argparse reports unknown options, UserError bad values."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--ckpt", nargs="+", required=True, help="checkpoint file(s)")
    cli.add_lengths_option(parser, "prompt lengths")
    parser.add_argument("--trials", type=positive_int, default=100, help="prompts per length")
    parser.add_argument("--seed", type=non_negative_int, default=TRIAL_SEED, help="seed of the keys and depths")
    parser.add_argument("--batch_size", type=positive_int,
                        help=f"prompts per forward pass (default: about {TOKENS_PER_FORWARD} tokens' worth)")
    parser.add_argument("--depth_buckets", type=positive_int, default=5, help="needle depth bins")
    parser.add_argument("--out", type=Path, default=Path("out/eval/passkey.json"),
                        help="JSON output path; the figures go beside it")
    parser.add_argument("--no_figures", action="store_true",
                        help="write the JSON only (a grid's report draws the same curves from the JSON)")
    cli.add_device_option(parser)
    cli.add_extension_options(parser)
    args = parser.parse_args(argv)
    if args.out.suffix != ".json" or args.out.is_dir():
        raise UserError(f"--out must be a .json file path (the figures go next to it), got {args.out}")
    args.overrides = cli.extension_overrides(args)
    args.device = hardware.resolve_device(args.device)
    return args


def positive_int(text):
    """argparse type: an integer >= 1."""
    value = cli.parse_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    """argparse type: an integer >= 0 (numpy seeds cannot be negative)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def load_run(path, device, overrides):
    """Load a checkpoint, with `overrides` of its model config (context extension): returns a
    dict with the model, its tokenizer and what describes the run."""
    state, model = load_model(path, device, **overrides)
    enc = load_tokenizer(path, state, model)
    return {
        "path": str(path),
        "model": model,
        "enc": enc,
        "pe": model.config.pe,
        "model_config": dataclasses.asdict(model.config),
        "train_len": model.config.train_len,
        "run": run_of(path),
        "step": state["step"],
        "train_config": state.get("train_config", {}),
    }


def answer_prompts(run, prompts, keys, batch_size, device):
    """Greedy answers to prompts of one length, in batches; returns one bool per trial (correct or not)."""
    enc, model, length = run["enc"], run["model"], len(prompts[0])
    correct = []
    for start in range(0, len(prompts), batch_size):
        idx = torch.tensor(prompts[start:start + batch_size], dtype=torch.long, device=device)  # (B, length)
        out = model.generate(idx, MAX_NEW_TOKENS, temperature=0.0, use_cache=True)  # (B, length + 10)
        for ids, key in zip(out[:, length:].tolist(), keys[start:start + batch_size]):
            correct.append(score(completion_text(enc, ids), key))
    return correct


def accuracy_by_depth(correct, depths, buckets):
    """Accuracy per depth bucket [b/buckets, (b+1)/buckets); None for an empty bucket."""
    hits, counts = np.zeros(buckets), np.zeros(buckets)
    for ok, depth in zip(correct, depths):
        bucket = min(int(depth * buckets), buckets - 1)
        hits[bucket] += ok
        counts[bucket] += 1
    return [float(h / c) if c else None for h, c in zip(hits, counts)]


# -----------------------------------------------------------------------------
# why retrieval works or fails: two measurements at train_len (passkey.py measures them)


def diagnostics(run, trials, seed, device):
    """Why retrieval works or fails, at train_len, as a JSON record: the answer's digits with
    the true answer fed in, and the needle's own repeat of the key as trained and with the two
    mentions three words further apart (a fixed-offset copy fails there, a lookup does not)."""
    model, enc, length = run["model"], run["enc"], run["train_len"]
    first_digit, later_digits = teacher_forced_digits(model, enc, length, trials, seed, device)
    return {"length": length, "first_digit_accuracy": first_digit, "later_digit_accuracy": later_digits,
            "repeat_later_digits": needle_repeat_digits(model, enc, length, trials, seed, device, NEEDLE),
            "repeat_later_digits_further": needle_repeat_digits(model, enc, length, trials, seed, device,
                                                                NEEDLE_FURTHER)}


def evaluate_run(run, args, lengths, label):
    """Evaluate one checkpoint at every length; returns its JSON record."""
    record = {key: run[key] for key in ("path", "pe", "train_len", "run", "step", "model_config", "train_config")}
    record.update(trials=args.trials, accuracy={}, accuracy_by_depth={}, skipped_lengths=[])
    for length in lengths:
        keys, depths = trial_settings(args.seed, length, args.trials)
        batch_size = args.batch_size or max(1, TOKENS_PER_FORWARD // length)
        start = time.time()
        try:
            prompts = [build_prompt(run["enc"], length, depth, key) for key, depth in zip(keys, depths)]
        except ValueError as error:  # the length cannot hold the fixed text
            print(f"{label}: skipping length {length}: {error}", flush=True)
            record["skipped_lengths"].append(length)
            continue
        correct = answer_prompts(run, prompts, keys, batch_size, args.device)
        record["accuracy"][str(length)] = float(np.mean(correct))
        record["accuracy_by_depth"][str(length)] = accuracy_by_depth(correct, depths, args.depth_buckets)
        print(f"{label}: length {length:6d}  accuracy {np.mean(correct):.3f}  ({time.time() - start:.1f} s)", flush=True)
    try:
        record["diagnostics"] = found = diagnostics(run, min(args.trials, 64), args.seed, args.device)
    except ValueError as error:  # train_len cannot hold a prompt
        print(f"{label}: no diagnostics: {error}", flush=True)
        return record
    print(f"{label}: at length {found['length']}, with the answer fed in: first key digit "
          f"{found['first_digit_accuracy']:.2f}, later digits {found['later_digit_accuracy']:.2f}; the needle's "
          f"repeat of the key, later digits: {found['repeat_later_digits']:.2f} as trained, "
          f"{found['repeat_later_digits_further']:.2f} three words further", flush=True)
    return record


def draw_accuracy(records, labels, lengths):
    """Accuracy versus prompt length, one curve per checkpoint, its train_len dashed."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for record, label in zip(records, labels):
        xs = [n for n in lengths if str(n) in record["accuracy"]]
        line, = ax.plot(xs, [record["accuracy"][str(n)] for n in xs], marker="o", label=label)
        ax.axvline(record["train_len"], color=line.get_color(), linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("prompt length (tokens); dashed: training length")
    ax.set_ylabel("passkey accuracy")
    ax.set_title("Passkey retrieval")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def draw_heatmaps(records, labels, lengths, buckets):
    """Accuracy over (needle depth bucket, prompt length), one panel per checkpoint."""
    panel_size = (0.6 * len(lengths) + 1.5, 0.4 * buckets + 2)
    plt = pyplot()
    fig, axes = plt.subplots(
        1, len(records), figsize=(panel_size[0] * len(records), panel_size[1]), sharey=True, squeeze=False
    )
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")  # grey: skipped or empty
    for ax, record, label in zip(axes[0], records, labels):
        grid = np.full((buckets, len(lengths)), np.nan)  # (depth bucket, length)
        for column, n in enumerate(lengths):
            for row, value in enumerate(record["accuracy_by_depth"].get(str(n), [])):
                grid[row, column] = np.nan if value is None else value
        image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(label)
    axes[0, 0].set_yticks(range(buckets), [f"{100 * b // buckets}-{100 * (b + 1) // buckets}%" for b in range(buckets)])
    axes[0, 0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    return fig


def main(argv=None):
    """Check every input, evaluate every checkpoint, then write the JSON file and the figures. The
    errors a user can fix end in one line (cli.run)."""
    cli.run("eval_passkey.py", lambda: evaluate_all(parse_args(argv)))


def evaluate_all(args):
    runs = [load_run(path, args.device, args.overrides) for path in args.ckpt]  # all checked before any work
    lengths = args.lengths or cli.evaluation_lengths(max(run["train_len"] for run in runs))
    for run in runs:
        def need(length, config=run["model"].config):  # the prompts of a length, and a batch of them answered
            batch = args.batch_size or max(1, TOKENS_PER_FORWARD // length)
            return memory.generation_bytes(config, batch, length), 8 * (args.trials + batch) * length, batch

        memory.check_lengths(f"answering {run['path']}'s {args.trials} prompts", lengths, args.device, need,
                             "give shorter --lengths, fewer --trials or a smaller --batch_size")
        if not feasible_lengths(run["enc"], lengths, args.seed, args.trials):
            raise UserError(f"no length in {','.join(map(str, lengths))} can hold the fixed text "
                     f"of {run['path']}'s prompts ({shortest_prompt_len(run['enc'], MAX_KEY)} tokens with a "
                     f"{len(str(MAX_KEY))}-digit key): give longer --lengths")
    check_writable_folder(args.out.parent)  # fail now rather than after the evaluation
    labels = label_runs(runs)
    records = [evaluate_run(run, args, lengths, label) for run, label in zip(runs, labels)]

    results = {
        "settings": {
            "seed": args.seed,
            "trials": args.trials,
            "lengths": lengths,
            "depth_buckets": args.depth_buckets,
            "max_new_tokens": MAX_NEW_TOKENS,
            "dtype": "fp32",  # see the note at the top: evaluation never autocasts
        },
        "checkpoints": records,
    }
    try:
        text = json.dumps(results, indent=2, allow_nan=False)
    except ValueError:  # a bare NaN is not JSON
        raise UserError("a result is not a finite number, so nothing is written") from None
    accuracy_png = args.out.with_name(args.out.stem + ".png")
    heatmap_png = args.out.with_name(args.out.stem + "_heatmap.png")
    figures = [] if args.no_figures else [(draw_accuracy(records, labels, lengths), accuracy_png),
                                          (draw_heatmaps(records, labels, lengths, args.depth_buckets), heatmap_png)]
    with cli.uninterrupted(cli.WRITTEN):  # a stop waits for the JSON and its figures, each never half-written
        write_atomically(args.out, (text + "\n").encode())
        for fig, png in figures:
            write_figure(png, fig, dpi=120, bbox_inches="tight")
    print(f"wrote {', '.join(map(str, [args.out, *(png for _, png in figures)]))}")


if __name__ == "__main__":
    main()
