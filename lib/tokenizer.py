"""
tokenizer.py: a small byte-level BPE trainer whose result is loaded into tiktoken for fast
encoding and decoding, and the tokenizer's state as a checkpoint carries it.

The pre-tokenizer is GPT-2's, except that every digit is a piece of its own, so that a number
such as a passkey is always tokenized digit by digit. The vocabulary is the 256 bytes, the
merges in the order they were learned, and one special end-of-text token with the last id.
"""

import base64
import heapq
from collections import Counter, defaultdict
from pathlib import Path

import regex
import tiktoken

EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer, except that every digit is a pre-token of its own (GPT-2 has
# " ?\p{N}+"), so a number such as a passkey is always tokenized digit by digit,
# whatever surrounds it.
SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++|\p{N}| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


def count_pretokens(texts):
    """Count how often each pre-token (a piece the BPE may never merge across) occurs."""
    counts = Counter()
    for text in texts:
        counts.update(regex.findall(SPLIT_PATTERN, text))
    return counts


def merge_pair(word, pair, new_id):
    """Replace every non-overlapping occurrence of pair in word (left to right) by new_id."""
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(new_id)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def train_bpe(texts, vocab_size):
    """Train a byte-level BPE; return its ranks {token bytes: id} in merge order.

    vocab_size counts the 256 byte tokens, the merges and one special end-of-text
    token, which is left out of the ranks and gets id len(ranks). The text is cut
    into pre-tokens once; each merge then updates only the words that contain the
    merged pair, and a heap of (count, pair) finds the next most frequent pair.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab size {vocab_size} is too small: BPE needs 256 byte tokens + end of text")
    counts = count_pretokens(texts)
    words = [list(piece.encode("utf-8")) for piece in counts]
    freqs = list(counts.values())
    pair_counts = Counter()
    words_with_pair = defaultdict(set)
    for index, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[index]
            words_with_pair[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    token_bytes = [bytes([b]) for b in range(256)]
    ranks = {token: rank for rank, token in enumerate(token_bytes)}
    while len(ranks) < vocab_size - 1 and heap:
        negative_count, pair = heapq.heappop(heap)
        if pair_counts[pair] != -negative_count:
            continue  # an outdated heap entry; the pair's current count was pushed too
        merged_bytes = token_bytes[pair[0]] + token_bytes[pair[1]]
        # Two different pairs can spell the same bytes ("ab"+"c", "a"+"bc"); tiktoken
        # identifies a token by its bytes, so they share one id.
        if merged_bytes not in ranks:
            ranks[merged_bytes] = len(token_bytes)
            token_bytes.append(merged_bytes)
        new_id = ranks[merged_bytes]
        changed = set()
        for index in words_with_pair.pop(pair):
            word, freq = words[index], freqs[index]
            for old in zip(word, word[1:]):
                pair_counts[old] -= freq
                changed.add(old)
            word = words[index] = merge_pair(word, pair, new_id)
            for new in zip(word, word[1:]):
                pair_counts[new] += freq
                words_with_pair[new].add(index)
                changed.add(new)
        for changed_pair in changed:
            if pair_counts[changed_pair] > 0:
                heapq.heappush(heap, (-pair_counts[changed_pair], changed_pair))
    return ranks


def ranks_to_text(ranks):
    """Serialise ranks in tiktoken's file format: one 'base64(token bytes) rank' per line."""
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    return "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in ordered)


def ranks_from_text(text):
    """Parse tiktoken's ranks file format back into {token bytes: rank}."""
    ranks = {}
    for line in text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_encoding(name, ranks, pattern=SPLIT_PATTERN, special_tokens=None):
    """Make a tiktoken Encoding; by default the only special token is end-of-text, last id."""
    if special_tokens is None:
        special_tokens = {EOT: len(ranks)}
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)


def encoding_from_ranks_file(path, pattern=SPLIT_PATTERN, special_tokens=None, name=None):
    """Load a tiktoken Encoding from a ranks file (tiktoken's format, as written by prepare_data)."""
    path = Path(path)
    ranks = ranks_from_text(path.read_text(encoding="ascii"))
    return build_encoding(name or path.stem, ranks, pattern, special_tokens)


def tokenizer_state(enc):
    """Describe a tiktoken Encoding as a JSON-serialisable dict, so a checkpoint can carry it."""
    # _pat_str, _mergeable_ranks and _special_tokens are how tiktoken's README extends an encoding.
    return {
        "name": enc.name,
        "pattern": enc._pat_str,
        "special_tokens": dict(enc._special_tokens),
        "ranks": ranks_to_text(enc._mergeable_ranks),
    }


def encoding_from_state(state):
    """Rebuild the tiktoken Encoding described by tokenizer_state()."""
    ranks = ranks_from_text(state["ranks"])
    return build_encoding(state["name"], ranks, state["pattern"], state["special_tokens"])
