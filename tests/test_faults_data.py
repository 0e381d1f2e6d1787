"""
Token caches that changed since they were written: other ids of the same size, a damaged
tokenizer, ids outside the vocabulary. Training and every evaluation refuse them in one line
naming the file and how to rebuild it, and change nothing; processes that build the same cache at
once take turns.
"""

import hashlib
import json
import shutil
import threading

import numpy as np
import pytest

import eval_ppl
import train
from conftest import corpus_file, error_of, snapshot, tiny_run_args
from lib import token_cache


def reverse_ids(folder):
    """Other ids, the same size: as if another tool had rewritten the file."""
    ids = np.fromfile(folder / "train.bin", dtype=np.uint16)
    ids[::-1].tofile(folder / "train.bin")
    return folder / "train.bin", "has changed since the cache was written"


def damage_tokenizer(folder):
    text = (folder / "tokenizer.tiktoken").read_text().splitlines(keepends=True)
    (folder / "tokenizer.tiktoken").write_text("".join(text[:5] + ["!!not base64!! 5\n"] + text[6:]))
    return folder / "tokenizer.tiktoken", "has changed since the cache was written"


def id_out_of_vocabulary(folder):
    """An id past the vocabulary, with meta.json's checksum made to match (a foreign tool)."""
    meta = json.loads((folder / "meta.json").read_text())
    ids = np.fromfile(folder / "val.bin", dtype=np.uint16)
    ids[7] = meta["vocab_size"]
    ids.tofile(folder / "val.bin")
    meta["checksums"]["val.bin"] = hashlib.sha256(ids.tobytes()).hexdigest()
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder / "val.bin", f"holds id {ids[7]}, outside the vocabulary of {meta['vocab_size']} tokens"


@pytest.mark.parametrize("damage", [reverse_ids, damage_tokenizer, id_out_of_vocabulary])
def test_a_changed_token_cache_is_refused_by_training_and_evaluation(trained_run, tmp_path, damage):
    shutil.copytree(trained_run[0] / "data", tmp_path / "data")
    folder = tmp_path / "data" / "corpus-txt-bpe-300"
    changed, named = damage(folder)
    before = snapshot(tmp_path)
    trained = error_of(train.main, tiny_run_args(trained_run[0], "--data_dir", str(tmp_path / "data"),
                                                 "--out_dir", str(tmp_path / "out"), "--max_steps", "1"))
    evaluated = error_of(eval_ppl.main, ["--ckpt", str(trained_run[1] / "ckpt.pt"), "--lengths", "16",
                                         "--data_dir", str(tmp_path / "data"), "--out", str(tmp_path / "p.json")])
    for message in (trained, evaluated):
        assert f"token cache file {changed} {named}" in message and f"delete the folder {folder} to rebuild" in message
    assert snapshot(tmp_path) == before  # no run folder, no results, the cache as it was


def test_processes_that_build_the_same_cache_at_once_take_turns(tmp_path):
    source = corpus_file(tmp_path)
    start = threading.Barrier(3)
    logs, failures = [[], [], []], []

    def build(log):
        start.wait()
        try:
            token_cache.prepare_data(str(source), vocab_size=300, cache_dir=tmp_path / "data", log=log.append)
        except Exception as error:  # reported below
            failures.append(error)

    builders = [threading.Thread(target=build, args=(log,)) for log in logs]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join()
    assert not failures
    assert sum(any(line.startswith("wrote ") for line in log) for log in logs) == 1  # one built, two used it
    folder = tmp_path / "data" / "corpus-txt-bpe-300"
    assert sorted(p.name for p in folder.iterdir()) == ["build.lock", "meta.json", "tokenizer.tiktoken", "train.bin",
                                                        "val.bin"]  # no .tmp left
