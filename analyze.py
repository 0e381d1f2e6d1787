"""
analyze.py: look inside trained models for the paper's frequency-domain argument.

    python analyze.py --ckpt out/rope/ckpt.pt out/fope/ckpt.pt
    python analyze.py --ckpt out/fope/ckpt.pt --layer 2 --head 1 --pair 5

The FoPE paper (Hua et al., arXiv 2412.17739) reads RoPE as an implicit non-uniform DFT: every
rotary pair carries one frequency, and the q.k logit is a sum of sinusoids in the relative distance. It
claims two things go wrong, and this script makes both visible, side by side per checkpoint:

    pair_norms.png          mean |q| and |k| per rotary pair before rotation, per layer:
                            pairs whose period exceeds train_len are under-trained
    spectrum.png            DFT of one rotated query pair over positions, and of that pair's
                            q.k score over relative distance: one clean line, or leakage
    logit_vs_distance.png   attention logit vs relative distance, past train_len: periodic
                            extension or its breakdown
    fope_coefficients.png   FoPE's frozen sin/cos coefficient matrices: identity plus noise
    retrieval_attention.png beyond the paper: where a passkey answer looks as prompts grow past
                            train_len, to tell distance from dilution (lib/retrieval.py)
    analysis.json           the arrays behind every figure, per checkpoint

q and k always come from real validation text, run through the model in windows of
train_len tokens (the positions it was trained on); the analyses are in spectra.py. The
retrieval attention builds its passkey prompts as eval_passkey.py does, with the same seed.

The files go to out/analysis/ by default (outside the committed results); every checkpoint,
its data and the output folder are checked before the first analysis.
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np

from lib import cli
from lib import hardware
from lib import memory
from lib import passkey
from lib import retrieval
from lib import runs
from lib import spectra
from lib.files import UserError, check_writable_folder, pyplot, write_atomically, write_figure


# -----------------------------------------------------------------------------
# figures


def titled(fig, title):
    """The figure, with its title: what to look for in it."""
    fig.suptitle(title, fontsize=10)
    return fig


RUNS_PER_ROW = 4  # a grid's seed 0, 1, 2 of RoPE, FoPE, ALiBi, NoPE: one row of panels per seed


def run_panels(n_runs, rows_per_run, width, height):
    """A figure with a column of rows_per_run panels (each width x height inches) for every
    checkpoint, at most RUNS_PER_ROW checkpoints side by side; returns the figure and, per
    checkpoint, its column of axes. Panels left over are switched off."""
    plt = pyplot()
    cols = min(n_runs, RUNS_PER_ROW)
    groups = -(-n_runs // cols)
    fig, axes = plt.subplots(rows_per_run * groups, cols,
                             figsize=(max(10, width * cols), height * rows_per_run * groups + 1),
                             squeeze=False, layout="constrained")
    columns = []
    for i in range(groups * cols):
        group, col = divmod(i, cols)
        column = axes[group * rows_per_run:(group + 1) * rows_per_run, col]
        if i < n_runs:
            columns.append(column)
        else:
            for ax in column:
                ax.axis("off")
    return fig, columns


def draw_pair_norms(results, labels):
    n_layer = max(len(r["pair_norms"]["q_norm"]) for r in results)
    fig, columns = run_panels(len(results), n_layer, 4.5, 2.4)
    for column, result, label in zip(columns, results, labels):
        norms = result["pair_norms"]
        pairs = np.arange(len(norms["rope_period"]))
        for layer in range(n_layer):
            ax = column[layer]
            if layer >= len(norms["q_norm"]):
                ax.axis("off")
                continue
            ax.plot(pairs, norms["q_norm"][layer], marker=".", label="|q|")
            ax.plot(pairs, norms["k_norm"][layer], marker=".", label="|k|")
            slow = pairs[np.array(norms["under_trained"])]
            if len(slow):
                ax.axvspan(slow[0] - 0.5, pairs[-1] + 0.5, color="gray", alpha=0.2,
                           label="RoPE period > train_len")
            if norms["position_pairs"] is not None:
                M = norms["position_pairs"]
                ax.axvspan(M - 0.5, pairs[-1] + 0.5, fill=False, hatch="//", edgecolor="tab:red", linewidth=0,
                           label=f"FoPE padding (pairs >= {M}): no position")
            ax.set_title(f"{label}, layer {layer}", fontsize=9)
            ax.set_ylabel("mean pair norm")
            ax.grid(alpha=0.3)
            if layer == 0:
                ax.legend(fontsize=7)
        column[-1].set_xlabel("rotary pair j (fast -> slow)")
    return titled(fig,
                "Mean |q|, |k| per rotary pair before rotation, over heads and real text.\n"
                "Look for: low or odd norms in the gray pairs (period > train_len: never a full cycle "
                "in training, under-trained under RoPE)")


def mark_frequencies(ax, spectrum, two_sided):
    """Vertical lines at the pair's intended frequency (solid) and its neighbours (dashed)."""
    signs = (1, -1) if two_sided else (1,)
    for sign in signs:
        if spectrum["intended_freq"] is not None:
            ax.axvline(sign * spectrum["intended_freq"], color="tab:red", linewidth=1,
                       alpha=1 if sign > 0 else 0.4, label="intended w/2pi" if sign > 0 else None)
        for i, freq in enumerate(spectrum["neighbour_freqs"]):
            ax.axvline(sign * freq, color="tab:green", linestyle="--", linewidth=1, alpha=1 if sign > 0 else 0.4,
                       label="neighbouring kept w/2pi" if sign > 0 and i == 0 else None)


def draw_spectra(results, labels):
    fig, columns = run_panels(len(results), 2, 5, 3)
    for (top, bottom), result, label in zip(columns, results, labels):
        spectrum = result["spectrum"]
        if spectrum is None:
            for ax in (top, bottom):
                ax.text(0.5, 0.5, f"{result['pe']}: no rotary pairs", ha="center", va="center")
                ax.axis("off")
            continue
        settings = f"{label}, layer {result['layer']}, head {result['head']}, pair {result['pair']}"
        top.semilogy(spectrum["query_freq"], spectrum["query_dft"], linewidth=0.8)
        mark_frequencies(top, spectrum, two_sided=True)
        top.set_title(f"{settings}\nrotated query pair a + ib over {spectrum['length']} positions", fontsize=9)
        top.set_xlabel("frequency (cycles per token; negative: clockwise)")
        bottom.semilogy(spectrum["score_freq"], spectrum["score_dft"], linewidth=0.8, color="tab:purple")
        mark_frequencies(bottom, spectrum, two_sided=False)
        bottom.set_title("this pair's share of q.k vs relative distance", fontsize=9)
        bottom.set_xlabel("frequency (cycles per token of distance)")
        for ax in (top, bottom):
            ax.set_ylabel("mean |DFT| (Hann)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return titled(fig,
                "Spectrum of one rotary pair. Look for: RoPE's single clean line at the red mark; FoPE's same "
                "line plus small leakage\nlines at other kept frequencies (and mirrored ones); extra lines in the "
                "score are harmonics (sums/differences of frequencies).\n"
                "Lines about 1e-6 below the peak are float32 rounding of the phases t*w, in any model")


def draw_logits(results, labels):
    fig, columns = run_panels(len(results), 1, 5, 3.2)
    for (ax,), result, label in zip(columns, results, labels):
        curve = result["logit_vs_distance"]
        ax.fill_between(curve["distance"], curve["p10"], curve["p90"], alpha=0.25, label="10-90 percentile")
        ax.plot(curve["distance"], curve["mean"], linewidth=1, label="mean")
        ax.axvline(result["train_len"], color="gray", linestyle="--", linewidth=1, label="train_len")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(0, curve["distance"][-1])
        ax.set_title(f"{label}, layer {result['layer']} (all heads)", fontsize=9)
        ax.set_xlabel("relative distance (tokens)")
        ax.set_ylabel("q.k / sqrt(d)  (+ ALiBi bias)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return titled(fig,
                "Attention logit of real (q, k) vs distance. Look for: the same band past train_len (periodic "
                "extension) or drift\nand new extremes (breakdown); ALiBi falls linearly, NoPE is flat by "
                "construction")


def draw_coefficients(results, labels):
    plt = pyplot()
    from matplotlib.colors import SymLogNorm
    fope = [(r, label) for r, label in zip(results, labels) if r["fope_coefficients"] is not None]
    n_layer = max(len(r["fope_coefficients"]["sin_coef"]) for r, _ in fope)
    fig, axes = plt.subplots(n_layer, 2 * len(fope), figsize=(3.4 * 2 * len(fope) + 1.5, 3 * n_layer + 1.2),
                             squeeze=False, layout="constrained")
    # symmetric log scale: the identity (1) and the noise (std ~0.01-0.1) are both visible
    norm = SymLogNorm(linthresh=0.01, vmin=-1, vmax=1)
    for col, (result, label) in enumerate(fope):
        for c, name in enumerate(("sin_coef", "cos_coef")):
            for layer in range(n_layer):
                ax = axes[layer, 2 * col + c]
                if layer >= len(result["fope_coefficients"][name]):
                    ax.axis("off")
                    continue
                image = ax.imshow(result["fope_coefficients"][name][layer], cmap="RdBu_r", norm=norm)
                ax.set_title(f"{label}, layer {layer}: {name}", fontsize=9)
                ax.set_xlabel("output pair r (M)")
                ax.set_ylabel("input frequency k (K)")
    fig.colorbar(image, ax=axes, shrink=0.8)
    return titled(fig,
                "FoPE coefficients, head 0 (frozen). Look for: the diagonal\n(identity, or step-eye when K > M) = "
                "each pair's own frequency;\nthe speckle = small Fourier-series weights on the other frequencies\n"
                "(symmetric log colours: small weights look large)")


def draw_retrieval_attention(results, labels):
    """Per checkpoint: the retrieval head's attention on the key against the needle's distance,
    one colour per prompt length (top), and the entropy of its attention against the prompt
    length beside that of attention spread evenly (bottom)."""
    fig, columns = run_panels(len(results), 2, 4.5, 3)
    for (top, bottom), result, label in zip(columns, results, labels):
        retrieval = result["retrieval_attention"]
        if retrieval is None or "skipped" in retrieval:
            for ax in (top, bottom):
                ax.text(0.5, 0.5, f"{label}: {retrieval['skipped'] if retrieval else 'not measured'}",
                        ha="center", va="center", wrap=True, fontsize=8)
                ax.axis("off")
            continue
        lengths = sorted(int(n) for n in retrieval["lengths"])
        for n in lengths:
            trials = retrieval["lengths"][str(n)]
            order = np.argsort(trials["distance"])
            top.plot(np.array(trials["distance"])[order], np.array(trials["weight"])[order], marker=".",
                     linewidth=0.8, label=f"{n} tokens")
        top.axvline(result["train_len"], color="gray", linestyle="--", linewidth=1)
        top.set_xscale("log", base=2)
        top.set_ylim(-0.03, 1.03)
        top.set_title(f"{label}: layer {retrieval['layer']}, head {retrieval['head']}", fontsize=9)
        top.set_xlabel("needle's distance from the answer (tokens)\ndashed: train_len")
        top.set_ylabel("attention on the key's digits")
        top.legend(fontsize=7)
        bottom.plot(lengths, [retrieval["lengths"][str(n)]["mean_entropy"] for n in lengths], marker="o",
                    label="retrieval head")
        bottom.plot(lengths, np.log(lengths), linestyle="--", color="gray", label="even over all tokens: ln T")
        bottom.axvline(result["train_len"], color="gray", linestyle="--", linewidth=1)
        bottom.set_xscale("log", base=2)
        bottom.set_xlabel("prompt length T (tokens)")
        bottom.set_ylabel("entropy of the answer's attention (nats)")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        bottom.legend(fontsize=7)
    return titled(fig,
                "Where the passkey answer looks (the head that attends most to the key at train_len). Look for:\n"
                "weight falling with the needle's distance at every length (distance: phases never trained),\n"
                "or falling at every distance as T grows, the entropy rising towards ln T (dilution)")


# -----------------------------------------------------------------------------
# command line


def parse_args(argv):
    """The command line, checked; argparse reports unknown options, UserError bad values."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--ckpt", nargs="+", required=True, help="one or more checkpoints")
    parser.add_argument("--layer", type=int, default=0, help="layer for the spectrum and logit analyses")
    parser.add_argument("--head", type=int, default=0, help="head for the spectrum analysis")
    parser.add_argument("--pair", type=int, help="rotary pair (default: intended period closest to train_len/4)")
    parser.add_argument("--text_tokens", type=cli.parse_int,
                        help="validation tokens for q/k statistics (default: 4 x train_len)")
    parser.add_argument("--max_distance", type=cli.parse_int,
                        help="largest distance for the logits (default: 16 x train_len)")
    parser.add_argument("--passkey_trials", type=cli.parse_int, default=20,
                        help="passkey prompts per length for the retrieval attention (0: skip it)")
    cli.add_lengths_option(parser, "prompt lengths of the retrieval attention", of_train_len="each checkpoint's train_len")
    parser.add_argument("--data_dir", default="data", help="where the token caches of the validation splits are")
    cli.add_device_option(parser)
    parser.add_argument("--out_dir", default="out/analysis", help="where the JSON and the figures go")
    args = parser.parse_args(argv)
    for name in ("text_tokens", "max_distance"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be a positive integer, got {value}")
    if args.passkey_trials < 0:
        raise UserError(f"--passkey_trials must be 0 or more, got {args.passkey_trials}")
    args.device = hardware.resolve_device(args.device)
    return args


def write_outputs(results, out_dir):
    """The JSON (written atomically) and the figures, all into out_dir."""
    labels = runs.label_runs(results)
    try:
        text = json.dumps({"checkpoints": results}, allow_nan=False)
    except ValueError:  # a bare NaN is not JSON
        raise UserError("an analysis gave a number that is not finite, so nothing is written") from None
    drawn = {"pair_norms": draw_pair_norms, "spectrum": draw_spectra, "logit_vs_distance": draw_logits,
             "retrieval_attention": draw_retrieval_attention}
    coefficients = os.path.join(out_dir, "fope_coefficients.png")
    if any(r["fope_coefficients"] is not None for r in results):
        drawn["fope_coefficients"] = draw_coefficients
    elif os.path.exists(coefficients):
        os.remove(coefficients)  # left by an analysis of other checkpoints: it would not match analysis.json
    for name, draw in drawn.items():
        fig = draw(results, labels)
        write_figure(os.path.join(out_dir, f"{name}.png"), fig, dpi=110)
    write_atomically(Path(out_dir) / "analysis.json", text.encode())  # last: the figures it describes are there


def main(argv=None):
    """Analyse every checkpoint; the errors a user can fix end in one line (cli.run)."""
    cli.run("analyze.py", lambda: analyze_all(parse_args(argv)))


def analyze_all(args):
    """Check every checkpoint, its data, what the analyses will take in memory and the output folder,
    then analyse and write."""
    # every check first, so that bad input never overwrites earlier results nor costs the work
    loaded = []
    for path in args.ckpt:
        state, model = runs.load_model(path, args.device)
        message = spectra.check_indices(model, args.layer, args.head, args.pair)
        if message:
            raise UserError(f"{path}: {message}")
        enc = runs.load_tokenizer(path, state, model)
        tokens = runs.load_validation(path, state, args.data_dir)
        train_len = model.config.train_len
        asked = args.text_tokens or 4 * train_len
        used = spectra.text_windows(tokens, train_len, asked).numel()  # whole windows of the split: what is used
        if used != asked:
            print(f"{path}: q/k statistics on {used:,} validation tokens, not {asked:,}: the split has "
                  f"{len(tokens):,}, in windows of train_len {train_len}", flush=True)
        plan = {"text_tokens": used, "max_distance": args.max_distance or 16 * train_len,
                "lengths": (args.lengths or cli.evaluation_lengths(train_len)) if args.passkey_trials else []}
        need, host = memory.analysis_bytes(model.config, plan["text_tokens"], plan["max_distance"], plan["lengths"],
                                           args.passkey_trials)
        memory.check(f"analysing {path}", need, args.device, "give fewer --text_tokens, a shorter --max_distance "
                     "or shorter --lengths", host)
        loaded.append((path, state, model, enc, tokens, plan))
    check_writable_folder(args.out_dir)

    results = []
    for path, state, model, enc, tokens, plan in loaded:
        pair = spectra.default_pair(model, args.layer) if args.pair is None else args.pair
        result = {"path": path, "run": runs.run_of(path),
                  "pe": model.config.pe, "train_len": model.config.train_len, "step": state["step"],
                  "model_config": state["model_config"], "train_config": state.get("train_config", {}),
                  "layer": args.layer, "head": args.head, "pair": pair,
                  "text_tokens": plan["text_tokens"], "max_distance": plan["max_distance"]}
        result.update(spectra.analyze(model, tokens, args.layer, args.head, pair,
                                      result["text_tokens"], result["max_distance"]))
        result["retrieval_attention"] = retrieval.retrieval_attention(
            model, enc, plan["lengths"], args.passkey_trials, passkey.TRIAL_SEED, args.device
        ) if args.passkey_trials else None
        results.append(result)
        print(f"{path} [{model.config.pe}]: analysed layer {args.layer}, head {args.head}, pair {pair}", flush=True)
    with cli.uninterrupted(cli.WRITTEN):  # a stop waits for the JSON and every figure
        write_outputs(results, args.out_dir)
    print(f"wrote {args.out_dir}/analysis.json and figures")


if __name__ == "__main__":
    main()
