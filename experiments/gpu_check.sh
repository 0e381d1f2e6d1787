#!/usr/bin/env bash
# gpu_check.sh: the project's check on a CUDA machine, in about 8 minutes on one H100-class GPU.
#
#     bash gpu_check.sh            # writes results/gpu_check.json
#
# 1. the test suite, whose GPU tests run only where PyTorch sees a GPU;
# 2. the default model (FoPE) trained for a few hundred steps on the GPU, bf16, compiled;
# 3. both evaluations of that checkpoint (perplexity and passkey, to 16x train_len);
# 4. bench.py on the GPU;
# 5. a summary: training tokens/s, MFU against the GPU's measured bf16 GEMM peak, peak memory,
#    evaluation tokens/s at 1x and 16x train_len.
# Without a GPU it says so in one line and exits 1, having run nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-300}
OUT=out/gpu_check

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: error: PyTorch sees no CUDA GPU here (torch.cuda.is_available() is False); nothing was run" >&2
    exit 1
fi
rm -rf "$OUT" && mkdir -p "$OUT"
python -c "import torch; print('gpu_check.sh:', torch.cuda.get_device_name(), 'torch', torch.__version__)"

echo "== 1. tests"
python -m pytest -q -x 2>&1 | tail -n 5

echo "== 2. training: $STEPS steps, bf16, compiled"
python train.py --pe fope --dtype bf16 --compile true --max_steps "$STEPS" --warmup_steps 30 \
    --passkey_frac 0.5 --eval_interval "$STEPS" --log_interval 25 --out_dir "$OUT" --run_name fope | tee "$OUT/train.log"

echo "== 3. evaluations"
python eval_ppl.py --ckpt "$OUT/fope/ckpt.pt" --dtype bf16 --out "$OUT/ppl.json"
python eval_passkey.py --ckpt "$OUT/fope/ckpt.pt" --trials 50 --out "$OUT/passkey.json"

echo "== 4. bench.py"
python -m experiments.bench --device cuda --out "$OUT/bench.json"

echo "== 5. summary"
python - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
bench = json.loads((out / "bench.json").read_text())
log = [json.loads(line) for line in (out / "fope/log.jsonl").read_text().splitlines()]
speeds = [r["tok_per_s"] for r in log if "tok_per_s" in r][1:]  # the first interval includes compilation
fope = bench["results"]["fope"]
train_len = bench["config"]["train_len"]
summary = {
    "gpu": bench["machine"]["name"], "torch": bench["machine"]["torch"],
    "train_tok_per_s": sorted(speeds)[len(speeds) // 2],
    "bench_train_tok_per_s": {mode: fope[mode]["tok_per_s"] for mode in ("eager", "compiled") if mode in fope},
    "mfu_compiled": fope.get("compiled", fope["eager"])["mfu"],
    "gemm_peak_bf16_tflops": bench["gemm_peak_tflops"]["bf16"],
    "eval_tok_per_s": {f"{m}x": fope["eval"][str(m * train_len)]["tok_per_s"] for m in (1, 16)},
    "eval_peak_memory_mb": {f"{m}x": fope["eval"][str(m * train_len)]["peak_memory_mb"] for m in (1, 16)},
    "ratios": bench["ratios"],
    "ppl": json.loads((out / "ppl.json").read_text())["checkpoints"][0]["ppl"],
    "passkey_accuracy": json.loads((out / "passkey.json").read_text())["checkpoints"][0]["accuracy"],
}
pathlib.Path("results").mkdir(exist_ok=True)
pathlib.Path("results/gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF
