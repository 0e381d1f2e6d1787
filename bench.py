"""
bench.py: speed of the default model, every position embedding, in one process and one run.

    python bench.py                      # the full table (about 10 minutes on 2 CPU cores)
    python bench.py --steps 3 --no_compile --lengths 1,4   # a quick look

Everything is measured in the same run so that the ratios hold on a noisy machine:
  - training tokens/s (forward, backward, AdamW step) in bf16 autocast, eager and compiled;
  - evaluation tokens/s and peak memory at 1x, 4x and 16x train_len (forward only, float32,
    batch 1, as eval_ppl.py runs);
  - a bf16 GEMM peak (a large square matrix multiply) and the model FLOPs utilisation that
    follows: (6 N + 12 n_layer n_embd T) FLOPs per training token over that peak.
Writes results/bench.json and results/bench.md; with --readme, also the README's speed table.
"""

import argparse
import dataclasses
import json
import os
import platform
import time

import torch

from fope_gpt import GPT, GPTConfig, POSITION_EMBEDDINGS
from reproduce import README, update_readme
from train import DEFAULTS


def gemm_peak(size=4096, repeats=10):
    """bf16 FLOP/s of one large square matrix multiply: the ceiling a model can approach."""
    a, b = torch.randn(size, size, dtype=torch.bfloat16), torch.randn(size, size, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def training_speed(config, batch_size, steps, compiled):
    """Tokens/s of full training steps (after warm-up steps that absorb compilation)."""
    torch.manual_seed(0)
    model = GPT(config)
    step_model = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    x = torch.randint(0, config.vocab_size, (batch_size, config.train_len))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = step_model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(4 if compiled else 2):  # compiled code settles after a few steps
        step()
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    return {"tok_per_s": steps * batch_size * config.train_len / seconds, "step_s": seconds / steps,
            "warmup_s": warmup}


def peak_rss_reset():
    """Reset the process's peak resident memory (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024


@torch.no_grad()
def evaluation_speed(config, length, repeats):
    """Forward tokens/s and peak memory at one length, batch 1, float32 (as eval_ppl.py)."""
    torch.manual_seed(0)
    model = GPT(config).eval()
    x = torch.randint(0, config.vocab_size, (1, length))
    model(x)  # builds the position tables for this length
    can_measure_memory = peak_rss_reset()
    start = time.perf_counter()
    for _ in range(repeats):
        model(x)
    seconds = time.perf_counter() - start
    return {"tok_per_s": repeats * length / seconds, "peak_rss_mb": peak_rss_mb() if can_measure_memory else None}


def flops_per_token(model, config):
    """Training FLOPs per token: 6 per matmul parameter plus attention (PaLM's estimate)."""
    matmul_params = model.num_params() - config.vocab_size * config.n_embd  # the embedding is a lookup
    return 6 * matmul_params + 12 * config.n_layer * config.n_embd * config.train_len


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def markdown(report):
    cfg, rows = report["config"], report["results"]
    lines = [f"Default model ({cfg['n_layer']} layers, {cfg['n_embd']} wide, {cfg['n_head']} heads, "
             f"train_len {cfg['train_len']}, vocab {cfg['vocab_size']}, batch {report['batch_size']}) on "
             f"{report['machine']['cpu']} ({report['machine']['threads']} threads), torch {report['machine']['torch']}. "
             f"bf16 GEMM peak: {report['gemm_peak_tflops']:.2f} TFLOP/s.", ""]
    header = "| pe | train tok/s eager | train tok/s compiled | compiled / eager | MFU compiled | step time / RoPE (eager) |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    rope_step = rows["rope"]["eager"]["step_s"] if "rope" in rows else None
    for pe, r in rows.items():
        eager, compiled = r["eager"], r.get("compiled")
        lines.append(f"| {pe} | {eager['tok_per_s']:,.0f} | "
                     + (f"{compiled['tok_per_s']:,.0f} | {compiled['tok_per_s'] / eager['tok_per_s']:.2f}x | "
                        f"{compiled['mfu']:.1%} | " if compiled else "– | – | – | ")
                     + (f"{eager['step_s'] / rope_step:.3f} |" if rope_step else "– |"))
    lengths = list(next(iter(rows.values()))["eval"])
    lines += ["", "| pe | " + " | ".join(f"eval tok/s @{n}" for n in lengths) + " | "
              + " | ".join(f"peak MB @{n}" for n in lengths) + " |", "|" + "---|" * (1 + 2 * len(lengths))]
    for pe, r in rows.items():
        evals = [r["eval"][n] for n in lengths]
        lines.append(f"| {pe} | " + " | ".join(f"{e['tok_per_s']:,.0f}" for e in evals) + " | "
                     + " | ".join(f"{e['peak_rss_mb']:,.0f}" if e["peak_rss_mb"] else "–" for e in evals) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pe", nargs="+", default=list(POSITION_EMBEDDINGS), choices=POSITION_EMBEDDINGS)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per measurement")
    parser.add_argument("--lengths", default="1,4,16", help="evaluation lengths as multiples of train_len")
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile measurements")
    parser.add_argument("--out", default="results/bench.json")
    parser.add_argument("--readme", action="store_true", help="put the table into README.md")
    args = parser.parse_args(argv)
    if not args.out.endswith(".json"):
        parser.error(f"--out must end in .json, got {args.out!r}")
    try:
        multiples = [int(m) for m in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    if args.steps < 1 or min(multiples) < 1:
        parser.error("--steps and --lengths must be positive")

    config = GPTConfig(**{f.name: DEFAULTS[f.name] for f in dataclasses.fields(GPTConfig)})
    batch_size = DEFAULTS["batch_size"]
    peak = gemm_peak()
    print(f"bf16 GEMM peak {peak / 1e12:.2f} TFLOP/s, {torch.get_num_threads()} threads", flush=True)
    results = {}
    for pe in args.pe:
        pe_config = dataclasses.replace(config, pe=pe)
        per_token = flops_per_token(GPT(pe_config), pe_config)
        row = {"eager": training_speed(pe_config, batch_size, args.steps, compiled=False)}
        if not args.no_compile:
            row["compiled"] = training_speed(pe_config, batch_size, args.steps, compiled=True)
        for mode in row.values():
            mode["mfu"] = mode["tok_per_s"] * per_token / peak
        row["eval"] = {str(m * config.train_len): evaluation_speed(pe_config, m * config.train_len, repeats=max(1, 8 // m))
                       for m in multiples}
        results[pe] = row
        print(f"{pe}: " + ", ".join(f"{k} {v['tok_per_s']:,.0f} tok/s" for k, v in row.items() if k != "eval")
              + "; eval " + ", ".join(f"@{n} {e['tok_per_s']:,.0f} tok/s {e['peak_rss_mb'] or 0:,.0f} MB"
                                     for n, e in row["eval"].items()), flush=True)

    report = {"config": dataclasses.asdict(config), "batch_size": batch_size, "gemm_peak_tflops": peak / 1e12,
              "flops_per_token": per_token, "results": results,
              "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "python": platform.python_version()}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    table = markdown(report)
    with open(args.out[:-len(".json")] + ".md", "w") as f:
        f.write(table)
    print(table)
    if args.readme:
        print(update_readme(README, table, "bench"))


if __name__ == "__main__":
    main()
