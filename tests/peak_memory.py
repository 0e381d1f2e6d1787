"""
The resident-set peaks of a training step and of a generation for the model config given as JSON,
each beyond what was resident before it (Linux: VmHWM, reset through /proc/self/clear_refs), printed
as JSON. tests/test_faults_memory.py runs it in a fresh process, so that nothing an earlier test left
resident counts:

    MALLOC_MMAP_THRESHOLD_=65536 python tests/peak_memory.py '{"n_layer": 2, "vocab_size": 300}'
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from fope_gpt import GPT, GPTConfig  # noqa: E402


def resident(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def peak_of(work):
    work(1)  # one sequence first: the kernels' one-time buffers are not the request's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM starts again from what is resident now
    before = resident("VmRSS:")
    work(4)
    return resident("VmHWM:") - before


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GPTConfig(**json.loads(sys.argv[1]))
    model = GPT(config).eval()

    def train_step(batch):  # the weights, their gradients and AdamW's moments, the activations
        trained = GPT(config)
        optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], fused=True)
        x = torch.randint(0, config.vocab_size, (4 * batch, config.train_len))
        trained(x, x)[1].backward()
        optimizer.step()

    def generate(batch):  # the key-value cache of `batch` prompts of 1024 tokens
        model.generate(torch.randint(0, config.vocab_size, (batch, 1024)), 2)

    print(json.dumps({"training": peak_of(train_step), "generation": peak_of(generate)}))


if __name__ == "__main__":
    main()
