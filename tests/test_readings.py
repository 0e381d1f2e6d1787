"""The typed readings hold against the saved results. README's answer and the readings of
results/default/results.md say things in words (who is ahead, what stays flat); each such claim is
checked here against the committed JSON of the runs it names, so a new run that overturns one fails
the suite instead of leaving a false sentence behind."""

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parent.parent / "results" / "default"
TRAIN_LEN = 384
SEEDS = (0, 1, 2)


def record(kind, run):
    with open(RESULTS / kind / f"{run}.json") as f:
        return json.load(f)["checkpoints"][0]


def accuracy(method, seed, multiple):
    return record("passkey", f"{method}-s{seed}")["accuracy"][str(int(multiple * TRAIN_LEN))]


def ratio(method, seed, multiple=16, kind="ppl"):
    return record(kind, f"{method}-s{seed}")["ppl_ratio"][str(multiple * TRAIN_LEN)]


@pytest.mark.parametrize("method", ["rope", "fope", "alibi"])
def test_rope_fope_and_alibi_retrieve_every_key_within_train_len(method):
    assert all(accuracy(method, seed, multiple) == 1.0 for seed in SEEDS for multiple in (0.75, 1))


def test_nope_retrieves_at_most_a_sixth_of_the_keys_even_within_train_len():
    assert all(accuracy("nope", seed, multiple) <= 0.16 for seed in SEEDS for multiple in (0.75, 1))


@pytest.mark.parametrize("method", ["rope", "fope-nocf"])  # RoPE, and FoPE without its clip floor (FS only)
def test_without_a_clip_no_key_is_retrieved_past_train_len(method):
    assert all(accuracy(method, seed, multiple) == 0.0 for seed in SEEDS for multiple in (2, 4, 8, 16))


def test_alibi_retrieves_more_keys_than_fope_from_4x_on_every_seed():
    for multiple in (4, 8, 16):
        assert all(accuracy("alibi", seed, multiple) > accuracy("fope", seed, multiple) for seed in SEEDS), multiple
    assert max(accuracy("fope", seed, 16) for seed in SEEDS) < min(accuracy("alibi", seed, 16) for seed in SEEDS)


def test_perplexity_past_train_len_rope_grows_several_fold_fope_by_a_quarter_alibi_not_at_all():
    assert min(ratio("rope", seed) for seed in SEEDS) > 8
    assert max(ratio("fope", seed) for seed in SEEDS) < 1.3
    assert max(ratio("alibi", seed) for seed in SEEDS) < 1.0
    assert max(ratio("fope", seed) for seed in SEEDS) < min(ratio("nope", seed) for seed in SEEDS) \
        and max(ratio("nope", seed) for seed in SEEDS) < min(ratio("rope", seed) for seed in SEEDS)


def test_the_clip_floor_alone_is_nearly_as_flat_and_fs_alone_is_as_steep_as_rope():
    cf_only = [ratio("fope-nofs", seed) for seed in SEEDS]
    fs_only = [ratio("fope-nocf", seed) for seed in SEEDS]
    assert max(cf_only) < 1.5 and min(fs_only) > min(ratio("rope", seed) for seed in SEEDS)


def test_on_the_second_corpus_the_order_past_train_len_is_the_same():
    sotu = {method: [ratio(method, seed, kind="sotu") for seed in SEEDS] for method in ("rope", "fope", "nope")}
    assert max(sotu["fope"]) < min(sotu["nope"]) and max(sotu["nope"]) < min(sotu["rope"])
    alibi = [ratio("alibi", seed, kind="sotu") for seed in SEEDS]
    assert min(alibi) <= min(sotu["fope"]) and max(sotu["fope"]) <= max(alibi)  # FoPE's range inside ALiBi's
