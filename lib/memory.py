"""
memory.py: what a request will take in memory, estimated before any of it is allocated, and what
the machine has; check() refuses a request that cannot fit, in one line with both numbers, so that
a size no machine has ends at once instead of in an allocator traceback or the kernel's OOM killer.

The estimates count 4-byte floats per token of a forward, with coefficients fitted to the live
peaks of a fresh process on a CPU, a little above them (tests/test_faults_memory.py measures those
peaks and holds the estimates within a factor of 1.5):

    training    16 bytes a trained parameter (weights, gradients, AdamW's two moments), 4 a frozen
                one, and per token of the batch TRAIN_C x n_embd floats a layer, saved for the
                backward pass, TRAIN_E x n_embd outside the layers (embedding, final norm), and
                TRAIN_V x vocab_size for the logits, their loss and its gradient
    forward     without gradients: FORWARD_C x n_embd floats a token live in the layer at work, and
                FORWARD_V x vocab_size for the logits and their loss where all logits are formed
    generation  the forward of the prompt, and the key/value cache: GENERATE_C x n_embd a layer
    rotary      the cos/sin tables, built once for the longest position: head_dim floats a position
                (RoPE, CoPE; twice that while they are built), n_embd a position in every layer that
                holds its own (FoPE; and 1.5 times that while one is built)
    attention   SDPA's is_causal kernels never form the T x T scores; a bias-carrying attention
                (ALiBi) forms at most fope_gpt.BIAS_ELEMENTS bias entries a block, and in training
                keeps every block's bias for the backward pass: about 5/8 x n_head x T^2 a layer

What the machine has: the free memory of the GPU, or on a CPU the least of MemAvailable in
/proc/meminfo, what the cgroup's memory.max leaves, and what the address-space limit (ulimit -v,
prlimit --as) leaves. Where none of them can be read, nothing is refused.
"""

import dataclasses
import os
import resource

import torch

from fope_gpt import BIAS_ELEMENTS, GPTConfig, kept_frequencies
from lib.files import UserError

FLOAT = 4          # bytes: every activation is counted as float32 (bf16 autocast stores some in 2)
TRAIN_C = 26
TRAIN_E = 8
TRAIN_V = 3
FORWARD_C = 22
FORWARD_V = 3
GENERATE_C = 5
ALIBI_FORWARD_C = 1  # ALiBi's blocked attention keeps a little more a layer, even without gradients


class MemoryRefused(UserError):
    """A request that cannot fit in the memory this machine has."""


def human(size):
    """Bytes in words: '512 MB', '4.6 PB'."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB", "EB"):
        if size < 1000 or unit == "EB":
            return f"{size:.3g} {unit}" if unit != "bytes" else f"{int(size)} bytes"
        size /= 1000
    return f"{size:.3g} EB"


# -----------------------------------------------------------------------------
# the model


def fope_shape(config):
    """(K, M) of FoPE's coefficients: kept frequencies and position-carrying pairs."""
    d = config.head_dim
    K = len(kept_frequencies(d, config.train_len, config.rope_theta, clip=config.fope_cf))
    return K, (min(K, d // 4) if (config.fope_cap and config.fope_fs and config.fope_cf) else K)


def parameters(config):
    """(trained, frozen) parameter counts of a GPT of this config, without building it."""
    C, L = config.n_embd, config.n_layer
    per_layer = 16 * C * C + 2 * C + (2 * config.head_dim if config.qk_norm else 0)  # qkv, proj, up, down, norms
    trained, frozen = 2 * config.vocab_size * C + L * per_layer + C, 0
    if config.pe == "fope":
        K, M = fope_shape(config)
        coefficients = 2 * config.n_head * K * M * (1 if config.fope_shared else L)
        trained, frozen = (trained + coefficients, 0) if config.fope_learnable else (trained, coefficients)
    return trained, frozen


def table_bytes(config, positions, modules=None):
    """The rotary tables for `positions` positions (twice that while they are built)."""
    if config.pe in ("alibi", "nope"):
        return 0
    if config.pe != "fope":
        return 2 * FLOAT * positions * config.head_dim
    modules = modules or (1 if config.fope_shared else config.n_layer)
    return FLOAT * positions * config.n_embd * (2 * modules + 3) // 2  # and 1.5 modules' while one is built


def training_bytes(config, batch_size):
    """The peak of a training step of `batch_size` sequences of config.train_len tokens."""
    trained, frozen = parameters(config)
    T, C, L = config.train_len, config.n_embd, config.n_layer
    per_token = (L * TRAIN_C + TRAIN_E) * C + TRAIN_V * config.vocab_size
    need = 16 * trained + FLOAT * frozen + FLOAT * batch_size * T * per_token
    if config.pe == "alibi":  # every block's bias, kept for the backward pass
        need += FLOAT * (L * config.n_head * T * T * 5 // 8 + min(config.n_head * T * T, BIAS_ELEMENTS))
    return need + table_bytes(config, T)


def forward_bytes(config, batch, length, logits=True):
    """The peak of a forward of (batch, length) tokens without gradients, beyond the weights: with
    the logits of every position and their loss (logits=True), or of the last one only."""
    tokens = batch * length
    per_token = FORWARD_C * config.n_embd + (FORWARD_V * config.vocab_size if logits else 0)
    need = FLOAT * tokens * per_token
    if config.pe == "alibi":
        bias = min(config.n_head * length * length, BIAS_ELEMENTS)  # one block's, shared by the batch
        need += FLOAT * (tokens * config.n_layer * ALIBI_FORWARD_C * config.n_embd + bias)
    return need + table_bytes(config, length)


def generation_bytes(config, batch, length):
    """The peak of generating after a prompt, `length` tokens in all: the prompt's forward and
    the key/value cache of every layer."""
    cache = FLOAT * batch * length * GENERATE_C * config.n_embd * config.n_layer
    return forward_bytes(config, batch, length, logits=False) + cache


def analysis_bytes(config, text_tokens, max_distance, lengths, trials):
    """(bytes, host bytes) of analyze.py's peak: its forward over text_tokens, which keeps every
    layer's q and k (2 x n_embd a layer); the rotary tables of the analysed layer out to
    max_distance; or the retrieval attention (batches of 8 prompts) at its longest length."""
    C, L = config.n_embd, config.n_layer
    capture = FLOAT * text_tokens * (2 * L * C + max(FORWARD_C * C, config.vocab_size))
    if config.pe == "alibi":
        capture += FLOAT * (text_tokens * L * ALIBI_FORWARD_C * C + 3 * BIAS_ELEMENTS)
    distances = table_bytes(config, config.train_len + max_distance, modules=1)
    longest = max(lengths) if lengths else 0
    attention = forward_bytes(config, 8, longest, logits=False) + FLOAT * 8 * longest * 2 * L * C if longest else 0
    return max(capture, distances, attention), 8 * trials * longest


def config_of(settings, vocab_size=None):
    """The GPTConfig of train.py's settings (a dict), with the vocabulary the data will have."""
    fields = {f.name: settings[f.name] for f in dataclasses.fields(GPTConfig)}
    return GPTConfig(**{**fields, **({"vocab_size": vocab_size} if vocab_size else {})})


# -----------------------------------------------------------------------------
# the machine


def available(device):
    """(bytes free for a request, where that number comes from), or (None, None) if unknown."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device} ({torch.cuda.get_device_name(device)})"
    found = []
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        found.append((int(fields["MemAvailable"].split()[0]) * 1024, "available (MemAvailable in /proc/meminfo)"))
    except (OSError, KeyError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                found.append((int(limit) - int(f.read()), "left under the cgroup's memory.max"))
    except (OSError, ValueError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm") as f:
                used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            found.append((max(0, soft - used), "left under the address-space limit (ulimit -v)"))
        except (OSError, ValueError):
            pass
    return min(found) if found else (None, None)


def check(what, need, device, advice, host=0):
    """Raise MemoryRefused if `need` bytes on `device` (and `host` bytes of host memory besides)
    cannot fit: '<what> needs about 4.6 PB of memory (estimate), more than the 18 GB available
    here (MemAvailable in /proc/meminfo); <advice>'."""
    wanted = [(need + host, "cpu")] if not device.startswith("cuda") else [(need, device), (host, "cpu")]
    for size, where in wanted:
        have, source = available(where)
        if have is not None and size > have:
            raise MemoryRefused(f"{what} needs about {human(size)} of {'GPU ' if where != 'cpu' else ''}memory "
                                f"(estimate), more than the {human(have)} {source}; {advice}")


# -----------------------------------------------------------------------------
# the scripts' requests


def check_training(settings, world, device):
    """Refuse a training run (train.py's settings) whose step cannot fit: each of the `world`
    processes holds the model and its rows of the batch; on a CPU they share its memory."""
    vocab = 50257 if settings["tokenizer"] == "gpt2" else settings["vocab_size"]  # the data's, at most
    config = config_of(settings, vocab)
    need = training_bytes(config, max(1, settings["batch_size"] // world)) * (1 if device.startswith("cuda") else world)
    check(f"a training step of --batch_size {settings['batch_size']} x --train_len {config.train_len} "
          f"(n_layer {config.n_layer}, n_embd {config.n_embd})" + (f" on {world} processes" if world > 1 else ""),
          need, device, "lower --batch_size or --train_len, or train a smaller model")


def check_lengths(what, lengths, device, need, advice):
    """Refuse an evaluation whose most demanding length cannot fit: need(length) gives (bytes on the
    device, bytes of host memory, sequences a forward) at that length."""
    worst = max(lengths, key=lambda length: sum(need(length)[:2]))
    on_device, on_host, batch = need(worst)
    check(f"{what} at length {worst} ({batch} sequence{'s' if batch > 1 else ''} a forward)", on_device, device,
          advice, on_host)
