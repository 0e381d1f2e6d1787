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
    analysis.json           the arrays behind every figure, per checkpoint

q and k always come from real validation text, run through the model in windows of
train_len tokens (the positions it was trained on), captured before the rotation; the
rotation to other positions is then done with each layer's own position module.

The files go to out/analysis/ by default (outside the committed results); every checkpoint,
its data and the output folder are checked before the first analysis.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

import data
import hardware
import runs
from checkpoint import CheckpointError
from fope_gpt import FoPE, apply_rotary, kept_frequencies

NUM_SPECTRUM_VECTORS = 16   # real q (and k) vectors averaged in each spectrum
NUM_LOGIT_SAMPLES = 256     # real (q, k) pairs per distance in the logit analysis


def fail(message):
    sys.exit(f"analyze.py: error: {message}")


# -----------------------------------------------------------------------------
# which frequency each rotary pair carries


def rope_frequencies(config):
    """RoPE's omega_j = theta^(-2j/d) for every pair j, (d/2,): the reference for all four pe
    types (for ALiBi and NoPE it is what RoPE would have used)."""
    return kept_frequencies(config.head_dim, config.train_len, config.rope_theta, clip=False)


def intended_index(pos, pair):
    """Index into pos.freqs of the frequency meant to drive `pair`, or None if none does.

    RoPE: pair j rotates at freqs[j]. FoPE: output pair r is dominated by input frequency
    r * ceil(K/M) (identity or step-eye); padded pairs (r >= M) carry frequency zero, and
    pairs past the step-eye's reach only noise.
    """
    if isinstance(pos, FoPE):
        K, M = pos.sin_coef.shape[1:]
        index = pair * math.ceil(K / M)
        return index if pair < M and index < K else None
    return pair


def pair_frequency(model, layer, pair):
    """omega of `pair` in `layer` as its position module intends it, or None."""
    pos = model.blocks[layer].attn.pos
    if model.config.pe == "fope":
        index = intended_index(pos, pair)
        return None if index is None else float(pos.freqs[index])
    return float(rope_frequencies(model.config)[pair])


def default_pair(model, layer):
    """The pair whose intended period 2*pi/omega is closest to train_len / 4: slow enough to
    matter for long-range attention, fast enough to complete several cycles in training."""
    target = model.config.train_len / 4
    periods = {}
    for pair in range(model.config.head_dim // 2):
        omega = pair_frequency(model, layer, pair)
        if omega:
            periods[pair] = 2 * math.pi / omega
    return min(periods, key=lambda pair: abs(periods[pair] - target))


# -----------------------------------------------------------------------------
# q and k from real text


def text_windows(tokens, train_len, num_tokens):
    """The first num_tokens validation tokens as rows of train_len tokens (B, T), each row
    starting at position 0 like a training sequence."""
    window = min(train_len, len(tokens))
    rows = max(1, min(num_tokens, len(tokens)) // window)
    return torch.from_numpy(np.asarray(tokens[:rows * window]).astype(np.int64)).view(rows, window)


@torch.no_grad()
def capture_qk(model, windows):
    """Queries and keys of every layer before rotation, on token windows (B, T).

    Returns q, k, each (n_layer, H, B*T, d). A hook on each layer's qkv projection sees
    attn_norm(x) @ W_qkv, i.e. exactly what the attention rotates next.
    """
    outputs = []
    hooks = [block.attn.qkv.register_forward_hook(lambda module, inputs, out: outputs.append(out))
             for block in model.blocks]
    try:
        model(windows.to(next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    H, C = model.config.n_head, model.config.n_embd
    qkv = torch.stack(outputs).float()                    # (n_layer, B, T, 3C)
    n_layer, B, T, _ = qkv.shape
    q, k = qkv[..., :C], qkv[..., C:2 * C]                # (n_layer, B, T, C) each
    return tuple(x.reshape(n_layer, B * T, H, C // H).transpose(1, 2) for x in (q, k))


# -----------------------------------------------------------------------------
# 1. under-trained frequencies


def pair_norms(x):
    """Mean norm of each rotary pair (channels j, j + d/2) over heads and positions.

    x (n_layer, H, N, d) -> (n_layer, d/2). RoPE's rotation keeps a pair's norm (FoPE's nearly
    so), so this measures how much the model uses each frequency. A pair whose period exceeds
    train_len never saw a full cycle in training (the paper's "time-domain truncation"): the
    paper expects it under-trained.
    """
    a, b = x.chunk(2, dim=-1)                              # (n_layer, H, N, d/2) each
    return (a ** 2 + b ** 2).sqrt().mean(dim=(1, 2))


def under_trained_analysis(model, q, k):
    """Pair norms per layer, with the pairs RoPE would leave under-trained and FoPE's padding."""
    config = model.config
    periods = 2 * math.pi / rope_frequencies(config)       # (d/2,)
    pos = model.blocks[0].attn.pos
    return {
        "q_norm": pair_norms(q).tolist(),                  # (n_layer, d/2)
        "k_norm": pair_norms(k).tolist(),
        "rope_period": periods.tolist(),                   # (d/2,)
        "under_trained": (periods > config.train_len).tolist(),
        # FoPE's pairs >= M are padding: constant cos/sin, no position at all
        "position_pairs": pos.sin_coef.shape[2] if isinstance(pos, FoPE) else None,
    }


# -----------------------------------------------------------------------------
# 2. spectrum of one pair


def tables_at(pos, positions):
    """The module's cos and sin at integer positions (P,): (P, d/2) for RoPE, (H, P, d/2) for FoPE."""
    cos, sin = pos.cos_sin(int(positions.max()) + 1)
    return cos[..., positions, :], sin[..., positions, :]


def rotate_to(pos, x, head, positions):
    """Rotate vectors x (S, d) of one head to every position: (S, P, d)."""
    cos, sin = tables_at(pos, positions)
    if cos.dim() == 3:                                     # FoPE: per-head tables
        cos, sin = cos[head], sin[head]
    return apply_rotary(x[:, None, :].float(), cos, sin)


def magnitude_spectrum(signal, onesided):
    """Mean |DFT| over the rows of signal (S, N), Hann-windowed and scaled so that a pure
    tone of amplitude A peaks at about A. The window keeps the finite DFT's own sidelobes
    from looking like leakage. Returns (frequencies in cycles per token, magnitudes)."""
    signal, N = signal.cpu(), signal.shape[-1]
    window = torch.hann_window(N, periodic=False, dtype=torch.float64)
    signal = signal.to(torch.complex128 if signal.is_complex() else torch.float64) * window
    if onesided:
        spectrum, freqs = torch.fft.rfft(signal).abs(), torch.fft.rfftfreq(N)
    else:
        spectrum = torch.fft.fftshift(torch.fft.fft(signal).abs(), dim=-1)
        freqs = torch.fft.fftshift(torch.fft.fftfreq(N))
    return freqs.numpy(), (spectrum.mean(0) / window.sum()).numpy()


def query_spectrum(pos, q, head, pair, length):
    """DFT over positions 0..length-1 of a rotated query pair, read as a + ib.

    q (S, d): real (pre-rotation) queries of `head`. Under RoPE the pair is (a + ib) e^{i w t},
    a single line at w / 2pi cycles per token; FoPE's Fourier series adds small lines at the
    other kept frequencies, and unequal sin/cos weights add mirror lines at negative ones.
    Returns (frequencies (length,), mean magnitude (length,)), two-sided.
    """
    rotated = rotate_to(pos, q, head, torch.arange(length, device=q.device))          # (S, N, d)
    half = q.shape[-1] // 2
    signal = torch.complex(rotated[..., pair], rotated[..., pair + half])  # (S, N)
    return magnitude_spectrum(signal, onesided=False)


def score_spectrum(pos, q, k, head, pair, length):
    """DFT over relative distance of the pair's share of the q.k score.

    The query sits at position length-1, the key at length-1-delta for delta = 0..length-1;
    q, k (S, d) are real vectors of `head`. RoPE gives one line at w / 2pi; products of
    FoPE's mixed tables add lines at sums and differences of kept frequencies.
    Returns (frequencies (length//2 + 1,), mean magnitude), one-sided (the score is real).
    """
    last = length - 1
    half = q.shape[-1] // 2
    positions = last - torch.arange(length, device=q.device)        # delta = 0..N-1
    q_rot = rotate_to(pos, q, head, positions[:1])[:, 0]            # (S, d)
    k_rot = rotate_to(pos, k, head, positions)                      # (S, N, d)
    channels = [pair, pair + half]
    score = (q_rot[:, None, channels] * k_rot[..., channels]).sum(-1)  # (S, N)
    return magnitude_spectrum(score, onesided=True)


def spectrum_analysis(model, q, k, layer, head, pair, rng):
    """Both spectra for one layer/head/pair over 8 x train_len positions; None without rotation."""
    attn = model.blocks[layer].attn
    if attn.pe not in ("rope", "fope"):
        return None
    length = 8 * model.config.train_len
    picks = torch.from_numpy(rng.choice(q.shape[2], size=min(NUM_SPECTRUM_VECTORS, q.shape[2]), replace=False))
    q_h, k_h = q[layer, head, picks], k[layer, head, picks]         # (S, d)
    freqs, query = query_spectrum(attn.pos, q_h, head, pair, length)
    score_freqs, score = score_spectrum(attn.pos, q_h, k_h, head, pair, length)
    index = intended_index(attn.pos, pair)
    kept = attn.pos.freqs / (2 * math.pi)                           # cycles per token
    neighbours = [] if index is None else [float(kept[i]) for i in (index - 1, index + 1) if 0 <= i < len(kept)]
    return {
        "length": length,
        "intended_freq": None if index is None else float(kept[index]),
        "neighbour_freqs": neighbours,
        "kept_freqs": kept.tolist(),
        "query_freq": freqs.tolist(), "query_dft": query.tolist(),
        "score_freq": score_freqs.tolist(), "score_dft": score.tolist(),
    }


# -----------------------------------------------------------------------------
# 3. attention logit vs relative distance


def distance_grid(max_distance, train_len):
    """0, 1, ..., 32, then about 200 log-spaced distances up to max_distance, plus train_len."""
    dense = np.arange(min(33, max_distance + 1))
    sparse = np.geomspace(33, max(33, max_distance), 200).round().astype(int)
    grid = np.concatenate([dense, sparse, [train_len, max_distance]])
    return np.unique(grid[grid <= max_distance])


@torch.no_grad()
def logit_vs_distance(attn, q, k, distances, train_len, rng, samples=NUM_LOGIT_SAMPLES):
    """Attention logits of real (q, k) pairs placed at distance delta, for every delta.

    q, k (H, N, d): one layer's pre-rotation vectors. Each sample joins a random query and a
    random key; the key sits at a random position n < train_len and the query at n + delta,
    as when a late query looks back at early text. Rotation uses the layer's own tables, so
    RoPE and FoPE behave exactly as in the model; ALiBi adds its bias -slope_h * delta; NoPE
    has no position, so its logits cannot depend on delta.
    Returns logits (len(distances), H, samples), scaled by 1/sqrt(d) as in the attention.
    """
    H, N, d = q.shape
    qs = q[:, torch.from_numpy(rng.integers(N, size=samples))]        # (H, S, d)
    ks = k[:, torch.from_numpy(rng.integers(N, size=samples))]
    key_pos = torch.from_numpy(rng.integers(train_len, size=samples)).to(q.device)  # (S,)
    rotary = attn.pe in ("rope", "fope")
    if rotary:
        ks = apply_rotary(ks, *tables_at(attn.pos, key_pos))
    logits = []
    for delta in distances:
        q_rot = apply_rotary(qs, *tables_at(attn.pos, key_pos + int(delta))) if rotary else qs
        logit = (q_rot * ks).sum(-1) / math.sqrt(d)        # (H, S)
        if attn.pe == "alibi":
            logit = logit - attn.pos.slopes[:, None] * float(delta)
        logits.append(logit)
    return torch.stack(logits).cpu().numpy()


def logit_analysis(model, q, k, layer, max_distance, rng):
    """Mean, spread and percentiles of the logit over heads and samples, per distance."""
    train_len = model.config.train_len
    distances = distance_grid(max_distance, train_len)
    logits = logit_vs_distance(model.blocks[layer].attn, q[layer], k[layer], distances, train_len, rng)
    flat = logits.reshape(len(distances), -1)              # (G, H*S)
    return {
        "distance": distances.tolist(),
        "mean": flat.mean(1).tolist(), "std": flat.std(1).tolist(),
        "p10": np.percentile(flat, 10, axis=1).tolist(), "p90": np.percentile(flat, 90, axis=1).tolist(),
    }


# -----------------------------------------------------------------------------
# 4. FoPE's coefficients


def coefficient_analysis(model, head=0):
    """sin_coef and cos_coef of one head in every layer, (n_layer, K, M) each; None if not FoPE."""
    if model.config.pe != "fope":
        return None
    return {name: [getattr(block.attn.pos, name)[head].detach().cpu().tolist() for block in model.blocks]
            for name in ("sin_coef", "cos_coef")}


# -----------------------------------------------------------------------------
# everything for one checkpoint


def analyze(model, tokens, layer, head, pair, text_tokens, max_distance, seed=0):
    """Run the four analyses on one model and its validation tokens; returns a JSON-ready dict."""
    rng = np.random.default_rng(seed)
    q, k = capture_qk(model, text_windows(tokens, model.config.train_len, text_tokens))
    return {
        "pair_norms": under_trained_analysis(model, q, k),
        "spectrum": spectrum_analysis(model, q, k, layer, head, pair, rng),
        "logit_vs_distance": logit_analysis(model, q, k, layer, max_distance, rng),
        "fope_coefficients": coefficient_analysis(model),
    }


def check_indices(model, layer, head, pair):
    """A one-line message if layer, head or pair is out of range for the model, else None."""
    config = model.config
    for name, value, size in (("layer", layer, config.n_layer), ("head", head, config.n_head),
                              ("pair", pair, config.head_dim // 2)):
        if value is not None and not 0 <= value < size:
            return f"--{name} {value} is out of range: the model has {size} {name}s (0..{size - 1})"
    return None


# -----------------------------------------------------------------------------
# figures


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_pair_norms(results, labels, path):
    plt = pyplot()
    n_layer = max(len(r["pair_norms"]["q_norm"]) for r in results)
    fig, axes = plt.subplots(n_layer, len(results), figsize=(max(10, 4.5 * len(results)), 2.4 * n_layer + 1),
                             squeeze=False, sharex="col", layout="constrained")
    for col, (result, label) in enumerate(zip(results, labels)):
        norms = result["pair_norms"]
        pairs = np.arange(len(norms["rope_period"]))
        for layer in range(n_layer):
            ax = axes[layer, col]
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
        axes[-1, col].set_xlabel("rotary pair j (fast -> slow)")
    fig.suptitle("Mean |q|, |k| per rotary pair before rotation, over heads and real text.\n"
                 "Look for: low or odd norms in the gray pairs (period > train_len: never a full cycle "
                 "in training, under-trained under RoPE)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def plot_spectra(results, labels, path):
    plt = pyplot()
    fig, axes = plt.subplots(2, len(results), figsize=(max(10, 5 * len(results)), 7), squeeze=False,
                             layout="constrained")
    for col, (result, label) in enumerate(zip(results, labels)):
        spectrum, (top, bottom) = result["spectrum"], axes[:, col]
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
    fig.suptitle("Spectrum of one rotary pair. Look for: RoPE's single clean line at the red mark; FoPE's same "
                 "line plus small leakage\nlines at other kept frequencies (and mirrored ones); extra lines in the "
                 "score are harmonics (sums/differences of frequencies).\n"
                 "Lines about 1e-6 below the peak are float32 rounding of the phases t*w, in any model", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_logits(results, labels, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(max(10, 5 * len(results)), 4.2), squeeze=False,
                             layout="constrained")
    for ax, result, label in zip(axes[0], results, labels):
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
    fig.suptitle("Attention logit of real (q, k) vs distance. Look for: the same band past train_len (periodic "
                 "extension) or drift\nand new extremes (breakdown); ALiBi falls linearly, NoPE is flat by "
                 "construction", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_coefficients(results, labels, path):
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
    fig.suptitle("FoPE coefficients, head 0 (frozen). Look for: the diagonal\n(identity, or step-eye when K > M) = "
                 "each pair's own frequency;\nthe speckle = small Fourier-series weights on the other frequencies\n"
                 "(symmetric log colours: small weights look large)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# command line


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", nargs="+", required=True, help="one or more checkpoints")
    parser.add_argument("--layer", type=int, default=0, help="layer for the spectrum and logit analyses")
    parser.add_argument("--head", type=int, default=0, help="head for the spectrum analysis")
    parser.add_argument("--pair", type=int, help="rotary pair (default: intended period closest to train_len/4)")
    parser.add_argument("--text_tokens", type=int, help="validation tokens for q/k statistics (default 4 x train_len)")
    parser.add_argument("--max_distance", type=int, help="largest distance for the logits (default 16 x train_len)")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--device", default="auto", help="auto: cuda if PyTorch sees a GPU, else cpu")
    parser.add_argument("--out_dir", default="out/analysis")
    args = parser.parse_args(argv)
    for name in ("text_tokens", "max_distance"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name} must be a positive integer, got {value}")
    return args


def write_outputs(results, out_dir):
    """The JSON (written atomically) and the figures, all into out_dir."""
    labels = runs.label_runs(results)
    try:
        text = json.dumps({"checkpoints": results}, allow_nan=False)
    except ValueError:  # a bare NaN is not JSON
        fail("an analysis gave a number that is not finite, so nothing is written")
    data.write_atomically(Path(out_dir) / "analysis.json", text.encode())
    plot_pair_norms(results, labels, os.path.join(out_dir, "pair_norms.png"))
    plot_spectra(results, labels, os.path.join(out_dir, "spectrum.png"))
    plot_logits(results, labels, os.path.join(out_dir, "logit_vs_distance.png"))
    coefficients = os.path.join(out_dir, "fope_coefficients.png")
    if any(r["fope_coefficients"] is not None for r in results):
        plot_coefficients(results, labels, coefficients)
    elif os.path.exists(coefficients):
        os.remove(coefficients)  # from an earlier run: it would not match analysis.json


def main(argv=None):
    """Analyse every checkpoint; the project's own errors and I/O errors (a full disk, a folder
    that cannot be written) end in one line on stderr and a non-zero exit."""
    try:
        analyze_all(parse_args(argv))
    except (CheckpointError, data.DataError, OSError) as error:
        fail(data.error_line(error))


def analyze_all(args):
    """Check every checkpoint, its data and the output folder, then analyse and write."""
    # every check first, so that bad input never overwrites earlier results nor costs the work
    try:
        args.device = hardware.resolve_device(args.device)
    except hardware.HardwareError as e:
        fail(str(e))
    loaded = []
    for path in args.ckpt:
        state, model = runs.load_model(path, args.device)
        message = check_indices(model, args.layer, args.head, args.pair)
        if message:
            fail(f"{path}: {message}")
        loaded.append((path, state, model, runs.load_validation(path, state, args.data_dir)))
    data.check_writable_folder(args.out_dir)

    results = []
    for path, state, model, tokens in loaded:
        train_len = model.config.train_len
        pair = default_pair(model, args.layer) if args.pair is None else args.pair
        result = {"path": path, "run": runs.run_of(path),
                  "pe": model.config.pe, "train_len": train_len, "step": state["step"],
                  "model_config": state["model_config"], "layer": args.layer, "head": args.head, "pair": pair}
        result["text_tokens"] = args.text_tokens or 4 * train_len
        result["max_distance"] = args.max_distance or 16 * train_len
        result.update(analyze(model, tokens, args.layer, args.head, pair,
                              result["text_tokens"], result["max_distance"]))
        results.append(result)
        print(f"{path} [{model.config.pe}]: analysed layer {args.layer}, head {args.head}, pair {pair}", flush=True)
    write_outputs(results, args.out_dir)
    print(f"wrote {args.out_dir}/analysis.json and figures")


if __name__ == "__main__":
    main()
