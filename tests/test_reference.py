"""Checks of reference_numpy's CoPE, fope_cap/fope_shared and qk_norm on their own (no PyTorch)."""

import numpy as np

import reference_numpy as ref

V, L, H, C, T = 11, 2, 2, 32, 12  # head_dim 16


def make_cfg(**kw):
    cfg = dict(vocab_size=V, n_layer=L, n_head=H, n_embd=C, train_len=16, pe="rope",
               rope_theta=1e4, fope_sigma=0.3, fope_fs=True, fope_cf=True, fope_sin_pad=1.0,
               fope_learnable=False)
    cfg.update(kw)
    return cfg


def make_params(seed=0, K=None, M=None, shared=False):
    rng = np.random.default_rng(seed)
    p = {"tok_emb.weight": rng.normal(size=(V, C)), "final_norm.weight": np.ones(C),
         "lm_head.weight": rng.normal(size=(V, C))}
    coef = [ref.fope_coefficients(K, M, H, 0.1 * rng.normal(size=(H, K, M))) for _ in "sc"] if K else 0
    for l in range(L):
        b = f"blocks.{l}."
        p.update({b + "attn_norm.weight": np.ones(C), b + "mlp_norm.weight": np.ones(C),
                  b + "attn.qkv.weight": rng.normal(size=(3 * C, C)) / 6,
                  b + "attn.proj.weight": rng.normal(size=(C, C)) / 6,
                  b + "mlp.up.weight": rng.normal(size=(8 * C, C)) / 6,
                  b + "mlp.down.weight": rng.normal(size=(C, 4 * C)) / 6,
                  b + "attn.q_norm.weight": 1 + 0.1 * rng.normal(size=C // H),
                  b + "attn.k_norm.weight": 1 + 0.1 * rng.normal(size=C // H)})
        if K:
            if not shared:
                coef = [ref.fope_coefficients(K, M, H, 0.1 * rng.normal(size=(H, K, M))) for _ in "sc"]
            p[b + "attn.pos.sin_coef"], p[b + "attn.pos.cos_coef"] = coef
    return p


def test_cope_without_band_is_rope():
    cfg = make_cfg(train_len=10**5)  # slowest ω = 1e4^(-14/16) has period < 1e5: n = 0
    assert len(ref.kept_frequencies(16, 10**5)) == 8
    for taper in ("cosine", "step"):
        cope = ref.position_tables({}, dict(cfg, pe="cope", cope_taper=taper), 0, T)
        rope = ref.position_tables({}, cfg, 0, T)
        assert all(np.array_equal(a, b) for a, b in zip(cope, rope))


def test_cosine_taper_endpoints():
    rope = ref.kept_frequencies(32, 128, clip=False)  # K = 6 kept of d/2 = 16: a clipped band of n = 10
    f = ref.cope_frequencies(32, 128)
    ratio = f[6:] / rope[6:]
    assert np.array_equal(f[:6], rope[:6]) and ratio[0] == 1.0 and ratio[-1] == 0.0
    assert np.all(np.diff(ratio) < 0) and np.all(ratio[1:-1] > 0)
    assert np.allclose(ratio, 0.5 * (1 + np.cos(np.arange(10) * np.pi / 9)))


def test_step_taper_zeroes_exactly_the_clipped_band():
    for d, tl in ((32, 128), (64, 256), (16, 16)):
        f = ref.cope_frequencies(d, tl, taper="step")
        kept = ref.kept_frequencies(d, tl, clip=True)
        assert np.array_equal(f[f != 0], kept) and np.count_nonzero(f == 0) == d // 2 - len(kept)


def test_fope_cap_off_uses_all_kept_pairs():
    cfg = make_cfg(pe="fope", fope_cap=False, train_len=1000)  # head_dim 16: K = 5 > d/4 = 4
    K = len(ref.kept_frequencies(16, 1000))
    cos, sin = ref.position_tables(make_params(K=K, M=K), cfg, 0, T)
    assert K == 5 and cos.shape == (H, T, 8) and np.all(cos[..., K:] == 1)


def test_deployed_fope_shared_coefficients():
    cfg = make_cfg(pe="fope", fope_shared=True, fope_cap=False, fope_sin_pad=0.0, fope_sigma=0.5,
                   qk_norm=True, train_len=1000)  # K = M = 5
    idx = np.arange(T)[None] % V
    shared = make_params(K=5, M=5, shared=True)
    out = ref.forward(shared, cfg, idx)
    assert np.array_equal(out, ref.forward(shared, dict(cfg, fope_shared=False), idx))
    try:
        ref.forward(make_params(K=5, M=5), cfg, idx)  # every layer has its own coefficients
    except ValueError:
        return
    raise AssertionError("differing per-layer coefficients were accepted under fope_shared")


def test_qk_rms_norm_unit_rms_and_scale_invariance():
    x = np.random.default_rng(1).normal(size=(2, H, T, 16)) * 3.0
    y = ref.qk_rms_norm(x, np.ones(16))
    assert np.allclose(np.sqrt(np.mean(y * y, axis=-1)), 1.0, atol=1e-6)
    try:
        ref.qk_rms_norm(x, np.ones((H, 16)))
        raise AssertionError("a per-head weight was accepted")
    except ValueError:
        pass
    p, idx = make_params(), np.arange(T)[None] % V
    q = dict(p, **{"blocks.0.attn.qkv.weight": p["blocks.0.attn.qkv.weight"] * np.repeat(
        [5.0, 3.0, 1.0], C)[:, None]})  # rescale q and k rows; qk-norm undoes it (up to eps)
    for pe in ("rope", "cope", "alibi"):
        cfg = make_cfg(pe=pe, qk_norm=True)
        assert np.allclose(ref.forward(p, cfg, idx), ref.forward(q, cfg, idx), atol=1e-5)
        assert not np.allclose(ref.forward(p, dict(cfg, qk_norm=False), idx),
                               ref.forward(q, dict(cfg, qk_norm=False), idx))
