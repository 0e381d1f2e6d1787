"""
spectra.py: the analyses behind analyze.py's figures, on one model: which frequency each rotary
pair carries, how much the model uses each pair, the spectrum of a rotated query pair and of
its q.k score, the attention logit against relative distance, and FoPE's coefficients.

q and k come from real text, run through the model in windows of train_len tokens (the
positions it was trained on), captured before the rotation; the rotation to other positions,
and the logits, are then the layer's own (its position embedding's rotate, its attention's
logits). Every function returns plain arrays.
"""

import math

import numpy as np
import torch

from fope_gpt import FoPE, Rotary, kept_frequencies

NUM_SPECTRUM_VECTORS = 16   # real q (and k) vectors averaged in each spectrum
NUM_LOGIT_SAMPLES = 256     # real (q, k) pairs per distance in the logit analysis


# -----------------------------------------------------------------------------
# which frequency each rotary pair carries


def rope_frequencies(config):
    """RoPE's omega_j = theta^(-2j/d) for every pair j, (d/2,): the reference for every position
    embedding (for ALiBi and NoPE it is what RoPE would have used)."""
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
    if isinstance(pos, FoPE):
        index = intended_index(pos, pair)
        return None if index is None else float(pos.freqs[index])
    return float((pos.freqs if isinstance(pos, Rotary) else rope_frequencies(model.config))[pair])


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

    Returns q, k, each (n_layer, H, B*T, d): each layer's input, captured on the way through,
    projected by the layer itself (CausalSelfAttention.project), i.e. exactly what its position
    embedding acts on next.
    """
    inputs = []
    hooks = [block.attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
             for block in model.blocks]
    try:
        model(windows.to(next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    projected = [block.attn.project(x)[:2] for block, x in zip(model.blocks, inputs)]  # (B, H, T, d) each
    return tuple(torch.stack([pair[i].float().transpose(0, 1).flatten(1, 2) for pair in projected])
                 for i in (0, 1))


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


def rotate_to(attn, x, head, positions):
    """Vectors x (S, d) of one head, rotated by the layer's position embedding to every position
    (P,): (S, P, d). (FoPE's rotation differs by head, so x stands in every head and one is kept.)"""
    S, d = x.shape
    every_head = x.float()[:, None, None, :].expand(S, attn.n_head, len(positions), d)  # (S, H, P, d)
    return attn.pos.rotate(every_head, positions)[:, head]


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


def query_spectrum(attn, q, head, pair, length):
    """DFT over positions 0..length-1 of a rotated query pair, read as a + ib.

    q (S, d): real (pre-rotation) queries of `head`. Under RoPE the pair is (a + ib) e^{i w t},
    a single line at w / 2pi cycles per token; FoPE's Fourier series adds small lines at the
    other kept frequencies, and unequal sin/cos weights add mirror lines at negative ones.
    Returns (frequencies (length,), mean magnitude (length,)), two-sided.
    """
    rotated = rotate_to(attn, q, head, torch.arange(length, device=q.device))         # (S, N, d)
    half = q.shape[-1] // 2
    signal = torch.complex(rotated[..., pair], rotated[..., pair + half])  # (S, N)
    return magnitude_spectrum(signal, onesided=False)


def score_spectrum(attn, q, k, head, pair, length):
    """DFT over relative distance of the pair's share of the q.k score.

    The query sits at position length-1, the key at length-1-delta for delta = 0..length-1;
    q, k (S, d) are real vectors of `head`. RoPE gives one line at w / 2pi; products of
    FoPE's mixed tables add lines at sums and differences of kept frequencies.
    Returns (frequencies (length//2 + 1,), mean magnitude), one-sided (the score is real).
    """
    last = length - 1
    half = q.shape[-1] // 2
    positions = last - torch.arange(length, device=q.device)        # delta = 0..N-1
    q_rot = rotate_to(attn, q, head, positions[:1])[:, 0]           # (S, d)
    k_rot = rotate_to(attn, k, head, positions)                     # (S, N, d)
    channels = [pair, pair + half]
    score = (q_rot[:, None, channels] * k_rot[..., channels]).sum(-1)  # (S, N)
    return magnitude_spectrum(score, onesided=True)


def spectrum_analysis(model, q, k, layer, head, pair, rng):
    """Both spectra for one layer/head/pair over 8 x train_len positions; None without rotation."""
    attn = model.blocks[layer].attn
    if not isinstance(attn.pos, Rotary):
        return None
    length = 8 * model.config.train_len
    picks = torch.from_numpy(rng.choice(q.shape[2], size=min(NUM_SPECTRUM_VECTORS, q.shape[2]), replace=False))
    q_h, k_h = q[layer, head, picks], k[layer, head, picks]         # (S, d)
    freqs, query = query_spectrum(attn, q_h, head, pair, length)
    score_freqs, score = score_spectrum(attn, q_h, k_h, head, pair, length)
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
    as when a late query looks back at early text. The logits are the layer's own
    (CausalSelfAttention.logits): a rotary model's rotation, ALiBi's bias -slope_h * delta, and
    for NoPE nothing, so its logits cannot depend on delta.
    Returns logits (len(distances), H, samples), scaled by 1/sqrt(d) as in the attention.
    """
    N = q.shape[1]
    qs = q[:, torch.from_numpy(rng.integers(N, size=samples))]        # (H, S, d)
    ks = k[:, torch.from_numpy(rng.integers(N, size=samples))]
    key_pos = torch.from_numpy(rng.integers(train_len, size=samples)).to(q.device)  # (S,)
    # the layer's logits of every query against every key; sample i's pair is the diagonal
    logits = [attn.logits(qs, ks, key_pos + int(delta), key_pos).diagonal(dim1=-2, dim2=-1) for delta in distances]
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
    if not isinstance(model.blocks[0].attn.pos, FoPE):
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
