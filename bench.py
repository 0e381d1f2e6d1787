"""
bench.py: speed of the default model, every position embedding, in one process and one run.

    python bench.py                      # the full table (about 10 minutes on 2 CPU cores)
    python bench.py --steps 3 --no_compile --lengths 1,4   # a quick look

Everything is measured in the same run so that the ratios hold on a noisy machine:
  - training tokens/s (forward, backward, AdamW step) in bf16 autocast, eager and compiled,
    the position embeddings timed in turns so that their ratios survive the machine's noise;
  - evaluation tokens/s and peak memory at 1x, 4x and 16x train_len (forward only, float32,
    batch 1, as eval_ppl.py runs; each in a fresh process, whose peak memory includes torch);
  - a bf16 GEMM peak (a large square matrix multiply) and the model FLOPs utilisation that
    follows: (6 N + 12 n_layer n_embd T) FLOPs per training token over that peak.
Writes out/bench/bench.json and out/bench/bench.md (outside the committed results; --out
chooses); with --readme, also the README's speed table.
"""

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time

import torch

import data
from fope_gpt import GPT, GPTConfig, POSITION_EMBEDDINGS
from reproduce import README, update_readme
from train import DEFAULTS


def gemm_peak(sizes=(1024, 2048, 4096), repeats=10):
    """bf16 FLOP/s of large square matrix multiplies, the best size: the ceiling a model can approach."""
    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size, dtype=torch.bfloat16), torch.randn(size, size, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best = max(best, 2 * size ** 3 / statistics.median(times))
    return best


def training_step(config, batch_size, compiled):
    """A function that runs one full training step of a fresh model on a fixed batch."""
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
    return step


def training_speed(configs, batch_size, steps, compiled):
    """Tokens/s of full training steps for several configs, timed in turns (one step of each,
    again and again), so that a slow spell of the machine hits them all alike; the median step
    time of each, after warm-up steps that absorb compilation."""
    step_functions = {}
    for name, config in configs.items():
        step_functions[name] = training_step(config, batch_size, compiled)
        for _ in range(6 if compiled else 3):  # compiled code settles after a few steps
            step_functions[name]()
    times = {name: [] for name in configs}
    for _ in range(steps):
        for name, step in step_functions.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    tokens = batch_size * next(iter(configs.values())).train_len
    return {name: {"tok_per_s": tokens / statistics.median(t), "step_s": statistics.median(t)}
            for name, t in times.items()}


def peak_rss_mb():
    """This process's peak resident memory (Linux), or None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


@torch.no_grad()
def evaluation_speed(config, length, repeats):
    """Forward tokens/s and peak memory at one length, batch 1, float32 (as eval_ppl.py)."""
    torch.manual_seed(0)
    model = GPT(config).eval()
    x = torch.randint(0, config.vocab_size, (1, length))
    model(x)  # builds the position tables for this length
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return {"tok_per_s": length / statistics.median(times), "peak_rss_mb": peak_rss_mb()}


def in_fresh_process(function, *args):
    """Run function(*args) in a new Python process, so that its peak memory is its own (freed
    memory stays in a process, and training would have set the peak)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


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


def targets(rows):
    """The project's speed targets for the default model, each with its measured value."""
    lines = []

    def check(name, value, met):
        lines.append(f"- {name}: {value} ({'met' if met else 'not met'})")
    if "rope" in rows and "fope" in rows:
        ratio = rows["fope"]["eager"]["step_s"] / rows["rope"]["eager"]["step_s"]
        check("FoPE step time / RoPE step time <= 1.03", f"{ratio:.3f}", ratio <= 1.03)
    compiled = {pe: row for pe, row in rows.items() if "compiled" in row}
    if compiled:
        speedups = {pe: row["compiled"]["tok_per_s"] / row["eager"]["tok_per_s"] for pe, row in compiled.items()}
        check("compiled training >= 1.7x eager", ", ".join(f"{pe} {x:.2f}x" for pe, x in speedups.items()),
              min(speedups.values()) >= 1.7)
        mfus = {pe: row["compiled"]["mfu"] for pe, row in compiled.items()}
        check("compiled training >= 30% of the bf16 GEMM peak", ", ".join(f"{pe} {x:.0%}" for pe, x in mfus.items()),
              min(mfus.values()) >= 0.3)
    return lines


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
    lines += ["", *targets(rows)]
    lengths = list(next(iter(rows.values()))["eval"])
    lines += ["", "| pe | " + " | ".join(f"eval tok/s @{n}" for n in lengths) + " | "
              + " | ".join(f"peak MB @{n}" for n in lengths) + " |", "|" + "---|" * (1 + 2 * len(lengths))]
    for pe, r in rows.items():
        evals = [r["eval"][n] for n in lengths]
        lines.append(f"| {pe} | " + " | ".join(f"{e['tok_per_s']:,.0f}" for e in evals) + " | "
                     + " | ".join(f"{e['peak_rss_mb']:,.0f}" if e["peak_rss_mb"] else "–" for e in evals) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pe", nargs="+", default=list(POSITION_EMBEDDINGS), choices=POSITION_EMBEDDINGS)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per measurement")
    parser.add_argument("--lengths", default="1,4,16", help="evaluation lengths as multiples of train_len")
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile measurements")
    parser.add_argument("--out", default="out/bench/bench.json")
    parser.add_argument("--readme", action="store_true", help="put the table into README.md")
    parser.add_argument("--report", action="store_true", help="measure nothing: rebuild the table from --out")
    args = parser.parse_args(argv)
    if not args.out.endswith(".json"):
        parser.error(f"--out must end in .json, got {args.out!r}")
    try:
        multiples = [int(m) for m in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    if args.steps < 1 or min(multiples) < 1:
        parser.error("--steps and --lengths must be positive")
    args.multiples = multiples
    return args


def main(argv=None):
    """Measure and write the table; I/O errors (a full disk, a folder that cannot be written) end
    in one line on stderr and a non-zero exit."""
    try:
        measure(parse_args(argv))
    except OSError as error:
        sys.exit(f"bench.py: error: {data.error_line(error)}")


def measure(args):
    """Every measurement, then the JSON and the table (or, with --report, the table alone)."""
    if args.report:
        try:
            with open(args.out) as f:
                report = json.load(f)
        except (OSError, ValueError) as e:
            sys.exit(f"bench.py: error: --report needs the JSON of an earlier run at {args.out}: {e}")
        return publish(report, args)
    data.check_writable_folder(os.path.dirname(os.path.abspath(args.out)))  # before minutes of measuring

    config = GPTConfig(**{f.name: DEFAULTS[f.name] for f in dataclasses.fields(GPTConfig)})
    batch_size = DEFAULTS["batch_size"]
    training_speed({"warm-up": config}, batch_size, 1, compiled=False)  # wakes the thread pool and the allocator
    peak = gemm_peak()
    print(f"bf16 GEMM peak {peak / 1e12:.2f} TFLOP/s, {torch.get_num_threads()} threads", flush=True)
    configs = {pe: dataclasses.replace(config, pe=pe) for pe in args.pe}
    modes = {"eager": training_speed(configs, batch_size, args.steps, compiled=False)}
    if not args.no_compile:
        modes["compiled"] = training_speed(configs, batch_size, args.steps, compiled=True)
    results = {}
    for pe, pe_config in configs.items():
        per_token = flops_per_token(GPT(pe_config), pe_config)
        row = {mode: {**speeds[pe], "mfu": speeds[pe]["tok_per_s"] * per_token / peak} for mode, speeds in modes.items()}
        row["eval"] = {str(m * config.train_len): in_fresh_process(evaluation_speed, pe_config, m * config.train_len,
                                                                   max(3, 16 // m)) for m in args.multiples}
        results[pe] = row
        print(f"{pe}: " + ", ".join(f"{k} {v['tok_per_s']:,.0f} tok/s" for k, v in row.items() if k != "eval")
              + "; eval " + ", ".join(f"@{n} {e['tok_per_s']:,.0f} tok/s {e['peak_rss_mb'] or 0:,.0f} MB"
                                     for n, e in row["eval"].items()), flush=True)

    report = {"config": dataclasses.asdict(config), "batch_size": batch_size, "gemm_peak_tflops": peak / 1e12,
              "flops_per_token": per_token, "results": results,
              "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "python": platform.python_version()}}
    data.write_atomically(args.out, json.dumps(report, indent=2).encode())
    publish(report, args)


def publish(report, args):
    """Write the Markdown table beside the JSON, print it, and put it into the README if asked."""
    table = markdown(report)
    data.write_atomically(args.out[:-len(".json")] + ".md", table.encode())
    print(table)
    if args.readme:
        print(update_readme(README, table, "bench"))


if __name__ == "__main__":
    main()
