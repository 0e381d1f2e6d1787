"""
sample.py: what a trained model writes. Continue a prompt with any checkpoint.

    python sample.py --ckpt out/fope/ckpt.pt --prompt "ROMEO:"
    python sample.py --ckpt out/fope/ckpt.pt --prompt "KING:" --temperature 0.8 --top_k 40 --num_samples 3
    python sample.py --ckpt out/fope/ckpt.pt --prompt "ROMEO:" --temperature 0      # greedy

The prompt is tokenized by the checkpoint's own tokenizer; generation runs the prompt once and then
one token at a time against the model's key/value cache. A sample can run past the model's
train_len: that is where the position embeddings differ.
"""

import argparse

import torch

from lib import cli, hardware, memory, runs
from lib.files import UserError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--ckpt", required=True, help="the checkpoint to sample from")
    parser.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    parser.add_argument("--max_new_tokens", type=cli.parse_int, default=300, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 means greedy decoding")
    parser.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens only (default: all)")
    parser.add_argument("--num_samples", type=cli.parse_int, default=1, help="samples to write")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the sampling")
    cli.add_device_option(parser)
    args = parser.parse_args(argv)
    for name, value in (("max_new_tokens", args.max_new_tokens), ("num_samples", args.num_samples), ("top_k", args.top_k)):
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if not args.temperature >= 0:  # NaN too
        raise UserError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    return args


def sample(args):
    device = hardware.resolve_device(args.device)
    state, model = runs.load_model(args.ckpt, device)
    enc = runs.load_tokenizer(args.ckpt, state, model)
    prompt = enc.encode_ordinary(args.prompt)
    if not prompt:
        raise UserError("--prompt is empty: give at least one character to continue")
    memory.check(f"a sample of {len(prompt):,} prompt tokens and {args.max_new_tokens:,} new ones",
                 memory.generation_bytes(model.config, 1, len(prompt) + args.max_new_tokens), device,
                 "give fewer --max_new_tokens or a shorter --prompt")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([prompt], device=device)  # (1, T)
    for number in range(args.num_samples):
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             generator=generator)
        text = enc.decode([i for i in out[0].tolist() if i < enc.n_vocab])  # a padded vocabulary has ids with no text
        print(text if args.num_samples == 1 else f"--- sample {number + 1}\n{text}", flush=True)


def main(argv=None):
    """Write the samples; the errors a user can fix end in one line (cli.run)."""
    cli.run("sample.py", lambda: sample(parse_args(argv)))


if __name__ == "__main__":
    main()
