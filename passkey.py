"""
passkey.py: the passkey-retrieval task, shared by training (a passkey mix) and evaluation.

A prompt hides one line, "The pass key is N. Remember it. N is the pass key.", at some depth
inside repeated filler text and ends with "What is the pass key? The pass key is"; the model
must continue with N. The fixed strings are the public benchmark's, verbatim (from
epfml/landmark-attention by way of jquesnelle/yarn, as in the authors' eval_passkey.py): five
pieces joined by newlines,

    task line \\n filler prefix \\n needle line \\n filler suffix \\n question

Deviation: prompts are assembled from tokens, so a prompt has exactly the requested number of
tokens and prompts of one length batch without padding. The authors cut the filler by
characters, in steps of 128, which leaves their prompts slightly shorter than nominal.
"""

import functools
import re

import numpy as np

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize them. I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ANSWER = " {key}."
MAX_KEY = 50_000  # keys are uniform in 1..MAX_KEY


def fixed_tokens(enc, key, needle_text=NEEDLE):
    """The prompt's three fixed pieces as token lists: (task line + "\\n",
    "\\n" + needle line + "\\n", "\\n" + question); the filler goes between them."""
    head = enc.encode_ordinary(TASK + "\n")
    needle = enc.encode_ordinary("\n" + needle_text.format(key=key) + "\n")
    tail = enc.encode_ordinary("\n" + QUESTION)
    return head, needle, tail


def shortest_prompt_len(enc, key):
    """Tokens of a prompt with no filler at all: the smallest possible target_len for this key."""
    return sum(len(piece) for piece in fixed_tokens(enc, key))


@functools.lru_cache(maxsize=16)
def repeated_filler(enc, repeats):
    """Token ids of the filler sentence repeated `repeats` times, joined by spaces."""
    return enc.encode_ordinary(" ".join([FILLER] * repeats))


def filler_tokens(enc, count):
    """The first `count` tokens of the repeated filler."""
    # Doubling the repetitions lets one cached tokenization serve many lengths.
    repeats = 64
    while len(repeated_filler(enc, repeats)) < count:
        repeats *= 2
    return repeated_filler(enc, repeats)[:count]


def build_prompt(enc, target_len, depth, key, needle_text=NEEDLE):
    """A passkey prompt of exactly target_len tokens with the needle line at relative depth
    `depth` (0: right after the task line, 1: right before the question). Returns a list of
    token ids. `needle_text` replaces the benchmark's needle line (for a diagnostic only)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head, needle, tail = fixed_tokens(enc, key, needle_text)
    num_filler = target_len - len(head) - len(needle) - len(tail)
    if num_filler < 0:
        raise ValueError(
            f"a prompt of {target_len} tokens cannot hold the fixed text ({target_len - num_filler} tokens)"
        )
    num_prefix = round(depth * num_filler)
    filler = filler_tokens(enc, num_filler)
    # Prefix and suffix are both cut from the start of the filler, as in the authors' generator.
    return head + filler[:num_prefix] + needle + filler[: num_filler - num_prefix] + tail


def key_mentions(tokens, digits):
    """Start index of every occurrence of the key's digit tokens in tokens (a list of ids).
    A prompt holds no other digits, so these are the needle's two mentions, then the answer's."""
    return [i for i in range(len(tokens)) if tokens[i:i + len(digits)] == digits]


def score(text, key):
    """True iff the first run of digits in the generated text is the key (no number: wrong)."""
    match = re.search(r"\d+", text)
    return match is not None and int(match.group()) == key


PASSKEY_LOSSES = ("answer+repeat", "answer")


def training_sequence(enc, rng, seq_len, eot, loss_on="answer+repeat"):
    """One passkey training sample of seq_len tokens: (x, y), int64 arrays of shape (seq_len,).

    x is a prompt of random length (from the shortest possible to seq_len minus the answer),
    random depth and random key, then the answer " N.", then end-of-text padding; y is x
    shifted by one, with every target set to -1 except those that predict the key where it
    must be copied: the answer and, with loss_on="answer+repeat", also its second mention in the
    needle line ("Remember it. N is ..."). Only those carry loss: with the whole sample as
    ordinary next-token loss a tiny model spends its capacity on the predictable filler and
    never learns retrieval (see EXPERIMENTS.md). The needle's own repetition is meant as the easy first
    step: a copy over a few tokens, which the answer repeats over up to seq_len tokens. ALiBi
    models learn it as that copy (a lookup of the key); rotary models learn it from a fixed
    offset instead, which does not carry over to the answer (eval_passkey.py's diagnostics).
    With loss on the answer alone, the default model had learned the answer's format but not
    retrieval after 1200 steps (0-1% even within train_len).
    """
    key = int(rng.integers(1, MAX_KEY + 1))
    answer = enc.encode_ordinary(ANSWER.format(key=key))
    shortest, longest = shortest_prompt_len(enc, key), seq_len - len(answer)
    if longest < shortest:
        raise ValueError(f"seq_len {seq_len} is too short for a passkey sample ({shortest + len(answer)} tokens)")
    prompt_len = int(rng.integers(shortest, longest + 1))
    depth = float(rng.random())
    tokens = build_prompt(enc, prompt_len, depth, key) + answer
    tokens += [eot] * (seq_len + 1 - len(tokens))  # (seq_len + 1,): inputs and shifted targets
    x = np.array(tokens[:-1], dtype=np.int64)
    y = np.full(seq_len, -1, dtype=np.int64)
    answer_targets = slice(prompt_len - 1, prompt_len - 1 + len(answer))  # positions that predict the answer
    y[answer_targets] = tokens[1:][answer_targets]
    if loss_on == "answer":
        return x, y
    digits = enc.encode_ordinary(str(key))  # one token per digit; no other digits in a prompt
    repeat = key_mentions(tokens, digits)[1]  # the needle's second mention
    repeat_targets = slice(repeat - 1, repeat - 1 + len(digits))  # positions that predict the repeat
    y[repeat_targets] = tokens[1:][repeat_targets]
    return x, y
