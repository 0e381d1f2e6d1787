"""
bench.py: how fast the default grid's model runs here, every position embedding beside a plain
GPT, and what the whole default grid costs on this machine, measured in one process and one run.

    python -m experiments.bench                        # the full table (about 10 minutes on 2 CPU cores)
    python -m experiments.bench --quick                # every row, shortened: seconds, numbers rough
    python -m experiments.bench --pe rope alibi --lengths 384,6144 --no_compile

All in the same run, so that its ratios hold on a noisy machine:
  - the GEMM peak: float32 and bf16 square multiplies up to 4096 (8192 on a GPU, where a card's bf16
    peak shows only there), the best size of each;
  - training tokens/s (forward, backward, fused AdamW) of the default grid's model (train.py
    --preset retrieval: 4 layers, 256 wide, train_len 384, bytes) for each position embedding and a
    plain reference GPT of the same shape (below): eager in the precision train.py's --dtype auto
    picks here and in float32 (the grids' precision), timed in turns so that a slow spell of the
    machine hits them alike, and compiled;
  - evaluation tokens/s and peak memory at each of --lengths (forward only, float32, batch 1, as
    eval_ppl.py runs), each position embedding in a fresh process whose peak is its own, with the
    threads one of reproduce.py's default jobs gets;
  - several at once: the grid's model trained by 1 process with every core, and by several side by
    side (on a CPU one a core, one thread each; on a GPU 2, 4 and 8 processes), started together;
  - the default grid's wall time here: every step of experiments/grids.py DEFAULT timed from these
    numbers and scheduled as `reproduce.py --jobs N` runs it (jobs.simulate), for each N measured,
    all of it and what results/default still lacks.
On CUDA times come from CUDA events and memory from torch.cuda.max_memory_allocated. Writes
out/bench/bench.json and bench.md beside it (--out to choose).
"""

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from experiments import bench_report, grids, jobs
from fope_gpt import GPT, GPTConfig, POSITION_EMBEDDINGS, apply_rotary
from lib import cli, files, hardware, settings
from lib.files import UserError

BASELINE = bench_report.BASELINE
GRID = grids.DEFAULT
GRID_SETTINGS = grids.run_settings(GRID, GRID.runs[0])[0]  # rope-s0: what every run of the grid starts from
CONFIG = GPTConfig(**{key: GRID_SETTINGS[key] for key in settings.MODEL_FIELDS})
BATCH_SIZE = GRID_SETTINGS["batch_size"]

# -----------------------------------------------------------------------------
# a plain reference GPT: what the default model would cost with nothing of this project in it


class ReferenceGPT(nn.Module):
    """A nanoGPT-style GPT of the default model's shape: RMSNorm, SwiGLU, RoPE (fope_gpt's rotation),
    SDPA and nothing else. If fope_gpt.GPT trains much slower than this, the project costs speed."""

    def __init__(self, config):
        super().__init__()
        C, d = config.n_embd, config.head_dim
        self.n_head, self.config = config.n_head, config
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

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.emb(idx)
        for layer in self.layers:
            q, k, v = layer.qkv(layer.norm1(x)).view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
            q, k = apply_rotary(q, self.cos[:T], self.sin[:T]), apply_rotary(k, self.cos[:T], self.sin[:T])
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + layer.proj(y.transpose(1, 2).reshape(B, T, -1))
            value, gate = layer.up(layer.norm2(x)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * value)
        logits = self.head(self.norm(x))
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def build(name, config, device):
    torch.manual_seed(0)
    model = ReferenceGPT(config) if name == BASELINE else GPT(dataclasses.replace(config, pe=name))
    return model.to(device)


# -----------------------------------------------------------------------------
# timing


def training_step(model, batch_size, dtype, device, compiled=False):
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


def training_speed(models, batch_size, steps, dtype, device, compiled=False, warmup=2):
    """{name: tokens/s and step seconds} of full training steps of several models ({name: model}),
    the median after warm-up steps. Eager models are timed in turns (one step of each, again and
    again) so that a slow spell of the machine hits them alike; compiled ones one after another,
    each alone in the compiler's caches, as train.py runs one."""
    if not compiled:
        return in_turns(models, batch_size, steps, dtype, device, False, warmup)
    found = {}
    for name, model in models.items():
        torch._dynamo.reset()
        found.update(in_turns({name: model}, batch_size, steps, dtype, device, True, 6))  # compiled code settles
    return found


def in_turns(models, batch_size, steps, dtype, device, compiled, warmup):
    functions = {name: training_step(model, batch_size, dtype, device, compiled) for name, model in models.items()}
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in functions}
    for _ in range(steps):
        for name, function in functions.items():
            times[name].append(hardware.timed(function, device))
    return {name: {"tok_per_s": batch_size * models[name].config.train_len / statistics.median(t),
                   "step_s": statistics.median(t)} for name, t in times.items()}


@torch.no_grad()
def evaluation_speed(config, lengths, repeats, device, threads):
    """{length: forward tokens/s and peak memory} at each length, batch 1, float32 (as eval_ppl.py),
    in increasing length, the peak measured afresh for each (run in a fresh process)."""
    torch.set_num_threads(threads)
    model = build(config.pe, config, device).eval()
    found = {}
    for length in lengths:
        reset_peak(device)
        x = torch.randint(0, config.vocab_size, (1, length), device=device)
        model(x)  # builds the position tables for this length
        times = [hardware.timed(lambda: model(x), device) for _ in range(max(1, repeats * config.train_len // length))]
        found[str(length)] = {"tok_per_s": length / statistics.median(times), "peak_memory_mb": jobs.peak_memory_mb(device)}
    return found


def reset_peak(device):
    """Start the peak-memory measurement afresh: CUDA's counter, or Linux's resident high-water mark."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak of a length is at least the shorter ones' (measured in increasing length)


def in_fresh_process(function, *args):
    """Run function(*args) in a new Python process, so that its peak memory is its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def side_by_side_worker(config, batch, dtype, device, threads, steps, barrier, results):
    torch.set_num_threads(threads)
    step = training_step(build("rope", config, device), batch, dtype, device)
    step()  # warm-up
    barrier.wait()
    start = time.time()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    results.put((start, time.time(), steps * batch * config.train_len))


def side_by_side(config, batch, processes, threads, steps, dtype, device):
    """Training tokens/s of `processes` processes of `threads` threads each, started together:
    all their tokens over the span from the first start to the last end."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # as reproduce.py tells its processes
    try:
        workers = [context.Process(target=side_by_side_worker, args=(config, batch, dtype, device, threads, steps,
                                                                       barrier, results)) for _ in range(processes)]
        for worker in workers:
            worker.start()
        found = [results.get(timeout=3600) for _ in workers]
        for worker in workers:
            worker.join()
    finally:
        os.environ.pop("OMP_NUM_THREADS") if saved is None else os.environ.update(OMP_NUM_THREADS=saved)
    span = max(end for _, end, _ in found) - min(start for start, _, _ in found)
    together = sum(tokens for _, _, tokens in found) / span
    return {"jobs": processes, "threads": threads, "tok_per_s": together, "tok_per_s_per_job": together / processes}


# -----------------------------------------------------------------------------
# the command line


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--pe", nargs="+", default=list(POSITION_EMBEDDINGS), choices=POSITION_EMBEDDINGS,
                        help="position embeddings to time (default: all)")
    parser.add_argument("--steps", type=int, help="timed training steps per measurement (default: 8; 1 with --quick)")
    cli.add_lengths_option(parser, "evaluation lengths", "the grid's train_len, 384")
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile measurements")
    parser.add_argument("--no_jobs", action="store_true", help="skip the processes side by side and the grid's estimate")
    parser.add_argument("--quick", action="store_true", help="shorten what has a fixed cost, for tests and a first "
                        "look: batches of 4, 1 timed step, GEMMs to 512, no compile, lengths 1x and 4x train_len, "
                        "widths by FLOPs, rough numbers")
    cli.add_device_option(parser)
    parser.add_argument("--out", default="out/bench/bench.json", help="JSON path; the Markdown table goes beside it")
    parser.add_argument("--report", action="store_true", help="measure nothing: rebuild the table from --out")
    args = parser.parse_args(argv)
    if not args.out.endswith(".json"):
        raise UserError(f"--out must end in .json, got {args.out!r}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be positive, got {args.steps}")
    args.steps = args.steps or (1 if args.quick else 8)
    args.lengths = args.lengths or ([CONFIG.train_len, 4 * CONFIG.train_len] if args.quick
                                    else cli.evaluation_lengths(CONFIG.train_len))
    return args


def main(argv=None):
    """Measure and write the table; bad input and I/O errors end in one line and a non-zero exit."""
    cli.run("bench.py", lambda: measure(parse_args(argv)))


def measure(args):
    """Every measurement, then the JSON and the table (or, with --report, the table alone)."""
    if args.report:
        try:
            with open(args.out) as f:
                report = json.load(f)
            return publish(report, args.out)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(f"--report needs the JSON of an earlier bench.py at {args.out}: {error}") from None
    device = hardware.resolve_device(args.device)
    dtype = hardware.resolve_dtype("auto", device)
    files.check_writable_folder(os.path.dirname(os.path.abspath(args.out)))  # fail before measuring
    load_start = os.getloadavg()[0]
    batch, steps = (4 if args.quick else BATCH_SIZE), args.steps
    cuda = device.startswith("cuda")
    sizes = (256, 512) if args.quick else (512, 1024, 2048, 4096, 8192) if cuda else (512, 1024, 2048, 4096)
    names = [*args.pe, BASELINE]
    in_turns({BASELINE: build(BASELINE, CONFIG, device)}, batch, 1, dtype, device, False, 0)  # wakes threads, allocator
    peaks = {k: hardware.gemm_peak(device, d, sizes, 0.2 if args.quick else 1.0)
             for k, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"GEMM peak: {peaks['fp32'] / 1e12:.2f} TFLOP/s float32, {peaks['bf16'] / 1e12:.2f} bf16; auto picks {dtype}",
          flush=True)
    models = {name: build(name, CONFIG, device) for name in names}
    modes = {f"eager {d}": (d, False) for d in dict.fromkeys([dtype, "fp32"])}
    if not (args.no_compile or args.quick):
        modes[f"compiled {dtype}"] = (dtype, True)
    speeds = {}
    for mode, (mode_dtype, compiled) in modes.items():
        speeds[mode] = training_speed(models, batch, steps, mode_dtype, device, compiled, 1 if args.quick else 2)
        print(f"{mode}: " + ", ".join(f"{n} {r['tok_per_s']:,.0f} tok/s" for n, r in speeds[mode].items()), flush=True)
    per_token, peak = bench_report.flops_per_token(CONFIG), max(peaks.values())
    results = {name: {mode: {**speeds[mode][name], "mfu": speeds[mode][name]["tok_per_s"] * per_token / peak}
                      for mode in modes} for name in names}
    default = jobs.default_jobs("cuda" if cuda else "cpu")
    eval_threads = torch.get_num_threads() if cuda else jobs.threads_per_job(default)
    for pe in args.pe:
        results[pe]["eval"] = in_fresh_process(evaluation_speed, dataclasses.replace(CONFIG, pe=pe), args.lengths,
                                               1 if args.quick else 8, device, eval_threads)
        print(f"{pe} eval: " + ", ".join(f"@{n} {e['tok_per_s']:,.0f} tok/s" for n, e in results[pe]["eval"].items()),
              flush=True)
    report = {"config": dataclasses.asdict(CONFIG), "batch_size": batch, "dtype": dtype, "quick": args.quick,
              "gemm_peak_tflops": {k: v / 1e12 for k, v in peaks.items()}, "flops_per_token": per_token,
              "modes": list(modes), "results": results, "eval_threads": eval_threads,
              "ratios": bench_report.ratios(results, modes, max(args.lengths))}
    if not args.no_jobs:
        report.update(several_at_once(args, results, modes, device, default, eval_threads))
    report["ratios"].update(report.pop("jobs_ratios", {}))
    report["load_average"] = {"start": load_start, "end": os.getloadavg()[0]}
    report["date"] = datetime.datetime.now().isoformat(timespec="seconds")  # "left" is what lacked then
    report["machine"] = {"name": hardware.machine_name(device), "device": "cuda" if cuda else "cpu",
                         "cores": os.cpu_count(),
                         "threads": torch.get_num_threads(), "cpu": hardware.machine_name("cpu"),
                         "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": dtype == "bf16",
                         "torch": torch.__version__, "python": platform.python_version()}
    files.write_atomically(args.out, json.dumps(report, indent=2).encode())
    publish(report, args.out)


def several_at_once(args, results, modes, device, default, eval_threads):
    """Training tokens/s with processes side by side, the factors of the grid's estimate, and the bench_report."""
    cores, cuda = os.cpu_count() or 1, device.startswith("cuda")
    batch, steps = (4, 2) if args.quick else (BATCH_SIZE, args.steps)
    if cuda:
        configs = [(n, jobs.threads_per_job(n)) for n in (1, 2, 4, 8)]
    else:
        # one process with every core, reproduce.py's default side by side, and (the rate evaluations are
        # measured at) one process with the threads of one of those
        configs = list(dict.fromkeys([(1, cores), (default, jobs.threads_per_job(default))]
                                     + [(1, eval_threads)] * (not args.quick)))
    measured = []
    for processes, threads in configs:
        measured.append(side_by_side(CONFIG, batch, processes, threads, steps, "fp32", device))
        print(f"{processes} x {threads} threads: {measured[-1]['tok_per_s']:,.0f} tok/s together", flush=True)
    alone = [m for m in measured if m["jobs"] == 1 and (cuda or m["threads"] == eval_threads)]
    base = alone[0] if alone else next(m for m in measured if m["jobs"] == default)  # --quick: taken as the rate alone
    factors = {"pe": {pe: row["eager fp32"]["step_s"] / results["rope"]["eager fp32"]["step_s"]
                      for pe, row in results.items() if pe != BASELINE and "rope" in results},
               "analysis_s": bench_report.analysis_seconds(os.path.join(jobs.HERE, "results", "default"))}
    if args.quick:
        flops = {w: bench_report.flops_per_token(dataclasses.replace(CONFIG, n_embd=w, n_head=w // 64)) for w in (128, 256, 512)}
        factors.update(width={w: f / flops[256] for w, f in flops.items()}, width_from="by FLOPs per token")
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(base["threads"])
        widths = {w: build("rope", dataclasses.replace(CONFIG, n_embd=w, n_head=w // 64), device) for w in (128, 256, 512)}
        times = in_turns(widths, BATCH_SIZE, 3, "fp32", device, False, 1)
        torch.set_num_threads(threads)
        factors.update(width={w: t["step_s"] / times[256]["step_s"] for w, t in times.items()},
                       width_from=f"measured in float32 with {base['threads']} thread(s)")
    evals = {pe: row["eval"] for pe, row in results.items() if "eval" in row}
    if "rope" not in evals:
        return {"jobs": measured, "factors": factors, "grid_estimate": []}
    hours = bench_report.grid_estimate(measured, base, evals, factors, os.path.join(jobs.HERE, "results", "default"),
                             os.path.join(jobs.HERE, "out", "default"))
    one = next(m for m in measured if m["jobs"] == 1 and m["threads"] == max(c[1] for c in configs))
    gains = {f"{m['jobs']} jobs x {m['threads']} thread(s) / 1 job x {one['threads']}, training tok/s together":
             m["tok_per_s"] / one["tok_per_s"] for m in measured if m["jobs"] > 1}
    return {"jobs": measured, "factors": factors, "grid_estimate": hours, "jobs_ratios": gains}


def publish(report, out):
    """Write the Markdown table beside the JSON and print it."""
    table = bench_report.markdown(report)
    files.write_atomically(out[:-len(".json")] + ".md", table.encode())
    print(table)


if __name__ == "__main__":
    main()
