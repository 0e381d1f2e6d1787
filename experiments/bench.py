"""
bench.py: speed of the default model, every position embedding, in one process and one run.

    python bench.py                      # the full table (a few minutes on 2 CPU cores)
    python bench.py --steps 3 --no_compile --lengths 1,4   # a quick look

Everything is measured in the same run so that its ratios hold on a noisy machine:
  - the machine's matrix-multiply peak: float32 and bf16 GEMMs at a few sizes, the better of
    the two (each measurement bounded to about a second), and the precision that train.py's
    --dtype auto picks here;
  - training tokens/s (forward, backward, fused AdamW step) in that precision, eager and
    compiled, for each position embedding and for a plain reference GPT of the same shape
    (below); the eager ones timed in turns so that a slow spell of the machine hits them alike;
  - evaluation tokens/s and peak memory at 1x, 4x and 16x train_len (forward only, float32,
    batch 1, as eval_ppl.py runs; each in a fresh process, whose peak memory is its own).
On CUDA the times come from CUDA events and the memory from torch.cuda.max_memory_allocated.
Writes out/bench/bench.json and bench.md beside it (--out to choose).
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
import torch.nn as nn
import torch.nn.functional as F

from lib import files
from lib import hardware
from lib import settings
from fope_gpt import GPT, GPTConfig, POSITION_EMBEDDINGS

BATCH_SIZE = settings.DEFAULTS["batch_size"]  # train.py's default: 16 x 256 = 4096 tokens a step
BASELINE = "reference"  # the plain GPT's row in the tables

# -----------------------------------------------------------------------------
# a plain reference GPT: what the default model would cost with nothing of this project in it


class ReferenceGPT(nn.Module):
    """A nanoGPT-style GPT of the default model's shape: RMSNorm, SwiGLU, RoPE, SDPA and
    nothing else. If fope_gpt.GPT trains much slower than this, the project costs speed."""

    def __init__(self, config):
        super().__init__()
        C, d = config.n_embd, config.head_dim
        self.n_head = config.n_head
        self.emb = nn.Embedding(config.vocab_size, C)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            norm1=nn.RMSNorm(C), qkv=nn.Linear(C, 3 * C, bias=False), proj=nn.Linear(C, C, bias=False),
            norm2=nn.RMSNorm(C), up=nn.Linear(C, 8 * C, bias=False), down=nn.Linear(4 * C, C, bias=False),
        )) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(C)
        self.head = nn.Linear(C, config.vocab_size, bias=False)
        phase = torch.outer(torch.arange(config.train_len).float(), config.rope_theta ** (-torch.arange(0, d, 2) / d))
        self.register_buffer("cos", phase.cos(), persistent=False)  # (T, d/2)
        self.register_buffer("sin", phase.sin(), persistent=False)

    def rotate(self, x):  # (B, H, T, d), NeoX half-split pairs
        a, b = x.chunk(2, dim=-1)
        return torch.cat((a * self.cos - b * self.sin, b * self.cos + a * self.sin), dim=-1)

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.emb(idx)
        for layer in self.layers:
            q, k, v = layer.qkv(layer.norm1(x)).view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(self.rotate(q), self.rotate(k), v, is_causal=True)
            x = x + layer.proj(y.transpose(1, 2).reshape(B, T, -1))
            value, gate = layer.up(layer.norm2(x)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * value)
        logits = self.head(self.norm(x))
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


# -----------------------------------------------------------------------------
# timing


def timed(function, device):
    """Seconds that function() takes, by CUDA events on a GPU (no host clock around queued work)."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def gemm_peak(device, dtype, sizes=(512, 1024, 2048, 4096), budget_s=1.0):
    """FLOP/s of square matrix multiplies in one dtype, the best size. Each size gets about
    budget_s of repeats; a size whose single multiply already takes longer than that ends the
    search, so that a dtype this machine only emulates (bf16 on an AVX2 CPU) costs seconds."""
    best = 0.0
    for size in sizes:
        a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        first = timed(lambda: a @ b, device)
        if first > budget_s:
            best = max(best, 2 * size ** 3 / first)
            break
        times = [timed(lambda: a @ b, device) for _ in range(max(3, min(50, int(budget_s / max(first, 1e-6)))))]
        best = max(best, 2 * size ** 3 / statistics.median(times))
    return best


def training_step(model, batch_size, dtype, device, compiled):
    """A function that runs one full training step of `model` on a fixed batch."""
    step_model = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    x = torch.randint(0, model.config.vocab_size, (batch_size, model.config.train_len), device=device)

    def step():
        with hardware.autocast(dtype, device):
            _, loss = step_model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def build(name, config, device):
    torch.manual_seed(0)
    if name == BASELINE:
        model = ReferenceGPT(config)
        model.config = config
    else:
        model = GPT(dataclasses.replace(config, pe=name))
    return model.to(device)


def training_speed(names, config, batch_size, steps, dtype, device, compiled):
    """Tokens/s of full training steps for several models: the median step time of each, after
    warm-up steps. Eager models are timed in turns (one step of each, again and again), so that a
    slow spell of the machine hits them alike. Compiled models are timed one after another, each
    alone in the compiler's caches, as train.py runs one."""
    if compiled:
        speeds = {}
        for name in names:
            torch._dynamo.reset()
            speeds.update(training_speed_in_turns([name], config, batch_size, steps, dtype, device, warmup=6,
                                                  compiled=True))
        return speeds
    return training_speed_in_turns(names, config, batch_size, steps, dtype, device, warmup=2, compiled=False)


def training_speed_in_turns(names, config, batch_size, steps, dtype, device, warmup, compiled):
    step_functions = {}
    for name in names:
        step_functions[name] = training_step(build(name, config, device), batch_size, dtype, device, compiled)
        for _ in range(warmup):  # compiled code settles after a few steps
            step_functions[name]()
    times = {name: [] for name in names}
    for _ in range(steps):
        for name, step in step_functions.items():
            times[name].append(timed(step, device))
    tokens = batch_size * config.train_len
    return {name: {"tok_per_s": tokens / statistics.median(t), "step_s": statistics.median(t)} for name, t in times.items()}


def peak_memory_mb(device):
    """Peak memory of this process: CUDA allocations on a GPU, resident memory (Linux) on a CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


@torch.no_grad()
def evaluation_speed(config, length, repeats, device):
    """Forward tokens/s and peak memory at one length, batch 1, float32 (as eval_ppl.py)."""
    model = build(config.pe, config, device).eval()
    x = torch.randint(0, config.vocab_size, (1, length), device=device)
    model(x)  # builds the position tables for this length
    times = [timed(lambda: model(x), device) for _ in range(repeats)]
    return {"tok_per_s": length / statistics.median(times), "peak_memory_mb": peak_memory_mb(device)}


def in_fresh_process(function, *args):
    """Run function(*args) in a new Python process, so that its peak memory is its own (freed
    memory stays in a process, and training would have set the peak)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def flops_per_token(config):
    """Training FLOPs per token: 6 per matmul parameter plus attention (PaLM's estimate)."""
    matmul_params = GPT(config).num_params() - config.vocab_size * config.n_embd  # the embedding is a lookup
    return 6 * matmul_params + 12 * config.n_layer * config.n_embd * config.train_len


# -----------------------------------------------------------------------------
# the report


def ratios(rows):
    """The comparisons the benchmark exists for, each from this run's own times."""
    found = {}
    if BASELINE in rows:
        for pe in POSITION_EMBEDDINGS:
            if pe in rows:
                found[f"{pe} / reference, training tok/s (eager)"] = rows[pe]["eager"]["tok_per_s"] / rows[BASELINE]["eager"]["tok_per_s"]
    if "rope" in rows and "fope" in rows:
        found["fope / rope, step time (eager)"] = rows["fope"]["eager"]["step_s"] / rows["rope"]["eager"]["step_s"]
        if "compiled" in rows["rope"]:
            found["fope / rope, step time (compiled)"] = rows["fope"]["compiled"]["step_s"] / rows["rope"]["compiled"]["step_s"]
    for name, row in rows.items():
        if "compiled" in row:
            found[f"{name}: compiled / eager, training tok/s"] = row["compiled"]["tok_per_s"] / row["eager"]["tok_per_s"]
    return found


def markdown(report):
    cfg, rows, m = report["config"], report["results"], report["machine"]
    lines = [f"Default model ({cfg['n_layer']} layers, {cfg['n_embd']} wide, {cfg['n_head']} heads, "
             f"train_len {cfg['train_len']}, vocab {cfg['vocab_size']}, batch {report['batch_size']}) on "
             f"{m['name']} ({m['device']}, {m['threads']} threads), torch {m['torch']}. GEMM peak: "
             f"{report['gemm_peak_tflops']['fp32']:.2f} TFLOP/s float32, {report['gemm_peak_tflops']['bf16']:.2f} "
             f"bf16; training below in {report['dtype']}, the precision --dtype auto picks here. "
             f"`{BASELINE}` is the plain GPT of the same shape in bench.py.", ""]
    header = "| model | train tok/s eager | train tok/s compiled | MFU eager | MFU compiled |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for name, row in rows.items():
        eager, compiled = row["eager"], row.get("compiled")
        lines.append(f"| {name} | {eager['tok_per_s']:,.0f} | " + (f"{compiled['tok_per_s']:,.0f}" if compiled else "–")
                     + f" | {eager['mfu']:.1%} | " + (f"{compiled['mfu']:.1%}" if compiled else "–") + " |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in report["ratios"].items()]
    evaluated = {name: row["eval"] for name, row in rows.items() if "eval" in row}
    if evaluated:
        lengths = list(next(iter(evaluated.values())))
        lines += ["", "| pe | " + " | ".join(f"eval tok/s @{n}" for n in lengths) + " | "
                  + " | ".join(f"peak MB @{n}" for n in lengths) + " |", "|" + "---|" * (1 + 2 * len(lengths))]
        for name, evals in evaluated.items():
            lines.append(f"| {name} | " + " | ".join(f"{evals[n]['tok_per_s']:,.0f}" for n in lengths) + " | "
                         + " | ".join(f"{evals[n]['peak_memory_mb']:,.0f}" if evals[n]["peak_memory_mb"] else "–"
                                      for n in lengths) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    """Measure and write the table; I/O errors (a full disk, a folder that cannot be written) end
    in one line on stderr and a non-zero exit."""
    try:
        measure(argv)
    except OSError as error:
        sys.exit(f"bench.py: error: {files.error_line(error)}")


def measure(argv):
    """Every measurement, then the JSON and the table (or, with --report, the table alone)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pe", nargs="+", default=list(POSITION_EMBEDDINGS), choices=POSITION_EMBEDDINGS,
                        help="position embeddings to time (default: all)")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per measurement (default 8)")
    parser.add_argument("--lengths", default="1,4,16", help="evaluation lengths as multiples of train_len (default 1,4,16)")
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile measurements")
    parser.add_argument("--device", default="auto", help="auto: cuda if PyTorch sees a GPU, else cpu")
    parser.add_argument("--out", default="out/bench/bench.json", help="JSON path; the Markdown table goes beside it")
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
    if args.report:
        try:
            with open(args.out) as f:
                return publish(json.load(f), args.out)
        except (OSError, ValueError) as e:
            parser.error(f"--report needs the JSON of an earlier run at {args.out}: {e}")
    try:
        device = hardware.resolve_device(args.device)
        dtype = hardware.resolve_dtype("auto", device)
        files.check_writable_folder(os.path.dirname(os.path.abspath(args.out)))  # fail before measuring
    except hardware.HardwareError as e:
        sys.exit(f"bench.py: error: {e}")
    except OSError as e:
        sys.exit(f"bench.py: error: cannot write into the folder of --out {args.out}: {e.strerror}")

    config = GPTConfig()
    names = [*args.pe, BASELINE]
    training_speed([BASELINE], config, BATCH_SIZE, 1, dtype, device, compiled=False)  # wakes threads and allocator
    peaks = {"fp32": gemm_peak(device, torch.float32), "bf16": gemm_peak(device, torch.bfloat16)}
    print(f"GEMM peak: {peaks['fp32'] / 1e12:.2f} TFLOP/s float32, {peaks['bf16'] / 1e12:.2f} bf16; "
          f"training in {dtype}", flush=True)
    modes = {"eager": training_speed(names, config, BATCH_SIZE, args.steps, dtype, device, compiled=False)}
    print("eager: " + ", ".join(f"{n} {r['tok_per_s']:,.0f} tok/s" for n, r in modes["eager"].items()), flush=True)
    if not args.no_compile:
        modes["compiled"] = training_speed(names, config, BATCH_SIZE, args.steps, dtype, device, compiled=True)
        print("compiled: " + ", ".join(f"{n} {r['tok_per_s']:,.0f} tok/s" for n, r in modes["compiled"].items()), flush=True)
    per_token = flops_per_token(config)  # the same for every position embedding: none has trained weights
    peak = max(peaks.values())
    results = {name: {mode: {**speeds[name], "mfu": speeds[name]["tok_per_s"] * per_token / peak}
                      for mode, speeds in modes.items()} for name in names}
    for pe in args.pe:
        results[pe]["eval"] = {str(m * config.train_len): in_fresh_process(
            evaluation_speed, dataclasses.replace(config, pe=pe), m * config.train_len, max(3, 16 // m), device)
            for m in multiples}
        print(f"{pe} eval: " + ", ".join(f"@{n} {e['tok_per_s']:,.0f} tok/s" for n, e in results[pe]["eval"].items()),
              flush=True)

    report = {"config": dataclasses.asdict(config), "batch_size": BATCH_SIZE, "dtype": dtype,
              "gemm_peak_tflops": {k: v / 1e12 for k, v in peaks.items()}, "flops_per_token": per_token,
              "results": results, "ratios": ratios(results),
              "machine": {"name": hardware.machine_name(device), "device": device, "threads": torch.get_num_threads(),
                          "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": dtype == "bf16",
                          "torch": torch.__version__, "python": platform.python_version()}}
    files.write_atomically(args.out, json.dumps(report, indent=2).encode())
    publish(report, args.out)


def publish(report, out):
    """Write the Markdown table beside the JSON and print it."""
    table = markdown(report)
    files.write_atomically(out[:-len(".json")] + ".md", table.encode())
    print(table)


if __name__ == "__main__":
    main()
