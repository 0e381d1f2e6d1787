"""Independent NumPy (float64) reference for the fope-gpt model.

Follows the authors' released code (olmo/model.py of TsinghuaC3I/Fourier-Position-Embedding) and
the choices listed in FAITHFULNESS.md; the test suite uses it as an independent check of the
PyTorch model. Everything here is float64 and works on plain dicts of arrays: `params`
maps state-dict names to arrays, `cfg` holds the model settings (vocab_size, n_layer, n_head,
n_embd, train_len, pe ∈ {rope, fope, cope, alibi, nope}, rope_theta, fope_sigma, fope_fs, fope_cf,
fope_sin_pad, fope_learnable; and, defaulted when absent: cope_taper "cosine" | "step",
fope_cap True, fope_shared False, qk_norm False).

The deployed FoPE (Intern-S1-Pro: InternLM/xtuner xtuner/v1/module/rope/rope.py, FourierEmbedding,
and vLLM vllm/model_executor/layers/rotary_embedding/fope.py) is pe="fope" with fope_shared=True,
fope_cap=False, fope_sin_pad=0.0, fope_sigma=0.5 and qk_norm=True.

Shape letters: B batch, T sequence length, C model width, H heads, d head_dim, V vocabulary,
K kept frequencies, M FoPE output pairs.
"""

import math

import numpy as np


# ---------------------------------------------------------------------------------------------
# Frequencies and FoPE coefficients (the authors' RotaryEmbedding.get_inv_freq, FourierEmbedding)
# ---------------------------------------------------------------------------------------------

def kept_frequencies(head_dim, train_len, theta=10000.0, clip=True):
    """Rotary frequencies ω_j = θ^(−2j/d), j = 0 … d/2−1, fastest first.

    With `clip` (CF), every ω_j < 2π/train_len (strict) is dropped, not kept as zero, so the result
    holds the K frequencies whose period is at most train_len, in their original order.
    """
    j = np.arange(head_dim // 2, dtype=np.float64)
    freqs = theta ** (-2.0 * j / head_dim)  # (d/2,)
    if clip:
        floor = 2.0 * math.pi / train_len
        freqs = freqs[~(freqs < floor)]  # (K,)
    return freqs


def cope_taper(n, kind="cosine"):
    """Multipliers (n,) for the n lowest frequencies, fastest of the band first.

    "cosine" is CoPE's raised cosine 0.5·(1 + cos(s)), s = linspace(0, π, n): ×1 at the band's
    fastest frequency down to ×0 at its slowest (hrlics/CoPE modeling_cope.py,
    LlamaRotaryEmbedding.__init__, lines 107-116, `use_cope`). "step" is CoPE's HardClip baseline,
    every band frequency ×0 (same file, lines 118-125, `use_hardclip`).
    """
    if kind == "cosine":
        return 0.5 * (1.0 + np.cos(np.linspace(0.0, math.pi, n, dtype=np.float64)))  # (n,)
    if kind == "step":
        return np.zeros(n, dtype=np.float64)  # (n,)
    raise ValueError(f"unknown cope_taper {kind!r}")


def cope_frequencies(head_dim, train_len, theta=10000.0, taper="cosine"):
    """CoPE's soft-clipped RoPE frequencies, all d/2 of them, fastest first, shape (d/2,).

    The tapered band is the n = d/2 − K frequencies that FoPE's floor would drop at train_len
    (ω < 2π/train_len, strict, as in kept_frequencies), so CoPE and FoPE clip the same band;
    CoPE's own code fixes n = clip_low_n = 20 instead (modeling_cope.py line 109). With n = 0 the
    result is plain RoPE's frequencies.
    """
    freqs = kept_frequencies(head_dim, train_len, theta, clip=False)  # (d/2,)
    n_kept = len(kept_frequencies(head_dim, train_len, theta, clip=True))  # K
    freqs[n_kept:] = freqs[n_kept:] * cope_taper(head_dim // 2 - n_kept, taper)  # band (n,)
    return freqs


def output_pairs(K, head_dim, cap=True):
    """Number M of FoPE output pairs: min(K, head_dim // 4) with the cap, otherwise K."""
    return min(K, head_dim // 4) if cap else K


def step_eye(K, M):
    """Deterministic base of the coefficients, a (K, M) array.

    With s = ceil(K/M), E[r·s, r] = 1 for every r < M with r·s < K. When K == M, s = 1 and this is
    the identity.
    """
    eye = np.zeros((K, M), dtype=np.float64)  # (K, M)
    step = math.ceil(K / M)
    for r in range(M):
        if r * step < K:
            eye[r * step, r] = 1.0
    return eye


def xavier_gain_std(sigma, n_head, K, M):
    """Standard deviation of xavier_normal_(gain=σ) on an (H, K, M) tensor.

    PyTorch takes fan_in = K·M and fan_out = H·M for a 3-D tensor, so std = σ·sqrt(2/(K·M + H·M)).
    """
    return sigma * math.sqrt(2.0 / (K * M + n_head * M))


def fope_coefficients(K, M, n_head, noise=None):
    """Coefficient tensor (H, K, M): step-eye over every head plus `noise` (zero if None)."""
    base = np.broadcast_to(step_eye(K, M), (n_head, K, M))  # (H, K, M)
    if noise is None:
        noise = np.zeros((n_head, K, M), dtype=np.float64)
    return base + np.asarray(noise, dtype=np.float64)  # (H, K, M)


# ---------------------------------------------------------------------------------------------
# Position tables and the half-split rotation (the authors' FourierEmbedding and RotaryEmbedding)
# ---------------------------------------------------------------------------------------------

def rope_tables(T, freqs):
    """RoPE tables cos(t·ω) and sin(t·ω) for t = 0 … T−1, each (T, len(freqs))."""
    t = np.arange(T, dtype=np.float64)
    phase = np.outer(t, freqs)  # (T, d/2)
    return np.cos(phase), np.sin(phase)


def fope_tables(T, freqs, sin_coef, cos_coef, head_dim, sin_pad=1.0):
    """FoPE tables (cos, sin), each (H, T, d/2).

    Phases t·ω_k over the K kept frequencies are mixed per head by the coefficients
    (cos table with cos_coef, sin table with sin_coef), then the M mixed columns are padded to d/2
    with cos = 1 and sin = sin_pad (the position-free pairs at the slow end).
    """
    t = np.arange(T, dtype=np.float64)
    phase = np.outer(t, freqs)  # (T, K)
    cos_mix = np.cos(phase) @ cos_coef  # (T, K) @ (H, K, M) -> (H, T, M)
    sin_mix = np.sin(phase) @ sin_coef  # (H, T, M)
    n_head, _, n_mixed = cos_mix.shape
    n_pad = head_dim // 2 - n_mixed
    cos_pad = np.ones((n_head, T, n_pad), dtype=np.float64)  # (H, T, P)
    sin_pad_cols = np.full((n_head, T, n_pad), sin_pad, dtype=np.float64)  # (H, T, P)
    cos = np.concatenate([cos_mix, cos_pad], axis=-1)  # (H, T, d/2)
    sin = np.concatenate([sin_mix, sin_pad_cols], axis=-1)  # (H, T, d/2)
    return cos, sin


def rotate(x, cos, sin):
    """NeoX half-split rotation of x (..., T, d) by tables broadcastable to (..., T, d/2).

    Pair j is channels (j, j + d/2): a' = a·cos − b·sin, b' = b·cos + a·sin.
    """
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]  # (..., T, d/2) each
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)  # (..., T, d)


# ---------------------------------------------------------------------------------------------
# ALiBi (the authors' alibi_attention_bias: slopes 2^(-8h/H) for any H)
# ---------------------------------------------------------------------------------------------

def alibi_slopes(n_head):
    """ALiBi slopes m_h = 2^(−8h/H) for h = 1 … H, shape (H,)."""
    h = np.arange(1, n_head + 1, dtype=np.float64)
    return 2.0 ** (-8.0 * h / n_head)


def alibi_bias(n_head, T):
    """ALiBi logit bias −|i − j|·m_h, shape (H, T, T) (query i, key j)."""
    pos = np.arange(T, dtype=np.float64)
    distance = np.abs(pos[:, None] - pos[None, :])  # (T, T)
    return -distance[None, :, :] * alibi_slopes(n_head)[:, None, None]  # (H, T, T)


# ---------------------------------------------------------------------------------------------
# Attention, normalisation and the model
# ---------------------------------------------------------------------------------------------

def causal_attention(q, k, v, bias=None):
    """Causal scaled dot-product attention; q, k, v (B, H, T, d), optional bias (H, T, T).

    Query position i attends to key positions j ≤ i. Returns (B, H, T, d).
    """
    T, d = q.shape[-2], q.shape[-1]
    scores = (q @ np.swapaxes(k, -1, -2)) / math.sqrt(d)  # (B, H, T, T)
    if bias is not None:
        scores = scores + bias
    future = np.triu(np.ones((T, T), dtype=bool), k=1)  # (T, T), True where j > i
    scores = np.where(future, -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights = weights / weights.sum(axis=-1, keepdims=True)  # (B, H, T, T)
    return weights @ v  # (B, H, T, d)


def rms_norm(x, weight, eps=1e-6):
    """RMSNorm over the last axis: x / sqrt(mean(x²) + eps) · weight."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def qk_rms_norm(x, weight, eps=1e-6):
    """QK-norm: RMSNorm of every head's q or k (x (..., d)) over head_dim, times weight (d,).

    One weight of shape (head_dim,) is shared by all heads, as in Qwen3-style q_norm/k_norm
    (InternLM/xtuner xtuner/v1/module/attention/mha.py lines 186-188 build RMSNorm(head_dim);
    lines 220-222 apply it to q and k, not v, before apply_rotary_emb at 224-225). Any other
    weight shape is refused, so a per-head or per-channel weight in the model is caught.
    """
    weight = np.asarray(weight, dtype=np.float64)
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"qk-norm weight has shape {weight.shape}, expected {(x.shape[-1],)}")
    return rms_norm(x, weight, eps)


def silu(x):
    """SiLU x·sigmoid(x), with the sigmoid written via tanh to avoid overflow."""
    return x * 0.5 * (1.0 + np.tanh(0.5 * x))


def fope_layer_coefficients(params, cfg, layer, K, M):
    """The (sin_coef, cos_coef) pair, each (H, K, M), used by one layer under pe='fope'.

    With FS on they are the frozen tensors from `params`; with FS off they are the identity
    (M = K, no noise) and `params` is not consulted. With fope_shared (the deployed variant, whose
    sin_coef/cos_coef live in one FourierEmbedding built once per model: InternLM/xtuner
    xtuner/v1/module/rope/rope.py FourierEmbedding.__init__ lines 405-456, the model's single
    rotary_emb in xtuner/v1/model/moe/moe.py line 246) layer 0's tensors serve every layer, and a
    ValueError is raised if this layer's saved copies differ from them (the model failed to share).
    """
    n_head = cfg["n_head"]
    if not cfg["fope_fs"]:
        identity = fope_coefficients(K, M, n_head)  # (H, K, K)
        return identity, identity
    source = 0 if cfg.get("fope_shared", False) else layer
    coefs = []
    for name in ("sin_coef", "cos_coef"):
        key = f"blocks.{source}.attn.pos.{name}"
        coef = np.asarray(params[key], dtype=np.float64)  # (H, K, M)
        if coef.shape != (n_head, K, M):
            raise ValueError(f"{key} has shape {coef.shape}, expected {(n_head, K, M)}")
        own = f"blocks.{layer}.attn.pos.{name}"
        if source != layer and not np.array_equal(np.asarray(params[own], dtype=np.float64), coef):
            raise ValueError(f"fope_shared: blocks.{layer}.attn.pos.{name} differs from layer 0's")
        coefs.append(coef)
    return coefs[0], coefs[1]


def position_tables(params, cfg, layer, T):
    """Rotation tables (cos, sin) for one layer, or None when pe does not rotate q and k.

    'rope': (T, d/2) over all d/2 frequencies. 'cope': (T, d/2) over cope_frequencies, the band
    below 2π/train_len tapered by cope_taper. 'fope': (H, T, d/2); frequencies are clipped iff
    fope_cf, and M = min(K, d//4) only when fope_cap (default True), fope_fs and fope_cf are all on
    (see FAITHFULNESS.md); the deployed variant has no cap, M = K (vllm-project/vllm
    vllm/model_executor/layers/rotary_embedding/fope.py at 151a2c74,
    FourierRotaryEmbedding.__init__: output_dim = input_dim; xtuner rope.py lines 428-429 likewise).
    """
    head_dim = cfg["n_embd"] // cfg["n_head"]
    theta = cfg["rope_theta"]
    if cfg["pe"] == "rope":
        return rope_tables(T, kept_frequencies(head_dim, cfg["train_len"], theta, clip=False))
    if cfg["pe"] == "cope":
        taper = cfg.get("cope_taper", "cosine")
        return rope_tables(T, cope_frequencies(head_dim, cfg["train_len"], theta, taper))
    if cfg["pe"] == "fope":
        freqs = kept_frequencies(head_dim, cfg["train_len"], theta, clip=cfg["fope_cf"])  # (K,)
        K = len(freqs)
        cap = cfg.get("fope_cap", True) and cfg["fope_fs"] and cfg["fope_cf"]
        M = output_pairs(K, head_dim, cap=cap)
        sin_coef, cos_coef = fope_layer_coefficients(params, cfg, layer, K, M)
        return fope_tables(T, freqs, sin_coef, cos_coef, head_dim, cfg["fope_sin_pad"])
    return None


def attention(params, cfg, layer, x):
    """Multi-head causal self-attention of one block on normalised input x (B, T, C).

    With qk_norm, q and k of every head are RMS-normalised (qk_rms_norm) before the position step.
    """
    B, T, C = x.shape
    n_head = cfg["n_head"]
    head_dim = C // n_head
    prefix = f"blocks.{layer}.attn."
    qkv = x @ params[prefix + "qkv.weight"].T  # (B, T, 3C)
    q, k, v = np.split(qkv, 3, axis=-1)  # (B, T, C) each
    q, k, v = (a.reshape(B, T, n_head, head_dim).transpose(0, 2, 1, 3) for a in (q, k, v))
    # q, k, v: (B, H, T, d), head h taken from channels h·d:(h+1)·d
    if cfg.get("qk_norm", False):  # before the rotation or the ALiBi bias; v untouched
        q = qk_rms_norm(q, params[prefix + "q_norm.weight"])  # (B, H, T, d)
        k = qk_rms_norm(k, params[prefix + "k_norm.weight"])  # (B, H, T, d)

    tables = position_tables(params, cfg, layer, T)
    if tables is not None:
        cos, sin = tables
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    bias = alibi_bias(n_head, T) if cfg["pe"] == "alibi" else None  # (H, T, T)

    y = causal_attention(q, k, v, bias)  # (B, H, T, d)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, C), heads concatenated in order
    return y @ params[prefix + "proj.weight"].T  # (B, T, C)


def mlp(params, layer, x):
    """SwiGLU MLP of one block: up to 8C, silu(gate)·value with value first, down to C."""
    prefix = f"blocks.{layer}.mlp."
    up = x @ params[prefix + "up.weight"].T  # (B, T, 8C)
    value, gate = np.split(up, 2, axis=-1)  # (B, T, 4C) each
    return (silu(gate) * value) @ params[prefix + "down.weight"].T  # (B, T, C)


def forward(params, cfg, idx):
    """Full forward pass: token ids idx (B, T) -> logits (B, T, V).

    Pre-norm blocks x += attn(rms_norm(x)); x += mlp(rms_norm(x)), then a final RMSNorm and the
    untied output head. There is no position-embedding table and no maximum length.
    """
    if cfg["pe"] not in ("rope", "fope", "cope", "alibi", "nope"):
        raise ValueError(f"unknown pe {cfg['pe']!r}")
    params = {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}
    x = params["tok_emb.weight"][np.asarray(idx)]  # (B, T, C)
    for layer in range(cfg["n_layer"]):
        prefix = f"blocks.{layer}."
        x = x + attention(params, cfg, layer, rms_norm(x, params[prefix + "attn_norm.weight"]))
        x = x + mlp(params, layer, rms_norm(x, params[prefix + "mlp_norm.weight"]))
    x = rms_norm(x, params["final_norm.weight"])  # (B, T, C)
    return x @ params["lm_head.weight"].T  # (B, T, V)
