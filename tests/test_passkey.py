"""
Passkey retrieval: the prompts, their scoring, the training sequences, and eval_passkey.py.
"""

import dataclasses
import json
import re
import types

import numpy as np
import pytest
import torch

import eval_passkey
from lib import passkey, retrieval
from lib import tokenizer
from conftest import byte_encoding, is_png, plotted_lines, run_script
from fope_gpt import GPT, POSITION_EMBEDDINGS, GPTConfig


def word_encoding():
    """A small BPE trained on the prompt's own text: whole filler words become single tokens,
    so a prompt needs far fewer tokens than characters."""
    text = passkey.TASK + "\n" + (passkey.FILLER + " ") * 20 + passkey.NEEDLE + passkey.QUESTION
    return tokenizer.build_encoding("words", tokenizer.train_bpe([text], vocab_size=400))


ENCODINGS = {"bytes": byte_encoding, "words": word_encoding}


def find_sublist(haystack, needle):
    """Index of the first occurrence of the list `needle` inside the list `haystack`."""
    for start in range(len(haystack) - len(needle) + 1):
        if haystack[start:start + len(needle)] == needle:
            return start
    raise AssertionError("needle not found")


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("target_len", [260, 301, 1000, 5000])
@pytest.mark.parametrize("key", [7, 12345, 50000])
def test_prompt_has_exact_length_and_the_key_only_in_the_needle(encoding, target_len, key):
    enc = ENCODINGS[encoding]()
    for depth in (0.0, 0.37, 1.0):
        prompt = passkey.build_prompt(enc, target_len, depth, key)
        assert len(prompt) == target_len
        text = enc.decode(prompt)
        assert text.startswith(passkey.TASK + "\n") and text.endswith("\n" + passkey.QUESTION)
        assert passkey.NEEDLE.format(key=key) in text
        assert re.findall(r"\d+", text) == [str(key), str(key)]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_sits_at_the_requested_depth(encoding, depth):
    enc, key, target_len = ENCODINGS[encoding](), 4321, 2000
    head, needle, tail = passkey.fixed_tokens(enc, key)
    num_filler = target_len - len(head) - len(needle) - len(tail)
    prompt = passkey.build_prompt(enc, target_len, depth, key)
    num_prefix = find_sublist(prompt, needle) - len(head)
    assert abs(num_prefix - depth * num_filler) <= 1
    # both filler parts are cut from the start of the repeated filler
    suffix = prompt[len(head) + num_prefix + len(needle):-len(tail)]
    assert enc.decode(suffix) == enc.decode(passkey.filler_tokens(enc, len(suffix)))
    assert enc.decode(passkey.filler_tokens(enc, 200)).startswith(passkey.FILLER + " " + passkey.FILLER[:50])


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_too_short_prompt_raises(encoding):
    enc = ENCODINGS[encoding]()
    shortest = passkey.shortest_prompt_len(enc, 12345)
    assert len(passkey.build_prompt(enc, shortest, 0.5, 12345)) == shortest
    with pytest.raises(ValueError):
        passkey.build_prompt(enc, shortest - 1, 0.5, 12345)
    with pytest.raises(ValueError):
        passkey.build_prompt(enc, 50, 0.5, 12345)


@pytest.mark.parametrize(
    "text, key, correct",
    [
        (" 12345.", 12345, True),                 # the trained answer format
        ("12345", 12345, True),
        (" the key is 12345 and 999", 12345, True),  # leading text, first number counts
        (" 999 then 12345", 12345, False),        # only the first number counts
        (" 123456.", 12345, False),               # extra digits
        (" 1234.", 12345, False),                 # missing digit
        (" 12,345", 12345, False),                # the first run of digits is 12
        (" no number here", 12345, False),
        ("", 12345, False),
    ],
)
def test_score(text, key, correct):
    assert passkey.score(text, key) is correct


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("seed", range(5))
def test_training_sequence_has_loss_only_where_the_key_is_copied(encoding, seed):
    enc, seq_len = ENCODINGS[encoding](), 400
    eot = enc.eot_token
    x, y = passkey.training_sequence(enc, np.random.default_rng(seed), seq_len, eot)
    assert x.shape == y.shape == (seq_len,) and x.dtype == y.dtype == np.int64
    assert x[: len(enc.encode_ordinary(passkey.TASK))].tolist() == enc.encode_ordinary(passkey.TASK)
    key = int(re.search(r"\d+", enc.decode(x.tolist())).group())
    targets = np.flatnonzero(y != -1)
    num_digits = len(str(key))
    repeat, answer_positions = targets[:num_digits], targets[num_digits:]
    # the key's second mention in the needle line: "Remember it. N is the pass key."
    assert repeat.tolist() == list(range(repeat[0], repeat[0] + num_digits))
    assert enc.decode(y[repeat].tolist()) == str(key)
    assert enc.decode(x[:repeat[0] + 1].tolist()).rstrip().endswith("Remember it.")
    # the answer after the question
    assert answer_positions.tolist() == list(range(answer_positions[0], answer_positions[-1] + 1))
    assert enc.decode(y[answer_positions].tolist()) == f" {key}."
    prompt_end = answer_positions[0] + 1  # the first answer token's input position
    assert enc.decode(x[:prompt_end].tolist()).endswith(passkey.QUESTION)
    assert (y[targets[:-1]] == x[targets[:-1] + 1]).all()  # targets are the next inputs
    assert (x[prompt_end + len(answer_positions):] == eot).all()  # padding after the answer
    x_again, y_again = passkey.training_sequence(enc, np.random.default_rng(seed), seq_len, eot)
    assert (x == x_again).all() and (y == y_again).all()


@pytest.mark.parametrize("seed", range(3))
def test_with_loss_on_the_answer_only_the_needle_repeat_carries_no_loss(seed):
    enc = byte_encoding()
    both = passkey.training_sequence(enc, np.random.default_rng(seed), 400, 256)
    x, y = passkey.training_sequence(enc, np.random.default_rng(seed), 400, 256, loss_on="answer")
    assert (x == both[0]).all()  # the same sample; only where the loss falls differs
    key = int(re.search(r"\d+", enc.decode(x.tolist())).group())
    targets = np.flatnonzero(y != -1)
    assert targets.tolist() == list(range(targets[0], targets[0] + len(f" {key}.")))
    assert enc.decode(y[targets].tolist()) == f" {key}." and set(targets) < set(np.flatnonzero(both[1] != -1))


def test_a_completion_is_scored_whole_as_the_authors_do():
    # their generate runs with eliminate_token_ids=False: a newline before the key does not end it
    enc = byte_encoding()
    ids = enc.encode_ordinary("\n\t12345 is it")
    assert passkey.score(passkey.completion_text(enc, ids), 12345)


def test_training_sequence_spans_lengths_and_rejects_a_short_seq_len():
    enc = byte_encoding()
    rng = np.random.default_rng(0)
    answer_ends = [np.flatnonzero(passkey.training_sequence(enc, rng, 600, 256)[1] != -1)[-1] for _ in range(200)]
    assert min(answer_ends) < 300 and max(answer_ends) > 550 and max(answer_ends) <= 599
    with pytest.raises(ValueError):
        passkey.training_sequence(enc, rng, 100, 256)


def test_trial_settings_depend_on_seed_and_length_only():
    keys, depths = passkey.trial_settings(1234, 256, 100)
    assert (keys, depths) == passkey.trial_settings(1234, 256, 100)
    assert keys != passkey.trial_settings(1234, 512, 100)[0]
    assert keys != passkey.trial_settings(1, 256, 100)[0]
    assert all(1 <= key <= passkey.MAX_KEY for key in keys)
    assert np.bincount((np.array(depths) * 5).astype(int), minlength=5).tolist() == [20] * 5


class InductionOracle(torch.nn.Module):
    """A stand-in model that does exactly what an induction circuit does: at every position it
    predicts the token that followed the most recent earlier occurrence of the current token."""

    def __init__(self, vocab_size, train_len):
        super().__init__()
        self.config = types.SimpleNamespace(vocab_size=vocab_size, train_len=train_len)

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        for b, row in enumerate(idx.tolist()):
            next_of = {}
            for t, token in enumerate(row):
                if token in next_of:
                    logits[b, t, next_of[token]] = 30.0
                if t + 1 < len(row):
                    next_of[token] = row[t + 1]
        return logits, None


class FixedOffsetOracle(torch.nn.Module):
    """A stand-in model that copies the token a fixed number of positions back: the shortcut
    that predicts the needle's repeat of a five-digit key without looking the key up."""

    def __init__(self, vocab_size, train_len, offset):
        super().__init__()
        self.config = types.SimpleNamespace(vocab_size=vocab_size, train_len=train_len)
        self.offset = offset

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for t in range(self.offset - 1, len(row)):
                logits[b, t, row[t + 1 - self.offset]] = 30.0
        return logits, None


def test_digit_diagnostics_tell_a_lookup_from_a_fixed_offset_copy():
    enc = byte_encoding()
    induction = InductionOracle(257, 320)
    first_digit, later_digits = passkey.teacher_forced_digits(induction, enc, 320, 20, 0, "cpu")
    # token-level copying finds the later digits (all but those after a digit the key repeats);
    # the first digit needs a two-token match ("key is" -> digit), which one-token copying lacks
    assert later_digits > 0.5 and first_digit == 0.0
    repeat = [passkey.needle_repeat_digits(induction, enc, 320, 20, 0, "cpu", needle)
              for needle in (passkey.NEEDLE, passkey.NEEDLE_FURTHER)]
    assert min(repeat) > 0.5  # a lookup does not care how far back the first mention is
    offset = len(enc.encode_ordinary("12345. Remember it. "))  # first to second mention of a 5-digit key
    shortcut = FixedOffsetOracle(257, 320, offset)
    as_trained, further = [passkey.needle_repeat_digits(shortcut, enc, 320, 20, 0, "cpu", needle)
                           for needle in (passkey.NEEDLE, passkey.NEEDLE_FURTHER)]
    assert as_trained > 0.8 and further < 0.2
    assert passkey.teacher_forced_digits(shortcut, enc, 320, 20, 0, "cpu")[1] < 0.2  # no use for the answer


def save_tiny_checkpoint(path, pe="fope"):
    """A random-weight 1-layer model with a byte-level tokenizer, saved like a training run."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=32, train_len=64, pe=pe)
    state = {
        "model_config": dataclasses.asdict(config),
        "model": GPT(config).state_dict(),
        "step": 0,
        "tokenizer": tokenizer.tokenizer_state(byte_encoding()),
    }
    torch.save(state, path)


@pytest.mark.parametrize("pe", POSITION_EMBEDDINGS)
def test_the_answer_attention_reproduces_each_layers_output(pe):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, train_len=16, pe=pe)).eval()
    idx = torch.randint(64, (2, 40))  # past train_len
    inputs, outputs = [], []
    hooks = [hook for block in model.blocks for hook in (
        block.attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0])),
        block.attn.register_forward_hook(lambda module, args, out: outputs.append(out)))]
    weights, predicted = retrieval.last_position_attention(model, idx)  # (B, n_layer, H, T), (B,)
    for hook in hooks:
        hook.remove()
    assert weights.shape == (2, 2, 2, 40) and torch.allclose(weights.sum(-1), torch.ones(2, 2, 2))
    with torch.no_grad():
        assert torch.equal(predicted, model(idx)[0][:, -1].argmax(-1))
    for layer, block in enumerate(model.blocks):
        x = inputs[layer]                                                   # (B, T, C)
        v = block.attn.qkv(x)[..., 64:].view(2, 40, 2, 16).transpose(1, 2)   # (B, H, T, d)
        y = torch.einsum("bht,bhtd->bhd", weights[:, layer], v).reshape(2, 32)  # heads side by side
        assert torch.allclose(block.attn.proj(y), outputs[layer][:, -1], atol=1e-5)


def test_the_answer_position_is_the_one_that_predicts_the_keys_first_digit():
    enc = byte_encoding()
    for key, depth in zip(*passkey.trial_settings(0, 300, 4)):
        tokens = retrieval.prompt_to_first_digit(enc, 300, depth, key)
        assert len(tokens) == 300 and enc.decode(tokens).endswith(passkey.QUESTION + " ")  # the answer's space
        assert enc.decode(tokens + enc.encode_ordinary(str(key))).endswith(passkey.ANSWER.format(key=key)[:-1])


def test_attention_spread_evenly_puts_on_the_key_its_share_of_the_tokens():
    enc = byte_encoding()
    model = GPT(GPTConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=32, train_len=300, pe="nope")).eval()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[:32] = 0  # q = 0: every logit equal, attention even
    distance, weight, entropy, _ = retrieval.attention_on_key(model, enc, 300, 4, seed=0, device="cpu")
    keys, depths = passkey.trial_settings(0, 300, 4)
    for i, (key, depth) in enumerate(zip(keys, depths)):
        prompt = retrieval.prompt_to_first_digit(enc, 300, depth, key)
        digits = enc.encode_ordinary(str(key))
        assert distance[i] == 299 - passkey.key_mentions(prompt, digits)[0]
        assert np.allclose(weight[i], 2 * len(digits) / 300)  # both mentions of the key
        assert np.allclose(entropy[i], np.log(300))
    assert np.all(np.diff(distance) < 0)  # stratified depths: the later needles are nearer the answer


def test_the_retrieval_head_is_the_one_that_looks_at_the_key_at_train_len():
    enc = byte_encoding()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, n_layer=2, n_head=2, n_embd=32, train_len=300, pe="alibi")).eval()
    found = retrieval.retrieval_attention(model, enc, [150, 300, 600], trials=4, seed=0, device="cpu")
    assert list(found["lengths"]) == ["300", "600"] and found["reference_length"] == 300  # 150 holds no prompt
    head_weight = np.array(found["head_weight"])
    assert head_weight[found["layer"], found["head"]] == head_weight.max()
    _, weight, _, first_digit = retrieval.attention_on_key(model, enc, 300, 4, seed=0, device="cpu")
    assert np.allclose(found["lengths"]["300"]["weight"], weight[:, found["layer"], found["head"]])
    assert found["lengths"]["300"]["first_digit_accuracy"] == first_digit.mean()
    at_600 = found["lengths"]["600"]
    near = [w for d, w in zip(at_600["distance"], at_600["weight"]) if d < 300]
    assert np.isclose(at_600["mean_weight_near"], np.mean(near))
    assert found["lengths"]["300"]["mean_weight_far"] is None  # within train_len every needle is near
    assert "skipped" in retrieval.retrieval_attention(model, enc, [150, 600], trials=4, seed=0, device="cpu")


def test_eval_passkey_end_to_end(tmp_path):
    save_tiny_checkpoint(tmp_path / "fope.pt", "fope")
    save_tiny_checkpoint(tmp_path / "rope.pt", "rope")
    out = tmp_path / "res" / "pk.json"
    result = run_script(
        "eval_passkey.py", "--ckpt", tmp_path / "fope.pt", tmp_path / "rope.pt", "--trials", 4, "--lengths", "128,256",
        "--out", out, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    _, depths = passkey.trial_settings(1234, 256, 4)  # the default --seed
    counts = [sum(min(int(depth * 5), 4) == bucket for depth in depths) for bucket in range(5)]
    assert results["settings"]["lengths"] == [128, 256] and results["settings"]["trials"] == 4
    assert [record["pe"] for record in results["checkpoints"]] == ["fope", "rope"]
    for record in results["checkpoints"]:
        assert record["train_len"] == 64 and record["trials"] == 4
        assert record["skipped_lengths"] == [128]  # the byte-level fixed text needs ~250 tokens
        # accuracy is a share of the 4 trials, and the trials' share in each depth bucket adds up to it
        by_depth, accuracy = record["accuracy_by_depth"]["256"], record["accuracy"]["256"]
        assert len(by_depth) == 5 and accuracy * 4 == round(accuracy * 4)
        assert [v is None for v in by_depth] == [c == 0 for c in counts]
        assert accuracy == pytest.approx(sum(v * c for v, c in zip(by_depth, counts) if c) / 4)
        assert "diagnostics" not in record  # train_len 64 cannot hold a prompt
    assert is_png(tmp_path / "res" / "pk.png") and is_png(tmp_path / "res" / "pk_heatmap.png")
    # the figures show the JSON's numbers: accuracy at the lengths evaluated, and per depth bucket
    records, labels = results["checkpoints"], ["fope", "rope"]
    curves = plotted_lines(eval_passkey.draw_accuracy(records, labels, [128, 256]).axes[0])
    assert curves == {label: ([256], [record["accuracy"]["256"]]) for label, record in zip(labels, records)}
    panels = eval_passkey.draw_heatmaps(records, labels, [128, 256], 5).axes[:2]  # the colour bar comes last
    for ax, record in zip(panels, records):
        shown = ax.get_images()[0].get_array().filled(np.nan)  # (depth bucket, length)
        expected = [[np.nan, np.nan if v is None else v] for v in record["accuracy_by_depth"]["256"]]
        np.testing.assert_array_equal(shown, expected)  # 128 is skipped: grey


def test_eval_passkey_bad_input_fails_cleanly(tmp_path):
    out = tmp_path / "pk.json"
    out.write_text("earlier results")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    save_tiny_checkpoint(tmp_path / "good.pt")
    for bad_ckpt in ("missing.pt", "corrupt.pt"):
        result = run_script("eval_passkey.py", "--ckpt", tmp_path / "good.pt", tmp_path / bad_ckpt, "--out", out,
                            cwd=tmp_path)
        assert result.returncode != 0
        assert result.stderr.startswith("eval_passkey.py: error:") and len(result.stderr.strip().splitlines()) == 1
    for bad_option in (["--lengths", "128,abc"], ["--lengths", "0"], ["--trials", "0"], ["--bogus"],
                       ["--lengths", "10"]):  # no length can hold a prompt: an error, not a silent exit 0
        with pytest.raises(SystemExit) as exit_info:
            eval_passkey.main(["--ckpt", str(tmp_path / "good.pt"), "--out", str(out), *bad_option])
        assert exit_info.value.code != 0
    assert out.read_text() == "earlier results"
    assert not (tmp_path / "pk.png").exists()
