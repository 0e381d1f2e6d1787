"""
retrieval.py: where a passkey answer looks. The attention of the position that predicts the key's
first digit, in every layer and head, as prompts grow past train_len: does the head that finds the
needle within train_len lose it with distance, spread its attention over the longer prompt
(dilution), or neither? analyze.py runs it; the weights come from the model's own attention.
"""

import numpy as np
import torch

from lib.passkey import ANSWER, build_prompt, feasible_lengths, key_mentions, trial_settings


@torch.no_grad()
def last_position_attention(model, idx):
    """The attention weights of the last position of idx (B, T) in every layer and head:
    (B, n_layer, H, T) probabilities over the T positions; and the model's top prediction for the
    token after idx, (B,) token ids. Each layer's input is captured on the way through, and the
    layer's own CausalSelfAttention.weights turns it into weights (SDPA never forms them)."""
    inputs = []  # each layer's attention input, attn_norm(x): (B, T, C)
    hooks = [block.attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
             for block in model.blocks]
    try:
        predicted = model.lm_head(model.features(idx)[:, -1]).argmax(-1)  # (B,)
    finally:
        for hook in hooks:
            hook.remove()
    T = idx.shape[1]
    weights = [block.attn.weights(x, slice(T - 1, T))[:, :, 0] for block, x in zip(model.blocks, inputs)]  # (B, H, T) each
    return torch.stack(weights, dim=1), predicted


def prompt_to_first_digit(enc, length, depth, key):
    """`length` tokens: a passkey prompt, then the answer up to its first key digit (at byte level
    the answer's leading space), so that the last position is the one that predicts that digit."""
    answer = enc.encode_ordinary(ANSWER.format(key=key))
    lead = answer[:key_mentions(answer, enc.encode_ordinary(str(key)))[0]]
    return build_prompt(enc, length - len(lead), depth, key) + lead


@torch.no_grad()
def attention_on_key(model, enc, length, trials, seed, device, batch_size=8):
    """On the trial prompts of `length` tokens (prompt_to_first_digit), where the answer position
    (the last, which predicts the key's first digit) looks. Returns numpy arrays: distance
    (trials,), tokens from the answer position back to the needle's first key digit; weight
    (trials, n_layer, H), the attention it puts on the key's digits, both mentions; entropy
    (trials, n_layer, H), in nats, of its whole attention row (ln(length) if it attended evenly to
    every token); first_digit (trials,), whether the model's top prediction there is the key's
    first digit."""
    keys, depths = trial_settings(seed, length, trials)
    prompts = [prompt_to_first_digit(enc, length, depth, key) for key, depth in zip(keys, depths)]
    distance, weight, entropy, first_digit = [], [], [], []
    for start in range(0, trials, batch_size):
        batch = prompts[start:start + batch_size]
        rows, predicted = last_position_attention(model, torch.tensor(batch, device=device))  # (B, n_layer, H, length)
        for prompt, key, row, top in zip(batch, keys[start:start + batch_size], rows.cpu(), predicted.tolist()):
            digits = enc.encode_ordinary(str(key))
            mentions = key_mentions(prompt, digits)
            on_key = [m + i for m in mentions for i in range(len(digits))]
            distance.append(length - 1 - mentions[0])
            weight.append(row[..., on_key].sum(-1).numpy())
            entropy.append(-torch.special.xlogy(row, row).sum(-1).numpy())
            first_digit.append(top == digits[0])
    return np.array(distance), np.array(weight), np.array(entropy), np.array(first_digit)


def retrieval_attention(model, enc, lengths, trials, seed, device):
    """Why retrieval declines past train_len: because the needle lies further back than any
    distance seen in training (phases never trained), or because the answer's attention is spread
    over more tokens (dilution)? Finds the retrieval head, the (layer, head) whose answer position
    puts the most attention on the key in prompts of train_len tokens (or the longest that is no
    longer), then follows that head's weight on the key and its entropy over `lengths`, trial by
    trial with the needle's distance, and at each length how often the model's top prediction at
    the answer position is the key's first digit (the needle found, whatever comes after). A
    JSON-ready dict; lengths too short for a prompt are skipped.

    Reading it: if the weight on a needle within train_len of the answer falls as the prompt
    grows, the decline is dilution; if it holds there but falls for needles further back, it is
    distance."""
    train_len = model.config.train_len
    feasible = feasible_lengths(enc, lengths, seed, trials)
    within = [n for n in feasible if n <= train_len]
    if not within:
        return {"skipped": f"no length up to train_len {train_len} holds a passkey prompt"}
    measured = {n: attention_on_key(model, enc, n, trials, seed, device) for n in feasible}
    head_weight = measured[max(within)][1].mean(0)  # (n_layer, H)
    layer, head = (int(i) for i in np.unravel_index(head_weight.argmax(), head_weight.shape))
    per_length = {}
    for n, (distance, weight, entropy, first_digit) in measured.items():
        weight, entropy = weight[:, layer, head], entropy[:, layer, head]
        near = distance < train_len
        per_length[str(n)] = {
            "distance": distance.tolist(), "weight": weight.tolist(), "entropy": entropy.tolist(),
            "first_digit": first_digit.tolist(), "first_digit_accuracy": float(first_digit.mean()),
            "mean_weight": float(weight.mean()), "mean_entropy": float(entropy.mean()),
            # None where no trial falls on that side of train_len
            "mean_weight_near": float(weight[near].mean()) if near.any() else None,
            "mean_weight_far": float(weight[~near].mean()) if (~near).any() else None,
        }
    return {"layer": layer, "head": head, "reference_length": max(within), "trials": trials, "seed": seed,
            "head_weight": head_weight.tolist(), "lengths": per_length}
