"""
fope_gpt.py: the whole model, one position-embedding switch.

A small GPT in the shape of the FoPE paper's models (the OLMo block: pre-RMSNorm, SwiGLU,
no biases, untied embeddings) with four ways to tell tokens where they are:

    rope   rotary position embedding: each q/k channel pair rotates at one frequency
    fope   Fourier position embedding (Hua et al., arXiv 2412.17739): RoPE's rotation, but
           (FS) each pair is driven by a Fourier series over all kept frequencies, and
           (CF) frequencies too slow to complete a period within the training length are
           clipped to zero, i.e. those pairs carry no position at all
    alibi  a linear distance penalty added to the attention logits
    nope   no position signal; causal masking alone

The file reads in the order the data flows: config -> position embeddings -> attention ->
block -> model -> generation. FoPE follows the authors' released code; every deviation is
marked "Deviation:" in a comment.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

POSITION_EMBEDDINGS = ("rope", "fope", "alibi", "nope")
ROPE_SCALINGS = ("none", "pi", "ntk", "yarn")  # context extension of rotary frequencies

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
    rope_scaling: str = "none"    # context extension of rope/fope frequencies: one of ROPE_SCALINGS
    rope_scale: float = 1.0       # s, the factor by which the context is meant to grow
    rope_original_len: int = 0    # YaRN's L0, the length the frequencies were trained at (0: train_len)
    init: str = "olmo"            # weights: "olmo" truncated N(0, 0.02) as the authors; "pytorch" its defaults

    def __post_init__(self):
        if self.pe not in POSITION_EMBEDDINGS:
            raise ValueError(f"GPTConfig.pe must be one of {', '.join(POSITION_EMBEDDINGS)}, got {self.pe!r}")
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "train_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"GPTConfig.n_embd / n_head (head_dim {self.head_dim}) must be even for rotary pairs")
        if not self.rope_theta > 1:
            raise ValueError(f"GPTConfig.rope_theta must be greater than 1, got {self.rope_theta!r}")
        if not self.fope_sigma >= 0:
            raise ValueError(f"GPTConfig.fope_sigma must be non-negative, got {self.fope_sigma!r}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"GPTConfig.rope_scaling must be one of {', '.join(ROPE_SCALINGS)}, got {self.rope_scaling!r}")
        if not self.rope_scale >= 1:
            raise ValueError(f"GPTConfig.rope_scale must be at least 1, got {self.rope_scale!r}")
        if self.init not in ("olmo", "pytorch"):
            raise ValueError(f"GPTConfig.init must be olmo or pytorch, got {self.init!r}")
        if not isinstance(self.rope_original_len, int) or self.rope_original_len < 0:
            raise ValueError(f"GPTConfig.rope_original_len must be a non-negative integer, got {self.rope_original_len!r}")

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


def no_autocast(tensor):
    """Turn autocast off for table building: under bf16 autocast einsum and outer products
    would round the tables to bf16 (errors near 0.01 at long positions); they stay float32."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def apply_rotary(x, cos, sin):
    """NeoX half-split rotation: pair j is channels (j, j + d/2). Done in float32.

    x: (B, H, T, d); cos, sin: broadcastable to (B, H, T, d/2).
    """
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).type_as(x)


class RoPE(nn.Module):
    """Rotary position embedding: pair j of q and k rotates by angle t * omega_j at position t.

    Then q_m . k_n depends on positions only through m - n: the logit is a sum of sinusoids
    in the relative distance, one per frequency, and extrapolation hopes they stay periodic.
    """

    def __init__(self, config):
        super().__init__()
        freqs = kept_frequencies(config.head_dim, config.train_len, config.rope_theta, clip=False)
        self.register_buffer("freqs", extend_context(freqs, config), persistent=False)  # (d/2,)
        self._build_tables(config.train_len)

    @torch.no_grad()
    def _build_tables(self, T):
        with no_autocast(self.freqs):
            phase = torch.outer(torch.arange(T, dtype=torch.float32, device=self.freqs.device), self.freqs)
        self.register_buffer("cos_table", phase.cos(), persistent=False)  # (T, d/2)
        self.register_buffer("sin_table", phase.sin(), persistent=False)

    def cos_sin(self, T):
        """float32 (cos, sin) for positions 0..T-1, each (T, d/2); cached, grown on demand."""
        if T > self.cos_table.shape[0]:
            self._build_tables(max(T, 2 * self.cos_table.shape[0]))
        return self.cos_table[:T], self.sin_table[:T]


class FoPE(nn.Module):
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

    Ablations (not released by the authors; see FAITHFULNESS.md): fope_cf=False keeps all head_dim/2 frequencies,
    fope_fs=False uses exact identity coefficients; either one off means M = K (no cap),
    so with both off this is RoPE exactly.
    """

    def __init__(self, config):
        super().__init__()
        d, H = config.head_dim, config.n_head
        K = len(kept_frequencies(d, config.train_len, config.rope_theta, clip=config.fope_cf))
        M = min(K, d // 4) if (config.fope_fs and config.fope_cf) else K
        sigma = config.fope_sigma if config.fope_fs else 0.0
        # Clip first, then extend ("yarn_after" in the authors' configs): the kept frequencies
        # are a prefix of the descending list, so extension never brings back a clipped one.
        freqs = extend_context(kept_frequencies(d, config.train_len, config.rope_theta, clip=False), config)
        self.register_buffer("freqs", freqs[:K], persistent=False)  # (K,)
        self.sin_coef = nn.Parameter(self._init_coef(H, K, M, sigma), requires_grad=config.fope_learnable)
        self.cos_coef = nn.Parameter(self._init_coef(H, K, M, sigma), requires_grad=config.fope_learnable)
        self.half_dim, self.sin_pad, self.learnable = d // 2, config.fope_sin_pad, config.fope_learnable
        self._build_tables(config.train_len)

    @staticmethod
    def _init_coef(H, K, M, sigma):
        """eye_xavier_norm: step-eye plus N(0, std^2), std = sigma * sqrt(2 / (K*M + H*M))."""
        noise = nn.init.xavier_normal_(torch.empty(H, K, M), gain=sigma)  # fans of a 3-D tensor
        return step_eye(K, M) + noise  # (H, K, M)

    def _tables(self, T):
        t = torch.arange(T, dtype=torch.float32, device=self.freqs.device)
        with no_autocast(t):
            phase = torch.outer(t, self.freqs)                                     # (T, K)
            cos = torch.einsum("tk,hkm->htm", phase.cos(), self.cos_coef.float())  # (H, T, M)
            sin = torch.einsum("tk,hkm->htm", phase.sin(), self.sin_coef.float())
        pad = self.half_dim - cos.shape[-1]
        return F.pad(cos, (0, pad), value=1.0), F.pad(sin, (0, pad), value=self.sin_pad)  # (H, T, d/2)

    # The coefficients are frozen and positions always count from 0, so the mixed tables are
    # a fixed function of (head, t): build them once and slice, exactly like RoPE's.
    # Deviation: the authors' code recomputes the two einsums on every forward.
    @torch.no_grad()
    def _build_tables(self, T):
        cos, sin = self._tables(T)
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("sin_table", sin, persistent=False)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._build_tables(self.cos_table.shape[1])  # new coefficients, new tables

    def cos_sin(self, T):
        """float32 (cos, sin) for positions 0..T-1, each (H, T, d/2), padding included."""
        if self.learnable:
            return self._tables(T)  # coefficients change every step: rebuild inside autograd
        if T > self.cos_table.shape[1]:
            self._build_tables(max(T, 2 * self.cos_table.shape[1]))
        return self.cos_table[:, :T], self.sin_table[:, :T]


class ALiBi(nn.Module):
    """Attention with linear biases: logit(i, j) -= m_h * (i - j), slopes m_h = 2^(-8h/H)."""

    def __init__(self, config):
        super().__init__()
        H = config.n_head
        slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=torch.float32) / H)
        self.register_buffer("slopes", slopes, persistent=False)  # (H,)

    def bias(self, start, T, S):
        """Additive float mask (H, T, S) for queries start..start+T-1 over keys 0..S-1,
        causal positions set to -inf."""
        q_pos = torch.arange(start, start + T, device=self.slopes.device)
        k_pos = torch.arange(S, device=self.slopes.device)
        distance = (q_pos[:, None] - k_pos[None, :]).float()                  # (T, S)
        bias = -self.slopes[:, None, None] * distance                          # (H, T, S)
        return bias.masked_fill(distance < 0, float("-inf"))


class NoPE(nn.Module):
    """No position signal: each token knows only which tokens it can see (the causal mask)."""

    def __init__(self, config):
        super().__init__()


def position_module(config):
    return {"rope": RoPE, "fope": FoPE, "alibi": ALiBi, "nope": NoPE}[config.pe](config)


# -----------------------------------------------------------------------------
# attention


class KVCache:
    """Keys (already rotated) and values of one layer, for generation one token at a time.

    Caching rotated keys equals the authors' caching of raw keys plus re-rotation, because a
    key's rotation depends only on its own absolute position.
    """

    def __init__(self):
        self.k = self.v = None

    def __len__(self):
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k, v):  # (B, H, T, d) each
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.pe = config.n_head, config.pe
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.pos = position_module(config)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        start = 0 if cache is None else len(cache)  # absolute position of x[:, 0]
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, d)
        if self.pe in ("rope", "fope"):
            cos, sin = self.pos.cos_sin(start + T)  # (T_all, d/2) or (H, T_all, d/2)
            cos, sin = cos[..., start:, :], sin[..., start:, :]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # same positions, never v
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, start + T, d)
        S = k.shape[2]
        if self.pe == "alibi":
            mask = self.pos.bias(start, T, S).to(q.dtype)  # SDPA cannot combine a mask with is_causal
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif T == S or T == 1:
            # T == 1: one new query sees every cached key; T == S: the usual square causal mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            # several new queries after a cache: SDPA's is_causal would align the mask top-left
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)


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

    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
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
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
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
    def generate(self, idx, max_new_tokens, temperature=0.0, use_cache=True):
        """Continue idx (B, T) by max_new_tokens; temperature 0 means greedy decoding.

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
                next_id = torch.multinomial(F.softmax(last / temperature, dim=-1), num_samples=1)
            idx = torch.cat((idx, next_id), dim=1)
            if step + 1 < max_new_tokens:
                features = self.features(next_id, caches) if use_cache else self.features(idx)
        return idx
