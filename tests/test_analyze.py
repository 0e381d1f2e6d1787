"""
The spectrum diagnostics of analyze.py and spectra.py.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import analyze
from lib import token_cache
from lib import spectra
from lib import tokenizer
from conftest import is_png, plotted_lines, run_script
from fope_gpt import GPT, POSITION_EMBEDDINGS, GPTConfig


PES = POSITION_EMBEDDINGS


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
    prepared = token_cache.prepare_data(str(corpus), "bpe", 300, cache_dir=tmp / "data", log=lambda line: None)
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
    attn = tiny_model("rope").blocks[0].attn                    # head_dim 32
    q = torch.randn(4, 32, generator=torch.Generator().manual_seed(pair))
    N = 256
    target = float(attn.pos.freqs[pair]) / (2 * math.pi)       # cycles per token
    freqs, spectrum = spectra.query_spectrum(attn, q, 0, pair, N)
    assert freqs[spectrum.argmax()] == freqs[np.abs(freqs - target).argmin()]
    if target * N >= 3:  # a real signal's +f and -f lobes overlap near frequency zero
        freqs, spectrum = spectra.score_spectrum(attn, q, q.flip(0), 0, pair, N)
        assert freqs[spectrum.argmax()] == freqs[np.abs(freqs - target).argmin()]


def test_fope_leaks_into_the_other_kept_frequencies_and_rope_does_not():
    q = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    leak = {}
    for pe in ("rope", "fope"):
        attn = tiny_model(pe, fope_sigma=1.0).blocks[0].attn
        freqs, spectrum = spectra.query_spectrum(attn, q, 0, 0, 256)
        other = float(attn.pos.freqs[2]) / (2 * math.pi)       # pair 0's own frequency is freqs[0]
        leak[pe] = spectrum[np.abs(freqs - other).argmin()] / spectrum.max()
    assert leak["rope"] < 1e-4 and leak["fope"] > 1e-2


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


def test_a_grid_of_checkpoints_wraps_into_rows_of_runs_per_row():
    # 12 checkpoints (3 seeds of 4 methods) in 3 rows of 4, each a column of 2 panels
    fig, columns = analyze.run_panels(12, 2, 4.5, 3)
    assert len(columns) == 12 and all(len(column) == 2 for column in columns)
    assert len(fig.axes) == 24 and len({id(ax) for column in columns for ax in column}) == 24
    # 5 checkpoints: 4 then 1, the 3 columns left over switched off
    fig, columns = analyze.run_panels(5, 2, 4.5, 3)
    used = {id(ax) for column in columns for ax in column}
    assert len(columns) == 5 and len(fig.axes) == 16
    assert all(not ax.axison for ax in fig.axes if id(ax) not in used)
    assert all(ax.axison for column in columns for ax in column)


def test_cli_writes_every_figure_and_the_json(checkpoints):
    tmp, paths = checkpoints
    result = run_script("analyze.py", "--ckpt", paths["rope"], paths["fope"], "--data_dir", tmp / "data",
                        "--out_dir", tmp / "out", cwd=tmp)
    assert result.returncode == 0, result.stderr
    assert all(is_png(tmp / "out" / f"{name}.png") for name in ("pair_norms", "spectrum", "logit_vs_distance",
                                                                 "fope_coefficients", "retrieval_attention"))
    records = json.loads((tmp / "out" / "analysis.json").read_text())["checkpoints"]
    assert [r["pe"] for r in records] == ["rope", "fope"]
    for record in records:
        assert record["pair"] == 0 and record["train_len"] == 32  # period 6.3 is closest to 32/4
        assert record["logit_vs_distance"]["distance"][-1] == 16 * 32
        assert len(record["spectrum"]["query_dft"]) == 8 * 32
        assert "skipped" in record["retrieval_attention"]  # 32 tokens hold no passkey prompt


def panels(fig):
    """{title: Axes} of a figure's panels."""
    return {ax.get_title(): ax for ax in fig.axes}


def test_the_analysis_figures_show_the_numbers_of_the_json(checkpoints):
    tmp, paths = checkpoints
    analyze.main(["--ckpt", str(paths["rope"]), str(paths["fope"]), "--data_dir", str(tmp / "data"),
                  "--out_dir", str(tmp / "shown"), "--passkey_trials", "0"])
    records = json.loads((tmp / "shown" / "analysis.json").read_text())["checkpoints"]
    labels = ["rope", "fope"]
    norms, logits, coefficients = (panels(draw(records, labels)) for draw in (
        analyze.draw_pair_norms, analyze.draw_logits, analyze.draw_coefficients))
    spectra = analyze.draw_spectra(records, labels)
    for record, label in zip(records, labels):
        for layer in range(2):
            shown = plotted_lines(norms[f"{label}, layer {layer}"])
            assert shown["|q|"][1] == record["pair_norms"]["q_norm"][layer]
            assert shown["|k|"][1] == record["pair_norms"]["k_norm"][layer]
        curve = record["logit_vs_distance"]
        assert plotted_lines(logits[f"{label}, layer 0 (all heads)"])["mean"] == (curve["distance"], curve["mean"])
        query = next(ax for ax in spectra.axes if ax.get_title().startswith(f"{label}, layer 0"))
        assert [float(y) for y in query.get_lines()[0].get_ydata()] == record["spectrum"]["query_dft"]
    for layer in range(2):  # FoPE's coefficient matrices, as the JSON holds them
        for name in ("sin_coef", "cos_coef"):
            shown = coefficients[f"fope, layer {layer}: {name}"].get_images()[0].get_array()
            np.testing.assert_array_equal(shown, records[1]["fope_coefficients"][name][layer])


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
