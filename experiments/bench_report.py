"""
bench_report.py: what bench.py's measurements say, measuring nothing: FLOPs per token (for MFU), the
ratios, the Markdown tables, the README's paragraphs on the machines, and the default grid's wall time on this machine from the measured rates: every step of
experiments/grids.py DEFAULT timed from the measured training and evaluation rates and scheduled as
`python -m experiments.reproduce --jobs N` runs them (jobs.simulate), all of it and what results/default
still lacks.
"""

import json
import os

import torch

from experiments import grid_results, grid_steps, grids, jobs
from fope_gpt import GPT
from lib.files import UserError

BASELINE = "reference"  # the plain GPT's row in the tables (bench.py's ReferenceGPT)
GRID = grids.DEFAULT
STARTUP_S = 5.0  # a step's process start (Python, torch, the checkpoint) in the grid's estimate

def flag_value(args, flag, default):
    """The value of `flag` in a list of command-line arguments (the last one given)."""
    values = [value for key, value in zip(args, args[1:]) if key == flag]
    return type(default)(values[-1]) if values else default


def nearest(table, length):
    """The row of a {length: row} table measured at the length nearest `length` (in ratio)."""
    return table[min(table, key=lambda measured: abs(torch.log(torch.tensor(int(measured) / length)).item()))]


def step_seconds(kind, run, entry, per_job, speed, evals, factors):
    """A step's seconds on one process: `per_job` the grid model's training tokens/s there, `speed`
    its rate over the rate evaluations were measured at; a run's position embedding and width scale
    both as they scale training (factors)."""
    values = grids.run_settings(GRID, run)[0]
    factor = factors["pe"].get(values["pe"], 1.0) * factors["width"].get(values["n_embd"], 1.0)
    if kind == "train":
        return STARTUP_S + values["max_steps"] * values["batch_size"] * values["train_len"] / per_job * factor
    if kind == "analysis":
        return factors["analysis_s"] / speed
    rates = evals.get(values["pe"]) or evals["rope"]
    if kind == "passkey":
        trials = flag_value(GRID.passkey_args, "--trials", 100)
        tokens = {n: trials * n for n in GRID.lengths if n > values["train_len"] // 2}  # half train_len holds no prompt
        tokens[values["train_len"]] += 3 * 64 * values["train_len"]  # the copying diagnostics
    else:
        most = flag_value(GRID.ppl_args if kind == "ppl" else GRID.sotu_args, "--max_tokens", 131072)
        tokens = {n: most // n * n for n in GRID.lengths}
    return STARTUP_S + sum(count / (nearest(rates, n)["tok_per_s"] * speed) for n, count in tokens.items()) * factor


def grid_estimate(configs, base, evals, factors, results_grid, out_grid):
    """Hours of the whole default grid, and of the steps results_grid still lacks, with each
    configuration of processes measured: every step timed by step_seconds and scheduled as
    reproduce.py runs them (jobs.simulate)."""
    parts = {"all": grid_steps.plan(GRID, GRID.runs, out_grid + "-none", results_grid + "-none")}
    try:
        parts["left"] = grid_steps.plan(GRID, GRID.runs, out_grid, results_grid)
    except (grid_steps.GridError, UserError) as error:
        print(f"bench.py: the steps left are not estimated: {error}")
    found = []
    for config in configs:
        speed = config["tok_per_s_per_job"] / base["tok_per_s_per_job"]
        row = {"jobs": config["jobs"], "threads": config["threads"]}
        for part, planned in parts.items():
            steps, by_title = grid_steps.job_steps(GRID, GRID.runs, planned, out_grid, config["jobs"])
            seconds = {step.name: step_seconds(step.kind, by_title[step.name], step.name.split(maxsplit=1)[1],
                                               config["tok_per_s_per_job"], speed, evals, factors) for step in steps}
            row[part] = {"steps": len(steps), "hours": jobs.simulate(steps, config["jobs"], seconds) / 3600}
        found.append(row)
    return found


def analysis_seconds(results_grid):
    """The analysis step's last measured seconds (steps.jsonl; 600 where none was measured)."""
    try:
        with open(os.path.join(results_grid, "steps.jsonl")) as f:
            timed = [json.loads(line)["seconds"] for line in f if line.startswith('{"step": "analysis')]
    except (OSError, ValueError, KeyError):
        timed = []
    return timed[-1] if timed else 600.0


def grid_markdown(report):
    m, estimate = report["machine"], {(r["jobs"], r["threads"]): r for r in report["grid_estimate"]}
    load = report["load_average"]
    shared = load["start"] > 0.5
    lines = ["", f"### The default grid on this machine: {m['name']}, {m['cores']} cores", "",
             f"Training of the grid's model (RoPE, float32, batch {report['batch_size']}) by processes side by side, "
             "started together; the grid's wall time from these rates, every step of experiments/grids.py DEFAULT scheduled "
             "as `python -m experiments.reproduce --jobs N` runs them. Load average (1 min) at the start "
             f"{load['start']:.2f}, at the end {load['end']:.2f}"
             + (": the machine was shared with other work while this ran, so the rates are low and their ratios "
                "uncertain." if shared else " (bench.py's own processes included)."), "",
             "| processes × threads | training tok/s together | per process | the whole grid | what results/default "
             "lacks |", "|---|---|---|---|---|"]
    default = jobs.default_jobs(m["device"])
    for config in report["jobs"]:
        row = estimate[(config["jobs"], config["threads"])]
        part = [f"{row[p]['hours']:.1f} h ({row[p]['steps']} steps)" if p in row else "–" for p in ("all", "left")]
        is_default = (config["jobs"], config["threads"]) == (default, jobs.threads_per_job(default))
        mark = " (reproduce.py's default)" if is_default else ""
        lines.append(f"| {config['jobs']} × {config['threads']}{mark} | {config['tok_per_s']:,.0f} | "
                     f"{config['tok_per_s_per_job']:,.0f} | {part[0]} | {part[1]} |")
    lines += ["", "The estimate's assumptions: a run's training takes its tokens at the rate measured for RoPE with as "
              "many processes, times its position embedding's float32 step time over RoPE's (above) and its width's "
              f"step time over 256's ({', '.join(f'{w}: {f:.2f}' for w, f in report['factors']['width'].items())}, "
              f"{report['factors']['width_from']}); an evaluation its tokens at the rates above (the nearest length "
              "measured), scaled as training by the width and by the rate of a process among N; the fine-tunes at "
              f"pre-training's rate; {STARTUP_S:.0f} s to start a process; the analysis its last measured time "
              f"({report['factors']['analysis_s']:.0f} s, results/default/steps.jsonl)."]
    return lines


def flops_per_token(config):
    """Training FLOPs per token: 6 per matmul parameter plus attention (PaLM's estimate)."""
    matmul_params = GPT(config).num_params() - config.vocab_size * config.n_embd  # the embedding is a lookup
    return 6 * matmul_params + 12 * config.n_layer * config.n_embd * config.train_len


# -----------------------------------------------------------------------------
# the tables


def ratios(rows, modes, longest):
    """The comparisons the benchmark exists for, each from this run's own times."""
    found = {}
    pes = [name for name in rows if name != BASELINE]
    for mode in modes:
        for pe in pes:
            if BASELINE in rows:
                found[f"{pe} / reference, training tok/s ({mode})"] = (rows[pe][mode]["tok_per_s"]
                                                                        / rows[BASELINE][mode]["tok_per_s"])
            if pe != "rope" and "rope" in rows:
                found[f"{pe} / rope, training step time ({mode})"] = rows[pe][mode]["step_s"] / rows["rope"][mode]["step_s"]
    if "rope" in rows and "eval" in rows["rope"]:
        for pe in pes:
            if pe != "rope":
                at, rope = rows[pe]["eval"][str(longest)], rows["rope"]["eval"][str(longest)]
                found[f"{pe} / rope, evaluation time @{longest}"] = rope["tok_per_s"] / at["tok_per_s"]
                if at["peak_memory_mb"] and rope["peak_memory_mb"]:
                    found[f"{pe} / rope, evaluation peak memory @{longest}"] = at["peak_memory_mb"] / rope["peak_memory_mb"]
    return found


def markdown(report):
    cfg, rows, m, modes = report["config"], report["results"], report["machine"], report["modes"]
    lines = [f"The default grid's model ({cfg['n_layer']} layers, {cfg['n_embd']} wide, {cfg['n_head']} heads, "
             f"train_len {cfg['train_len']}, vocab {cfg['vocab_size']}, batch {report['batch_size']}) on {m['name']} "
             f"({m['device']}, {m['cores']} cores, {m['threads']} threads), torch {m['torch']}, measured on "
             f"{report['date'][:10]}. GEMM peak: "
             f"{report['gemm_peak_tflops']['fp32']:.2f} TFLOP/s float32, {report['gemm_peak_tflops']['bf16']:.2f} bf16; "
             f"train.py's --dtype auto picks {report['dtype']} here, the grids pin fp32. `{BASELINE}` is the plain GPT of "
             f"the same shape in bench.py." + (" Measured with --quick: rough numbers." if report["quick"] else ""), ""]
    lines += ["| model | " + " | ".join(f"train tok/s {mode}" for mode in modes) + " | "
              + " | ".join(f"MFU {mode}" for mode in modes) + " |", "|---" * (1 + 2 * len(modes)) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[mode]['tok_per_s']:,.0f}" for mode in modes) + " | "
                     + " | ".join(f"{row[mode]['mfu']:.1%}" for mode in modes) + " |")
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {name} | {value:.3f} |" for name, value in
                                                        report["ratios"].items()]
    evaluated = {name: row["eval"] for name, row in rows.items() if "eval" in row}
    if evaluated:
        lengths = list(next(iter(evaluated.values())))
        lines += ["", f"Evaluation: forward only, float32, batch 1, {report['eval_threads']} thread(s), each position "
                  "embedding in a fresh process (peak: its resident memory, or GPU allocations).", "",
                  "| pe | " + " | ".join(f"eval tok/s @{n}" for n in lengths) + " | "
                  + " | ".join(f"peak MB @{n}" for n in lengths) + " |", "|" + "---|" * (1 + 2 * len(lengths))]
        for name, evals in evaluated.items():
            lines.append(f"| {name} | " + " | ".join(f"{evals[n]['tok_per_s']:,.0f}" for n in lengths) + " | "
                         + " | ".join(f"{evals[n]['peak_memory_mb']:,.0f}" if evals[n]["peak_memory_mb"] else "–"
                                      for n in lengths) + " |")
    if report.get("jobs"):
        lines += grid_markdown(report)
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# what the README says of the machines (report.py writes it between its markers)


def grid_time_markdown(report):
    """One sentence: the default grid's wall time here with reproduce.py's default --jobs and with one
    process, from a bench.py JSON that measured processes side by side."""
    m = report["machine"]
    rows = {(r["jobs"], r["threads"]): r for r in report["grid_estimate"]}
    default = jobs.default_jobs(m["device"])
    cores = "both cores" if m["cores"] == 2 else f"all {m['cores']} cores"
    chosen, alone = rows[(default, jobs.threads_per_job(default))], rows[(1, m["cores"])]
    gain = report["ratios"][f"{default} jobs x {jobs.threads_per_job(default)} thread(s) / 1 job x {m['cores']}, "
                            "training tok/s together"]
    return (f"On a {m['cores']}-core {m['name']} (torch {m['torch']}), `python -m experiments.bench` (run on "
            f"{report['date'][:10]}) measured {default} one-thread training processes side by side at {gain:.2f}× "
            f"the tokens/s of one {m['cores']}-thread process, and from its rates estimated the whole default grid "
            "as it then was "
            f"({chosen['all']['steps']} steps) at {chosen['all']['hours']:.0f} hours with `--jobs {default}` "
            f"against {alone['all']['hours']:.0f} hours one step at a time on {cores}; what results/default lacked "
            f"then ({chosen['left']['steps']} steps) at {chosen['left']['hours']:.0f} hours "
            "([`results/bench.md`](results/bench.md)).")


def gpu_check_markdown(summaries):
    """A paragraph from experiments/gpu_check.py's summaries (the check first): the device, the
    check's three runs and how their headline numbers sit against the CPU seeds, and the other runs."""
    check = summaries[0]
    names = [n for n, r in check["runs"].items() if r["group"] == "check"]
    runs = [check["runs"][n] for n in names]
    cells = [cell for r in runs for metric in r["headline"].values() for cell in metric.values()]
    inside = sum(cell["in_cpu_range"] for cell in cells)
    passkey = [cell for r in runs for cell in r["headline"]["passkey_accuracy"].values()]
    others = {n: r for s in summaries for n, r in s["runs"].items() if r["group"] != "check" and r["status"] != "not started"}
    done = [n for n, r in others.items() if r["status"] == "done"]
    stopped = [f"{n} (step {r['steps']:,})" for n, r in others.items() if r["status"] != "done"]
    minutes = [r["wall_s"] / 60 for r in runs]
    beside = sum(r["status"] != "not started" for r in check["runs"].values()) - len(runs)
    text = (f"On one {check['gpu']} (torch {check['torch']}), `python -m experiments.gpu_check` trained "
            f"{', '.join(names)} as the grid does (3200 steps, float32) with {beside} more runs on the card at once, in {min(minutes):.1f}–{max(minutes):.1f} minutes each "
            f"({check['throughput']['check']['tok_per_s'] / 1e3:.0f}k tokens/s together, "
            f"{check['throughput']['check']['mfu_vs_fp32_peak']:.0%} of the card's measured float32 GEMM peak), and "
            f"evaluated them to 16× in {check['wall_s']['eval'] / 60:.1f} minutes. Of their {len(cells)} headline "
            f"numbers (perplexity ratio, passkey accuracy and the ratio on `sotu` at 1, 2, 4 and 16× `train_len`), "
            f"{inside} lie within the three CPU seeds' range, {sum(c['in_cpu_range'] for c in passkey)} of the "
            f"{len(passkey)} passkey accuracies among them ([`results/gpu_check.json`](results/gpu_check.json)).")
    if done:
        text += f" Also trained and evaluated there, one seed each: {', '.join(done)}."
    if stopped:
        text += f" Stopped by the check's time budget before their last step, not evaluated: {', '.join(stopped)}."
    return text


def machines_markdown(results_dir):
    """The README's paragraphs on the machines, from RESULTS_DIR/bench.json and gpu_check*.json
    (the check first, then the others by name); '' where none was saved. A file that is there but
    not what bench.py or gpu_check.py writes stops the report in one line."""
    bench = os.path.join(results_dir, "bench.json")
    summaries = grid_results.gpu_summaries(results_dir)
    paragraphs = []
    try:
        if os.path.exists(bench):
            paragraphs.append(grid_time_markdown(grid_results.read_json(bench)))
        if summaries and os.path.basename(summaries[0][0]) == "gpu_check.json":
            paragraphs.append(gpu_check_markdown([summary for _, summary in summaries]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
        raise UserError(f"{results_dir}: bench.json or gpu_check*.json is not what bench.py and gpu_check.py "
                        f"write ({type(error).__name__}: {error})") from None
    return "\n\n".join(paragraphs)
