"""
passkey.py: the passkey-retrieval task, shared by training (a passkey mix) and evaluation:
the prompts, how an answer is scored, the trials of an evaluation, and the copying measured
digit by digit (retrieval.py measures where the answer position looks).

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
import torch


TASK = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize them. I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ANSWER = " {key}."
MAX_KEY = 50_000  # keys are uniform in 1..MAX_KEY
TRIAL_SEED = 1234  # the default seed of an evaluation's keys and depths (eval_passkey.py, analyze.py)


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
    never learns retrieval (EXPERIMENTS.md). The needle's own repetition is meant as an easy first
    step: a copy over a few tokens, which the answer repeats over up to seq_len tokens.
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


# -----------------------------------------------------------------------------
# the trials of an evaluation, and how an answer is read


def trial_settings(seed, length, trials):
    """Keys and needle depths of the trials at one length, a function of (seed, length) only.

    Depths are stratified, one per interval [i/trials, (i+1)/trials), so every depth bucket
    gets its share of the trials; each is still uniform, as in the protocol.
    """
    rng = np.random.default_rng([seed, length])
    keys = rng.integers(1, MAX_KEY + 1, size=trials)
    depths = (np.arange(trials) + rng.random(trials)) / trials
    return keys.tolist(), depths.tolist()


def feasible_lengths(enc, lengths, seed, trials):
    """The lengths whose every trial prompt can hold the fixed text (task, needle, question)."""
    return [length for length in lengths
            if max(shortest_prompt_len(enc, key) for key in trial_settings(seed, length, trials)[0]) <= length]


def completion_text(enc, ids):
    """Decode all generated ids. The authors' script generates with eliminate_token_ids=False,
    so nothing stops at a newline or tab: the first number anywhere in the 10 tokens counts."""
    # A model whose vocabulary is padded past the tokenizer's can emit ids with no text.
    return enc.decode([i for i in ids if i < enc.n_vocab])


# -----------------------------------------------------------------------------
# why retrieval works or fails: digit by digit, with the true answer fed in (teacher forcing)


# The needle line with three more words between the key's two mentions: a copy that looked back
# a fixed number of tokens lands on the wrong token; a copy that looks up the key does not.
NEEDLE_FURTHER = "The pass key is {key}. Remember it very well now. {key} is the pass key."


def top_predictions(model, tokens, start, count, device):
    """The model's top prediction for each of tokens[start:start + count], given every token
    before it (teacher forcing): a list of `count` token ids."""
    idx = torch.tensor([tokens], device=device)  # (1, len(tokens))
    return model(idx)[0][0, start - 1:start - 1 + count].argmax(-1).tolist()


def later_digits_hits(predicted, digits):
    return [p == d for p, d in zip(predicted[1:], digits[1:])]


@torch.no_grad()
def teacher_forced_digits(model, enc, length, trials, seed, device):
    """On prompts of `length` tokens followed by the true answer: the share of first key digits,
    and of later ones, that are the model's top prediction. The first digit needs the needle
    found ("key is" -> digit); each later one is a copy of what followed the previous digit in
    the needle."""
    keys, depths = trial_settings(seed, length, trials)
    first, later = [], []
    for key, depth in zip(keys, depths):
        answer = enc.encode_ordinary(ANSWER.format(key=key))
        prompt = build_prompt(enc, length - len(answer), depth, key)
        digits = enc.encode_ordinary(str(key))
        start = len(prompt) + key_mentions(answer, digits)[0]
        predicted = top_predictions(model, prompt + answer, start, len(digits), device)
        first.append(predicted[0] == digits[0])
        later.extend(later_digits_hits(predicted, digits))
    return float(np.mean(first)), float(np.mean(later)) if later else float("nan")


@torch.no_grad()
def needle_repeat_digits(model, enc, length, trials, seed, device, needle_text):
    """The share of the later digits of the key's second mention inside the needle line
    ("... N is the pass key.") that are the model's top prediction, in prompts of `length`."""
    keys, depths = trial_settings(seed, length, trials)
    later = []
    for key, depth in zip(keys, depths):
        prompt = build_prompt(enc, length, depth, key, needle_text)
        digits = enc.encode_ordinary(str(key))
        repeat = key_mentions(prompt, digits)[1]
        later.extend(later_digits_hits(top_predictions(model, prompt, repeat, len(digits), device), digits))
    return float(np.mean(later)) if later else float("nan")
