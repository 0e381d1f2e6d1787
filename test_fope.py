"""
The paper's specification: which frequencies FoPE keeps, its coefficients and tables, what is
relative and what is not, the whole model against the independent NumPy reference, context
extension, and configuration errors. The other test files hold the data (test_data.py), the
passkey task (test_passkey.py), the scripts (test_scripts.py, test_analyze.py, test_faults.py,
test_hardware.py) and the grids (test_grids.py). Run with `python -m pytest -q`.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch

import fope_gpt as G
import reference_numpy as ref


def tiny_config(**overrides):
    settings = dict(vocab_size=61, n_layer=2, n_head=2, n_embd=32, train_len=16, pe="fope")
    settings.update(overrides)
    return G.GPTConfig(**settings)


def spread_weights(model, seed=0):
    """Give a tiny model O(1) activations and peaked attention, so that a wrong position
    embedding changes the logits by far more than float32 noise (at init, std 0.02, every
    attention row is nearly uniform and position hardly matters)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 2.0 / math.sqrt(p.shape[1]))
    return model


def numpy_params(model):
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


def rotated_score(pos_module, q, k, m, n):
    """q . k of head 0 after the module rotates q (d,) to position m and k to position n."""
    qm = pos_module.rotate(q.view(1, 1, -1), torch.tensor([m]))[0, 0]  # (H=1, T=1, d)
    kn = pos_module.rotate(k.view(1, 1, -1), torch.tensor([n]))[0, 0]
    return float(qm @ kn)


# -----------------------------------------------------------------------------
# frequencies: which ones FoPE keeps (the authors' get_inv_freq and FourierEmbedding)


@pytest.mark.parametrize("head_dim, train_len, K, M", [
    (64, 512, 16, 16),
    (64, 1024, 18, 16),   # K > head_dim/4: step-eye
    (128, 512, 31, 31),
    (32, 128, 6, 6),
    (64, 256, 13, 13),    # the default CPU model
])
def test_kept_and_mixed_pair_counts_match_the_authors_code(head_dim, train_len, K, M):
    config = G.GPTConfig(n_head=4, n_embd=4 * head_dim, train_len=train_len, pe="fope")
    fope = G.FoPE(config)
    assert len(G.kept_frequencies(head_dim, train_len)) == K
    assert tuple(fope.sin_coef.shape) == tuple(fope.cos_coef.shape) == (4, K, M)
    assert len(ref.kept_frequencies(head_dim, train_len)) == K


def test_kept_frequencies_are_descending_and_complete_a_period_within_train_len():
    freqs = G.kept_frequencies(32, 128)
    assert torch.all(freqs[:-1] > freqs[1:])
    assert torch.allclose(freqs[:6], torch.tensor([1, 0.5623, 0.3162, 0.1778, 0.1, 0.05623]), rtol=1e-3)
    assert torch.all(2 * math.pi / freqs <= 128)                       # every kept period fits in L
    assert len(G.kept_frequencies(32, 128, clip=False)) == 16          # no clip: all d/2 pairs


def test_ablations_use_all_kept_frequencies_as_output_pairs():
    fs_only = G.FoPE(G.GPTConfig(n_head=4, n_embd=256, train_len=256, fope_cf=False))
    cf_only = G.FoPE(G.GPTConfig(n_head=4, n_embd=256, train_len=256, fope_fs=False))
    assert tuple(fs_only.sin_coef.shape) == (4, 32, 32)  # FS without CF: M = K = d/2, no cap
    assert tuple(cf_only.sin_coef.shape) == (4, 13, 13)  # CF without FS: M = K


# -----------------------------------------------------------------------------
# coefficients: identity plus frozen Xavier noise (the authors' FourierEmbedding init)


def test_coefficient_noise_has_the_xavier_gain_std():
    torch.manual_seed(0)
    config = G.GPTConfig(n_layer=8, n_head=8, n_embd=512, train_len=512, fope_sigma=0.3)  # the paper's 60M
    model = G.GPT(config)
    eye = G.step_eye(16, 16)
    noise = torch.stack([torch.stack((b.attn.pos.sin_coef - eye, b.attn.pos.cos_coef - eye)) for b in model.blocks])
    expected = ref.xavier_gain_std(0.3, 8, 16, 16)
    assert expected == pytest.approx(0.0217, abs=1e-4)                 # the std of gain 0.3 here
    assert noise.std().item() == pytest.approx(expected, rel=0.03)     # 32k samples
    assert noise.mean().abs().item() < 0.002


def test_step_eye_base_when_more_frequencies_than_pairs():
    fope = G.FoPE(G.GPTConfig(n_head=4, n_embd=256, train_len=1024, fope_sigma=0.0))
    expected = ref.step_eye(18, 16)                                     # E[2r, r] = 1 for 2r < 18
    assert np.array_equal(fope.sin_coef[0].numpy(), expected)
    assert expected[:, 9:].sum() == 0                                   # columns 9..15: no identity


def test_coefficients_differ_between_layers_heads_and_sin_cos():
    model = G.GPT(tiny_config(n_layer=2, n_head=2, n_embd=64, train_len=64))
    a, b = model.blocks[0].attn.pos, model.blocks[1].attn.pos
    assert not torch.equal(a.sin_coef, b.sin_coef)
    assert not torch.equal(a.sin_coef[0], a.sin_coef[1])
    assert not torch.equal(a.sin_coef, a.cos_coef)


@pytest.mark.parametrize("learnable", [False, True])
def test_coefficients_stay_frozen_unless_learnable(learnable):
    torch.manual_seed(0)
    model = G.GPT(tiny_config(fope_learnable=learnable))
    before = model.blocks[0].attn.pos.sin_coef.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    idx = torch.randint(0, 61, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    optimizer.step()
    changed = not torch.equal(before, model.blocks[0].attn.pos.sin_coef)
    assert changed == learnable
    assert model.num_params() + (0 if learnable else 2 * 2 * before.numel()) == model.num_params(trainable=False)


# -----------------------------------------------------------------------------
# tables: the Fourier series, the padding (the authors' FourierEmbedding), and the cache


def test_fope_tables_match_the_numpy_reference_and_have_the_contract_shape():
    config = tiny_config(n_head=3, n_embd=48, train_len=32, fope_sigma=1.0)
    fope = G.FoPE(config)
    cos, sin = fope.cos_sin(100)
    assert cos.dtype == sin.dtype == torch.float32
    assert cos.shape == sin.shape == (3, 100, 8)
    freqs = ref.kept_frequencies(16, 32)
    ref_cos, ref_sin = ref.fope_tables(100, freqs, fope.sin_coef.double().numpy(), fope.cos_coef.double().numpy(), 16)
    np.testing.assert_allclose(cos.numpy(), ref_cos, atol=1e-5)
    np.testing.assert_allclose(sin.numpy(), ref_sin, atol=1e-5)


def test_cached_tables_follow_loaded_coefficients_and_longer_lengths():
    torch.manual_seed(1)
    a = G.GPT(tiny_config())
    torch.manual_seed(2)
    b = G.GPT(tiny_config())
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 61, (1, 70))
    assert torch.equal(a(idx[:, :16])[0], b(idx[:, :16])[0])  # tables built at init, then reloaded
    assert torch.equal(a(idx)[0], b(idx)[0])                  # longer than cached: the tables grow
    pos = b.blocks[1].attn.pos
    for cached, fresh in zip(pos.cos_sin(70), pos.tables(70)):
        assert torch.equal(cached, fresh)


@pytest.mark.parametrize("pe, learnable", [("rope", False), ("fope", False), ("fope", True)])
def test_tables_stay_float32_when_they_grow_under_bf16_autocast(pe, learnable):
    # a bf16 evaluation past train_len grows the tables inside autocast; rounded to bf16 they
    # would be off by up to ~0.01, and the rotation with them
    model = G.GPT(tiny_config(pe=pe, fope_learnable=learnable, fope_sigma=1.0))
    pos = model.blocks[0].attn.pos
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 61, (1, 100)))
        grown = pos.cos_sin(100)
    exact = G.FoPE(tiny_config(fope_sigma=1.0)) if pe == "fope" else G.RoPE(tiny_config(pe=pe))
    if pe == "fope":
        exact.load_state_dict(pos.state_dict())
    for table, reference in zip(grown, exact.cos_sin(100)):
        assert table.dtype == torch.float32 and torch.equal(table.detach(), reference)


@pytest.mark.parametrize("sin_pad, factor", [(1.0, 2.0), (0.0, 1.0)])
def test_a_padded_pair_contributes_a_constant_multiple_of_its_dot_product(sin_pad, factor):
    fope = G.FoPE(G.GPTConfig(n_head=1, n_embd=64, train_len=128, fope_sin_pad=sin_pad))  # K = M = 11
    j = 20                                                                                # a padded pair
    q, k = torch.zeros(64), torch.zeros(64)
    q[j], q[j + 32], k[j], k[j + 32] = 0.7, -1.3, 0.4, 0.9
    for m, n in [(0, 0), (50, 3), (900, 17)]:
        assert rotated_score(fope, q, k, m, n) == pytest.approx(factor * (0.7 * 0.4 - 1.3 * 0.9), rel=1e-5)


# -----------------------------------------------------------------------------
# relative position: RoPE is exactly relative, FoPE's mixing is not


def test_rope_scores_depend_only_on_relative_position():
    rope = G.RoPE(tiny_config(pe="rope", n_embd=64, n_head=1))
    q, k = torch.randn(64), torch.randn(64)
    base = rotated_score(rope, q, k, 100, 40)
    for shift in (1, 333, 960):
        assert rotated_score(rope, q, k, 100 + shift, 40 + shift) == pytest.approx(base, rel=1e-4, abs=1e-4)


def test_clipped_rope_is_relative_but_fope_with_noise_is_not():
    torch.manual_seed(0)
    q, k = torch.randn(64), torch.randn(64)
    cf_only = G.FoPE(G.GPTConfig(n_head=1, n_embd=64, train_len=128, fope_fs=False))
    fope = G.FoPE(G.GPTConfig(n_head=1, n_embd=64, train_len=128, fope_sigma=0.3))
    assert rotated_score(cf_only, q, k, 1060, 1000) == pytest.approx(rotated_score(cf_only, q, k, 100, 40), rel=1e-4)
    near, far = rotated_score(fope, q, k, 100, 40), rotated_score(fope, q, k, 1060, 1000)
    assert abs(near - far) > 0.01 * (abs(near) + abs(far))


# -----------------------------------------------------------------------------
# the whole model: PyTorch against the independent NumPy reference


PE_VARIANTS = [
    dict(pe="rope"), dict(pe="alibi"), dict(pe="nope"),
    dict(pe="fope"), dict(pe="fope", fope_sin_pad=0.0), dict(pe="fope", fope_cf=False),
    dict(pe="fope", fope_fs=False), dict(pe="fope", train_len=1024),  # head_dim 16, L 1024: K = 5 > M = 4, step-eye
    dict(pe="fope", train_len=1024, fope_cap=False), dict(pe="fope", fope_shared=True),
    dict(pe="fope", **G.FOPE_DEPLOYED), dict(pe="cope"), dict(pe="cope", cope_taper="step"),
    dict(pe="rope", qk_norm=True), dict(pe="alibi", qk_norm=True),
]


@pytest.mark.parametrize("variant", PE_VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_logits_match_the_numpy_reference_past_the_training_length(variant):
    torch.manual_seed(0)
    config = tiny_config(**{"fope_sigma": 1.0, **variant})
    model = spread_weights(G.GPT(config))
    idx = torch.randint(0, config.vocab_size, (2, 48))  # 3x train_len (or past K's periods)
    with torch.no_grad():
        logits, _ = model(idx)
    expected = ref.forward(numpy_params(model), dataclasses.asdict(config), idx.numpy())
    assert logits.shape == (2, 48, config.vocab_size)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(logits.numpy(), expected, atol=2e-4 * scale)


def test_the_reference_comparison_can_tell_position_embeddings_apart():
    torch.manual_seed(0)
    model = spread_weights(G.GPT(tiny_config(pe="rope")))
    idx = torch.randint(0, 61, (2, 48))
    params = numpy_params(model)
    rope = ref.forward(params, dataclasses.asdict(tiny_config(pe="rope")), idx.numpy())
    nope = ref.forward(params, dataclasses.asdict(tiny_config(pe="nope")), idx.numpy())
    assert np.abs(rope - nope).max() > 100 * 2e-4 * np.abs(rope).max()


def test_alibi_in_query_blocks_matches_the_reference(monkeypatch):
    # at 16x train_len the bias would be too large to form whole: attention takes the queries in
    # blocks, each over the keys up to its last query; forced here on a short sequence
    monkeypatch.setattr(G, "BIAS_ELEMENTS", 2 * 48 * 7)  # blocks of 7 queries
    torch.manual_seed(0)
    config = tiny_config(pe="alibi")
    model = spread_weights(G.GPT(config))
    idx = torch.randint(0, 61, (2, 48))
    expected = ref.forward(numpy_params(model), dataclasses.asdict(config), idx.numpy())
    np.testing.assert_allclose(model(idx)[0].detach().numpy(), expected, atol=2e-4 * np.abs(expected).max())


@pytest.mark.parametrize("pe", G.POSITION_EMBEDDINGS)
def test_attention_weights_reproduce_what_the_layer_computes(pe):
    # the analyses read attention weights that SDPA never forms; they must be the layer's own
    torch.manual_seed(0)
    attn = spread_weights(G.GPT(tiny_config(pe=pe, qk_norm=pe == "rope"))).blocks[0].attn
    x = torch.randn(2, 40, 32)
    weights = attn.weights(x, slice(0, 40))                                          # (B, H, T, T)
    _, _, v = attn.project(x)
    by_weights = attn.proj((weights @ v).transpose(1, 2).reshape(2, 40, 32))
    torch.testing.assert_close(by_weights, attn(x), atol=1e-5, rtol=1e-4)
    assert torch.all(weights[:, :, 10, 11:] == 0)                                    # nothing after the query


def test_shared_fope_uses_one_coefficient_set_and_saves_it_under_every_layer():
    model = G.GPT(tiny_config(fope_shared=True))
    first, second = (block.attn.pos for block in model.blocks)
    assert first is second and model.blocks[0].attn.pos.sin_coef.requires_grad is False
    state = model.state_dict()
    assert torch.equal(state["blocks.0.attn.pos.sin_coef"], state["blocks.1.attn.pos.sin_coef"])
    per_layer = G.GPT(tiny_config())
    assert per_layer.blocks[0].attn.pos is not per_layer.blocks[1].attn.pos


@pytest.mark.parametrize("train_len, capped, uncapped", [(128, 3, 3), (1024, 4, 5)])  # head_dim 16: d/4 = 4
def test_without_the_cap_every_kept_frequency_carries_position(train_len, capped, uncapped):
    assert G.FoPE(tiny_config(train_len=train_len)).sin_coef.shape[2] == capped
    assert G.FoPE(tiny_config(train_len=train_len, fope_cap=False)).sin_coef.shape[2] == uncapped


def test_cope_with_a_step_taper_is_fope_clip_only_with_identity_padding():
    # CoPE's HardClip baseline zeroes the band FoPE's floor clips: clipped RoPE, the clipped pairs
    # unrotated, which is FoPE without its Fourier series and with sin padding 0
    torch.manual_seed(0)
    hard = spread_weights(G.GPT(tiny_config(pe="cope", cope_taper="step")))
    clipped = G.GPT(tiny_config(pe="fope", fope_fs=False, fope_sin_pad=0.0))
    clipped.load_state_dict(hard.state_dict(), strict=False)  # the same weights; FoPE's identity coefficients kept
    idx = torch.randint(0, 61, (2, 64))
    torch.testing.assert_close(hard(idx)[0], clipped(idx)[0], atol=1e-5, rtol=1e-5)
    soft = G.GPT(tiny_config(pe="cope"))
    soft.load_state_dict(hard.state_dict())
    assert not torch.allclose(soft(idx)[0], hard(idx)[0], atol=1e-3)


def test_cope_tapers_the_band_the_floor_clips_from_one_to_zero():
    config = G.GPTConfig(n_head=4, n_embd=256, train_len=384)  # head_dim 64: K = 15 kept, 17 in the band
    rope, cope = G.RoPE(config).freqs, G.CoPE(config).freqs
    assert torch.equal(cope[:15], rope[:15])
    assert cope[15] == rope[15] and cope[-1] == 0          # the band's fastest untouched, its slowest zero
    assert torch.all(cope[16:-1] < rope[16:-1]) and torch.all(cope[16:-1] > 0)
    assert torch.equal(G.CoPE(G.GPTConfig(n_head=4, n_embd=256, train_len=10 ** 6)).freqs, rope)  # nothing to clip


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
    torch.manual_seed(0)
    idx = torch.randint(0, 61, (2, 40))
    for qk_norm, blind in ((True, True), (False, False)):
        model = spread_weights(G.GPT(tiny_config(pe="rope", qk_norm=qk_norm)))
        before = model(idx)[0]
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.weight[:64] *= 5.0  # the q and k rows
        assert torch.allclose(model(idx)[0], before, atol=1e-4) == blind


def test_fope_without_both_parts_is_exactly_rope():
    torch.manual_seed(0)
    rope = spread_weights(G.GPT(tiny_config(pe="rope")))
    fope = G.GPT(tiny_config(pe="fope", fope_fs=False, fope_cf=False))
    fope.load_state_dict(rope.state_dict(), strict=False)  # RoPE has no coefficient tensors
    idx = torch.randint(0, 61, (2, 64))
    assert torch.equal(rope(idx)[0], fope(idx)[0])


@pytest.mark.parametrize("pe", G.POSITION_EMBEDDINGS)
def test_changing_a_future_token_never_changes_earlier_logits(pe):
    torch.manual_seed(0)
    model = spread_weights(G.GPT(tiny_config(pe=pe)))
    idx = torch.randint(0, 61, (1, 40))
    changed = idx.clone()
    changed[0, 30] = (idx[0, 30] + 1) % 61
    a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:, :30], b[:, :30])
    assert not torch.allclose(a[:, 30:], b[:, 30:])


@pytest.mark.parametrize("pe", G.POSITION_EMBEDDINGS)
def test_kv_cached_generation_equals_uncached_greedy_generation(pe):
    torch.manual_seed(0)
    model = spread_weights(G.GPT(tiny_config(pe=pe)))
    prompt = torch.randint(0, 61, (3, 25))
    cached = model.generate(prompt, 12)
    uncached = model.generate(prompt, 12, use_cache=False)
    assert cached.shape == (3, 37)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("pe", G.POSITION_EMBEDDINGS)
def test_a_chunk_after_the_cache_sees_the_same_logits_as_one_pass(pe):
    torch.manual_seed(0)
    model = spread_weights(G.GPT(tiny_config(pe=pe)))
    idx = torch.randint(0, 61, (1, 30))
    caches = [G.KVCache() for _ in model.blocks]
    first, _ = model(idx[:, :20], caches=caches)
    rest, _ = model(idx[:, 20:], caches=caches)
    torch.testing.assert_close(torch.cat((first, rest), dim=1), model(idx)[0], atol=1e-5, rtol=1e-5)


def test_loss_ignores_targets_marked_minus_one():
    torch.manual_seed(0)
    model = G.GPT(tiny_config())
    idx = torch.randint(0, 61, (1, 16))
    targets = idx.clone()
    targets[0, :10] = -1
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[0, 10:], idx[0, 10:])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)



def test_pytorch_init_keeps_torchs_defaults_and_olmo_init_is_the_authors_std():
    torch.manual_seed(0)
    olmo = G.GPT(tiny_config(n_embd=64))
    torch.manual_seed(0)
    default = G.GPT(tiny_config(n_embd=64, init="pytorch"))
    assert abs(olmo.tok_emb.weight.std().item() - 0.02) < 0.002 and olmo.tok_emb.weight.abs().max() <= 0.06
    assert abs(default.tok_emb.weight.std().item() - 1.0) < 0.05       # nn.Embedding: N(0, 1)
    qkv = default.blocks[0].attn.qkv.weight                              # nn.Linear: U(-1/sqrt(fan_in), ..)
    assert qkv.abs().max() <= 1 / math.sqrt(64) and qkv.std().item() > 0.9 / math.sqrt(3 * 64)


# -----------------------------------------------------------------------------
# context extension without training: PI, NTK-aware, YaRN (the authors' RotaryEmbedding.extra_yarn)


def test_yarn_multipliers_match_the_authors_numbers():
    config = G.GPTConfig(n_head=8, n_embd=512, train_len=1024, pe="rope", rope_scaling="yarn", rope_scale=16,
                         rope_original_len=512)
    base = G.kept_frequencies(64, 512, clip=False)
    ratio = (G.extend_context(base, config) / base).tolist()
    assert ratio[:4] == [1.0] * 4                                    # fast pairs unchanged
    assert ratio[4:7] == pytest.approx([0.928, 0.856, 0.784], abs=1e-3)
    assert ratio[15] == pytest.approx(0.135, abs=1e-3)
    assert ratio[16:] == pytest.approx([1 / 16] * 16)                # slow pairs interpolated


def test_position_interpolation_and_ntk_scaling():
    base = G.kept_frequencies(64, 256, clip=False)
    pi = G.extend_context(base, G.GPTConfig(pe="rope", rope_scaling="pi", rope_scale=4))
    ntk = G.extend_context(base, G.GPTConfig(pe="rope", rope_scaling="ntk", rope_scale=4))
    assert torch.allclose(pi, base / 4)
    assert ntk[0] == base[0] and ntk[-1] == pytest.approx(base[-1].item() / 4, rel=1e-5)
    assert torch.all(ntk[1:-1] < base[1:-1]) and torch.all(ntk[1:-1] > base[1:-1] / 4)


def test_fope_applies_yarn_after_the_clip():
    config = G.GPTConfig(n_head=8, n_embd=512, train_len=1024, rope_scaling="yarn", rope_scale=16, rope_original_len=512)
    fope = G.FoPE(config)
    assert tuple(fope.sin_coef.shape) == (8, 18, 16)                 # the new length admits more frequencies
    expected = G.extend_context(G.kept_frequencies(64, 1024, clip=False), config)[:18]
    assert torch.equal(fope.freqs, expected)


# -----------------------------------------------------------------------------
# configuration errors name the field


@pytest.mark.parametrize("overrides, field", [
    (dict(pe="xpos"), "pe"),
    (dict(n_embd=30, n_head=4), "n_embd"),
    (dict(n_embd=36, n_head=4), "head_dim"),  # head_dim 9 is odd
    (dict(train_len=0), "train_len"),
    (dict(train_len=-5), "train_len"),
    (dict(rope_scaling="linear"), "rope_scaling"),
    (dict(rope_scale=0.5), "rope_scale"),
])
def test_bad_config_raises_a_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)
