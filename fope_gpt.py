"""
fope_gpt.py: the whole model, one position-embedding switch.

A small GPT in the shape of the FoPE paper's models (the OLMo block: pre-RMSNorm, SwiGLU,
no biases, untied embeddings) with five ways to tell tokens where they are:

    rope   rotary position embedding: each q/k channel pair rotates at one frequency
    fope   Fourier position embedding (Hua et al., arXiv 2412.17739): RoPE's rotation, but
           (FS) each pair is driven by a Fourier series over all kept frequencies, and
           (CF) frequencies too slow to complete a period within the training length are
           clipped to zero, i.e. those pairs carry no position at all
    cope   RoPE with CoPE's soft clip (arXiv 2602.05258): the band FoPE clips is tapered to zero
    alibi  a linear distance penalty added to the attention logits
    nope   no position signal; causal masking alone

A position embedding gives attention q and k rotated to their positions (`rotate`) and an
additive bias on the logits (`bias`), nothing else; adding one is one class here. The file reads
as the data flows: config -> position embeddings -> attention -> block -> model -> generation.
FoPE follows the authors' released code; every deviation is marked "Deviation:" in a comment.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

POSITION_EMBEDDINGS = ("rope", "fope", "cope", "alibi", "nope")
ROPE_SCALINGS = ("none", "pi", "ntk", "yarn")  # context extension of rotary frequencies
COPE_TAPERS = ("cosine", "step")  # CoPE's raised cosine, or its HardClip baseline
# FoPE as Intern-S1-Pro trains and serves it (InternLM/xtuner xtuner/v1/module/rope/rope.py,
# FourierEmbedding; vLLM vllm/model_executor/layers/rotary_embedding/fope.py): one coefficient set
# for the whole model, no head_dim/4 cap, padded pairs an exact identity, Xavier gain 0.5, and
# QK-RMSNorm before the rotation (xtuner xtuner/v1/module/attention/mha.py).
FOPE_DEPLOYED = dict(fope_shared=True, fope_cap=False, fope_sin_pad=0.0, fope_sigma=0.5, qk_norm=True)

# -----------------------------------------------------------------------------
# config


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    train_len: int = 256          # L, the training context length; FoPE's floor is 2*pi/L
    pe: str = "fope"              # one of POSITION_EMBEDDINGS
    rope_theta: float = 10000.0
    fope_sigma: float = 0.3       # Xavier *gain* of the coefficient noise (not its std)
    fope_fs: bool = True          # FS: Fourier series (identity-dominated mixing of frequencies)
    fope_cf: bool = True          # CF: clip frequencies below 2*pi/L to zero
    fope_sin_pad: float = 1.0     # sin value of the padded pairs: 1 as released, 0 = exact identity
    fope_learnable: bool = False  # the released code freezes the coefficients
    fope_cap: bool = True         # at most head_dim/4 position-carrying pairs, as released
    fope_shared: bool = False     # one coefficient set for every layer (deployed) instead of one per layer
    cope_taper: str = "cosine"    # CoPE's band: raised cosine to zero, or "step" (its HardClip)
    qk_norm: bool = False         # RMSNorm of each head's q and k before the position embedding
    rope_scaling: str = "none"    # context extension of rope/fope frequencies: one of ROPE_SCALINGS
    rope_scale: float = 1.0       # s, the factor by which the context is meant to grow
    rope_original_len: int = 0    # YaRN's L0, the length the frequencies were trained at (0: train_len)
    init: str = "olmo"            # weights: "olmo" truncated N(0, 0.02) as the authors; "pytorch" its defaults

    def __post_init__(self):
        def require(ok, field, what):
            if not ok:
                raise ValueError(f"GPTConfig.{field} must be {what}, got {getattr(self, field)!r}")
        for name, allowed in (("pe", POSITION_EMBEDDINGS), ("rope_scaling", ROPE_SCALINGS),
                              ("cope_taper", COPE_TAPERS), ("init", ("olmo", "pytorch"))):
            require(getattr(self, name) in allowed, name, "one of " + ", ".join(allowed))
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "train_len"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "a positive integer")
        require(self.n_embd % self.n_head == 0, "n_embd", f"divisible by n_head ({self.n_head})")
        require(self.head_dim % 2 == 0, "n_embd", f"such that head_dim = n_embd / n_head ({self.head_dim}) is even")
        require(self.rope_theta > 1, "rope_theta", "greater than 1")
        require(self.fope_sigma >= 0, "fope_sigma", "non-negative")
        require(self.rope_scale >= 1, "rope_scale", "at least 1")
        require(isinstance(self.rope_original_len, int) and self.rope_original_len >= 0, "rope_original_len",
                "a non-negative integer")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


# -----------------------------------------------------------------------------
# position embeddings


def kept_frequencies(head_dim, train_len, theta=10000.0, clip=True):
    """RoPE's frequencies theta^(-2j/d), fastest first; with `clip`, those below 2*pi/L removed.

    A frequency below 2*pi/L has a period longer than the training length: during training
    its pair never completes a cycle, sees only part of its phase range, and stays
    under-trained. Past L it produces phases the model has never seen. FoPE's clip floor
    replaces it by frequency zero, which the authors' code then drops from the inputs
    of the Fourier series (the pair becomes constant padding, see FoPE below).
    """
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (d/2,)
    if clip:
        freqs = freqs[~(freqs < 2 * math.pi / train_len)]
    return freqs


def extend_context(freqs, config):
    """Frequencies (all head_dim/2 of them, fastest first) after context extension by s.

    pi    position interpolation: every frequency / s, so s*L positions span the trained phases
    ntk   "NTK-aware": theta grows to theta * s^(d/(d-2)); fast pairs barely move, the slowest / s
    yarn  as the authors' code applies it (RotaryEmbedding.extra_yarn): pairs completing more than 32 periods
          within L0 stay, pairs completing less than one are divided by s, a linear ramp between;
          no attention temperature (the reference YaRN has one, the authors' code does not)
    """
    s, d = config.rope_scale, config.head_dim
    j = torch.arange(len(freqs), dtype=torch.float32)
    if config.rope_scaling == "pi":
        return freqs / s
    if config.rope_scaling == "ntk":
        return freqs * s ** (-2 * j / (d - 2))
    if config.rope_scaling == "yarn":
        original_len = config.rope_original_len or config.train_len

        def pair_completing(periods):  # the fractional pair index that completes `periods` in L0
            return d * math.log(original_len / (2 * math.pi * periods)) / (2 * math.log(config.rope_theta))
        lo, hi = max(math.floor(pair_completing(32)), 0), min(math.ceil(pair_completing(1)), d - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = ((j - lo) / (hi - lo)).clamp(0, 1)
        return freqs * (1 - ramp) + freqs / s * ramp
    return freqs


def step_eye(num_kept, num_pairs):
    """The deterministic part of FoPE's coefficients: identity, or a step-eye when K > M.

    With K inputs and M < K outputs the authors place output r on input r * ceil(K/M), so
    the fastest frequencies 0, 2, 4, ... stay dominant and the rest enter through the noise.
    """
    eye = torch.zeros(num_kept, num_pairs)
    step = math.ceil(num_kept / num_pairs)
    for r in range(num_pairs):
        if r * step < num_kept:
            eye[r * step, r] = 1.0
    return eye


def apply_rotary(x, cos, sin):
    """NeoX half-split rotation: pair j is channels (j, j + d/2). Done in float32.

    x: (..., T, d); cos, sin: broadcastable to (..., T, d/2).
    """
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).type_as(x)


def as_positions(positions, device):
    """A slice of positions (what attention passes) or a LongTensor of them, as a LongTensor."""
    if isinstance(positions, slice):
        return torch.arange(positions.start, positions.stop, device=device)
    return positions.to(device)


class PositionEmbedding(nn.Module):
    """What attention asks of a position embedding, and all it asks: q and k rotated to their
    positions, and a bias added to the logits. This base does neither.

    `positions` are absolute token positions, a slice (what attention passes) or a LongTensor
    (an analysis may put each vector at its own position)."""

    per_layer = False  # one module serves every layer unless it holds per-layer weights

    def rotate(self, x, positions):
        """q or k (..., H, T, d) at `positions` (T of them), as attention should see it."""
        return x

    def bias(self, q_positions, k_positions):
        """Added to the logits of queries at q_positions over keys at k_positions: (H, Tq, Tk), or None.
        The model is causal: a key after its query must get -inf (attention adds no mask to a bias)."""
        return None


class NoPE(PositionEmbedding):
    """No position signal: each token knows only which tokens it can see (the causal mask)."""

    def __init__(self, config):
        super().__init__()


class Rotary(PositionEmbedding):
    """A rotation of each (j, j + d/2) pair of q and k by a table of (cos, sin) over positions.

    The base builds RoPE's table from `freqs` (pair j turns by t * freqs[j] at position t);
    FoPE replaces `tables`. Tables are float32, built once, grown on demand, and sliced.
    """

    def __init__(self, freqs):
        super().__init__()
        self.register_buffer("freqs", freqs, persistent=False)
        self.register_buffer("cos_table", None, persistent=False)
        self.register_buffer("sin_table", None, persistent=False)

    def tables(self, T):
        """float32 (cos, sin) for positions 0..T-1, each (T, d/2)."""
        t = torch.arange(T, dtype=torch.float32, device=self.freqs.device)
        with torch.autocast(device_type=t.device.type, enabled=False):  # bf16 would round the phases
            phase = torch.outer(t, self.freqs)
        return phase.cos(), phase.sin()

    @torch.no_grad()
    def cos_sin(self, T):
        """The cached tables for positions 0..T-1 (..., T, d/2), grown (doubling) when T exceeds them."""
        cached = 0 if self.cos_table is None else self.cos_table.shape[-2]
        if T > cached:
            self.cos_table, self.sin_table = self.tables(max(T, 2 * cached))
        return self.cos_table[..., :T, :], self.sin_table[..., :T, :]

    def rotate(self, x, positions):
        end = positions.stop if isinstance(positions, slice) else int(positions.max()) + 1
        cos, sin = self.cos_sin(end)
        return apply_rotary(x, cos[..., positions, :], sin[..., positions, :])


class RoPE(Rotary):
    """Rotary position embedding: pair j of q and k rotates by angle t * omega_j at position t.

    Then q_m . k_n depends on positions only through m - n: the logit is a sum of sinusoids
    in the relative distance, one per frequency, and extrapolation hopes they stay periodic.
    """

    def __init__(self, config):
        freqs = kept_frequencies(config.head_dim, config.train_len, config.rope_theta, clip=False)
        super().__init__(extend_context(freqs, config))  # (d/2,)


class CoPE(Rotary):
    """RoPE with a soft clip (CoPE, arXiv 2602.05258; hrlics/CoPE modeling_cope.py,
    LlamaRotaryEmbedding.__init__, `use_cope`).

    CoPE argues that zeroing the slow frequencies at once, as FoPE's floor does, leaks spectrum:
    the attention scores ring far past the clip. It multiplies the n slowest frequencies by a
    raised cosine 0.5 (1 + cos(linspace(0, pi, n))), from 1 at the band's fastest to 0 at its
    slowest; its HardClip baseline (`cope_taper="step"`) zeroes the band, which is FoPE's clip
    without the Fourier series, with padded pairs an exact identity.
    Deviation: CoPE fixes n = 20 of 64 frequencies for a 64k context; here the band is the one
    FoPE's floor clips at train_len (the n = d/2 - K frequencies below 2*pi/L).
    """

    def __init__(self, config):
        freqs = extend_context(kept_frequencies(config.head_dim, config.train_len, config.rope_theta, clip=False), config)
        n = len(freqs) - len(kept_frequencies(config.head_dim, config.train_len, config.rope_theta))
        taper = torch.zeros(n) if config.cope_taper == "step" else 0.5 * (1 + torch.cos(torch.linspace(0, math.pi, n)))
        super().__init__(torch.cat((freqs[:len(freqs) - n], freqs[len(freqs) - n:] * taper)))  # (d/2,)


class FoPE(Rotary):
    """Fourier position embedding, as in the authors' code (one module per layer).

    Linear layers and activations outside attention mix channels, so in a trained model a
    rotary pair no longer carries one clean frequency (spectral leakage and harmonics) and
    RoPE's periodic extension breaks. FoPE models each pair as a Fourier series over all K
    kept frequencies: pair r of head h uses
        cos table  sum_k cos(t * omega_k) * cos_coef[h, k, r]
        sin table  sum_k sin(t * omega_k) * sin_coef[h, k, r]
    with coefficients that are identity (own frequency) plus small frozen Xavier noise.
    Only M = min(K, head_dim/4) pairs are position-dependent; the remaining pairs are
    padded with cos = 1 and sin = fope_sin_pad (zero frequency, constant phase).

    Ablations (not released by the authors; see FAITHFULNESS.md): fope_cf=False keeps all head_dim/2
    frequencies, fope_fs=False uses exact identity coefficients; either one off means M = K (no cap),
    so with both off this is RoPE exactly. fope_cap=False and fope_shared=True are the deployed
    variant's M = K and one coefficient set for all layers (FOPE_DEPLOYED).
    """

    def __init__(self, config):
        d, H = config.head_dim, config.n_head
        K = len(kept_frequencies(d, config.train_len, config.rope_theta, clip=config.fope_cf))
        M = min(K, d // 4) if (config.fope_cap and config.fope_fs and config.fope_cf) else K
        sigma = config.fope_sigma if config.fope_fs else 0.0
        # Clip first, then extend ("yarn_after" in the authors' configs): the kept frequencies
        # are a prefix of the descending list, so extension never brings back a clipped one.
        freqs = extend_context(kept_frequencies(d, config.train_len, config.rope_theta, clip=False), config)
        super().__init__(freqs[:K])  # (K,)
        self.sin_coef = nn.Parameter(self._init_coef(H, K, M, sigma), requires_grad=config.fope_learnable)
        self.cos_coef = nn.Parameter(self._init_coef(H, K, M, sigma), requires_grad=config.fope_learnable)
        self.half_dim, self.sin_pad, self.learnable = d // 2, config.fope_sin_pad, config.fope_learnable
        self.per_layer = not config.fope_shared

    @staticmethod
    def _init_coef(H, K, M, sigma):
        """eye_xavier_norm: step-eye plus N(0, std^2), std = sigma * sqrt(2 / (K*M + H*M))."""
        noise = nn.init.xavier_normal_(torch.empty(H, K, M), gain=sigma)  # fans of a 3-D tensor
        return step_eye(K, M) + noise  # (H, K, M)

    def tables(self, T):
        """float32 (cos, sin) for positions 0..T-1, each (H, T, d/2), padding included."""
        t = torch.arange(T, dtype=torch.float32, device=self.freqs.device)
        with torch.autocast(device_type=t.device.type, enabled=False):
            phase = torch.outer(t, self.freqs)                                     # (T, K)
            cos = torch.einsum("tk,hkm->htm", phase.cos(), self.cos_coef.float())  # (H, T, M)
            sin = torch.einsum("tk,hkm->htm", phase.sin(), self.sin_coef.float())
        pad = self.half_dim - cos.shape[-1]
        return F.pad(cos, (0, pad), value=1.0), F.pad(sin, (0, pad), value=self.sin_pad)  # (H, T, d/2)

    # The coefficients are frozen and positions always count from 0, so the mixed tables are
    # a fixed function of (head, t): Rotary builds them once and slices, exactly like RoPE's.
    # Deviation: the authors' code recomputes the two einsums on every forward.
    def cos_sin(self, T):
        if self.learnable:
            return self.tables(T)  # coefficients change every step: rebuild inside autograd
        return super().cos_sin(T)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.cos_table = self.sin_table = None  # new coefficients, new tables


class ALiBi(PositionEmbedding):
    """Attention with linear biases: logit(i, j) -= m_h * (i - j), slopes m_h = 2^(-8h/H).

    One module serves every layer, so the bias of a forward is built once and reused by the
    others (the last one asked is kept)."""

    def __init__(self, config):
        super().__init__()
        H = config.n_head
        slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=torch.float32) / H)
        self.register_buffer("slopes", slopes, persistent=False)  # (H,)
        self.last = (None, None)  # (what was asked, its bias)

    def bias(self, q_positions, k_positions):
        reusable = isinstance(q_positions, slice) and not torch.compiler.is_compiling()
        asked = (q_positions, k_positions, self.slopes.device) if reusable else None
        if asked is None or asked != self.last[0]:
            q, k = (as_positions(p, self.slopes.device) for p in (q_positions, k_positions))
            distance = (q[:, None] - k[None, :]).float()                                       # (Tq, Tk)
            distance = distance.masked_fill(distance < 0, float("inf"))                        # a later key: -inf
            self.last = (asked, -self.slopes[:, None, None] * distance)                         # (H, Tq, Tk)
        return self.last[1]


def position_embedding(config):
    return {"rope": RoPE, "fope": FoPE, "cope": CoPE, "alibi": ALiBi, "nope": NoPE}[config.pe](config)


# -----------------------------------------------------------------------------
# attention

# The most bias entries (heads x queries x keys) one attention call forms: past it the queries go in
# blocks, so a bias at 16x train_len never exists whole (ALiBi at 6144 tokens would take 600 MB).
BIAS_ELEMENTS = 2 ** 22


class KVCache:
    """Keys (already rotated: a key's rotation depends only on its own position, so this equals the
    authors' caching of raw keys) and values of one layer, for generation one token at a time."""

    def __init__(self):
        self.k = self.v = None

    def __len__(self):
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k, v):  # (B, H, T, d) each
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    """Causal self-attention; where tokens are comes only from `pos`, the position embedding."""

    def __init__(self, config, pos):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.pos = position_embedding(config) if pos is None else pos  # after the weights: same seed, same draws
        # QK-norm (the FoPE paper's Table 2; Intern-S1-Pro): each head's q and k RMS-normalised,
        # with one weight over head_dim, before the position embedding acts on them
        self.q_norm = RMSNorm(config.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(config.head_dim) if config.qk_norm else nn.Identity()

    def project(self, x):
        """x (B, T, C) -> q, k, v, each (B, H, T, d): q and k normed, not yet positioned."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x, cache=None):
        B, T, C = x.shape
        start = 0 if cache is None else len(cache)  # absolute position of x[:, 0]
        q, k, v = self.project(x)
        positions = slice(start, start + T)
        q, k = self.pos.rotate(q, positions), self.pos.rotate(k, positions)  # same positions, never v
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, start + T, d)
        y = self.attend(q, k, v, start)  # (B, H, T, d)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))

    def attend(self, q, k, v, start):
        """Causal attention of queries q (B, H, T, d) at positions start.. over keys and values
        (B, H, S, d) at positions 0..S-1, where S = start + T."""
        T, S, H = q.shape[2], k.shape[2], self.n_head
        fits = H * T * S <= BIAS_ELEMENTS
        rows = T if fits else max(1, BIAS_ELEMENTS // (H * S))
        bias = self.pos.bias(slice(start, start + rows), slice(0, S))  # (H, rows, S), or None
        if bias is None:
            if T == S or T == 1:  # the square causal mask, or one new query that sees every key
                return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=start)  # is_causal aligns top-left
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # A kernel given a bias cannot skip the keys after each query, so the queries go in blocks
        # that see only the keys up to their last one: less work, and a bias of bounded size.
        rows = max(64, T // 4) if fits else rows
        blocks = []
        for lo in range(0, T, rows):
            hi = min(T, lo + rows)
            end = start + hi  # the keys this block's queries may see
            block_bias = bias[:, lo:hi, :end] if fits or lo == 0 else self.pos.bias(slice(start + lo, end), slice(0, end))
            mask = block_bias.to(q.dtype).contiguous()[None]  # (1, H, hi - lo, end): 4-D and contiguous, SDPA's fast path
            blocks.append(F.scaled_dot_product_attention(q[:, :, lo:hi], k[:, :, :end], v[:, :, :end], attn_mask=mask))
        return torch.cat(blocks, dim=2)

    def logits(self, q, k, q_positions, k_positions):
        """The attention logits, as attend forms them, of projected queries q (..., H, Tq, d) at
        q_positions over keys k (..., H, Tk, d) at k_positions: (..., H, Tq, Tk) in float32, a key
        after its query at -inf. For analyses: SDPA never forms them."""
        q, k = self.pos.rotate(q, q_positions), self.pos.rotate(k, k_positions)
        logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
        bias = self.pos.bias(q_positions, k_positions)
        if bias is not None:
            logits = logits + bias
        q_at, k_at = as_positions(q_positions, q.device), as_positions(k_positions, q.device)
        return logits.masked_fill(k_at[None, :] > q_at[:, None], float("-inf"))  # a bias masks already; NoPE's cannot

    def weights(self, x, queries):
        """The attention weights (B, H, len(queries), T) of the tokens of x (B, T, C) at `queries`
        (a slice) over every token, as forward computes them."""
        q, k, _ = self.project(x)
        return torch.softmax(self.logits(q[:, :, queries], k, queries, slice(0, x.shape[1])), dim=-1)


# -----------------------------------------------------------------------------
# block


class RMSNorm(nn.Module):
    """Root-mean-square norm with a weight and no bias, computed in float32 (as in OLMo)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


class SwiGLU(nn.Module):
    """up: d -> 8d, split into value and gate halves, silu(gate) * value, down: 4d -> d."""

    def __init__(self, config):
        super().__init__()
        self.up = nn.Linear(config.n_embd, 8 * config.n_embd, bias=False)
        self.down = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        value, gate = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * value)


class Block(nn.Module):

    def __init__(self, config, pos=None):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, pos)
        self.mlp_norm = RMSNorm(config.n_embd)
        self.mlp = SwiGLU(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.attn_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))


# -----------------------------------------------------------------------------
# model


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        blocks = []
        for _ in range(config.n_layer):
            # one position embedding serves every layer, unless it holds per-layer weights (the released FoPE)
            shared = blocks[0].attn.pos if blocks and not blocks[0].attn.pos.per_layer else None
            blocks.append(Block(config, shared))
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied
        # Deviation (init="pytorch", off by default): PyTorch's own initialisation, embeddings
        # N(0, 1) and linear layers Kaiming-uniform; part of the passkey recipe that EXPERIMENTS.md
        # measures, for tiny models that must learn retrieval from a training mix, not web text.
        if config.init == "olmo":
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02, a=-0.06, b=0.06)

    def num_params(self, trainable=True):
        """Parameter count; FoPE's frozen coefficients count only with trainable=False."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable)

    def features(self, idx, caches=None):
        """idx (B, T) token ids -> final normed hidden states (B, T, C).
        `caches`: one KVCache per layer, filled as a side effect (for generation)."""
        x = self.tok_emb(idx)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.final_norm(x)

    def forward(self, idx, targets=None, caches=None):
        """idx (B, T) token ids -> logits (B, T, vocab_size) at every position, and the mean
        cross-entropy against `targets` (B, T) when given (target -1 = no loss there)."""
        logits = self.lm_head(self.features(idx, caches))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # -------------------------------------------------------------------------
    # generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, use_cache=True, generator=None):
        """Continue idx (B, T) by max_new_tokens; temperature 0 means greedy decoding, otherwise
        sampling from the softmax at that temperature, among the top_k tokens when given.

        With use_cache the prompt runs once and each new token attends to cached keys and
        values; without it the whole sequence is re-run for every token (the slow reference).
        """
        caches = [KVCache() for _ in self.blocks] if use_cache else None
        features = self.features(idx, caches)
        for step in range(max_new_tokens):
            last = self.lm_head(features[:, -1, :]).float()  # (B, V): only the last position is needed
            if temperature == 0.0:
                next_id = last.argmax(dim=-1, keepdim=True)
            else:
                if top_k is not None:
                    kth = torch.topk(last, min(top_k, last.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
                    last = last.masked_fill(last < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(last / temperature, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
            if step + 1 < max_new_tokens:
                features = self.features(next_id, caches) if use_cache else self.features(idx)
        return idx
