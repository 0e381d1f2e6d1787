"""
hardware.py: where a script runs and in which precision, decided once for every script.

    device  "auto" -> "cuda" where PyTorch sees a GPU (CUDA_VISIBLE_DEVICES respected), else "cpu"
    dtype   "auto" -> "bf16" where the hardware multiplies bfloat16 natively, else "fp32"
    machine_name(device)  the GPU's or the CPU's model name, which every measured time names

bf16 autocast is only a speed-up where the hardware has bf16 arithmetic: CUDA GPUs from
Ampere on, and CPUs with AMX or AVX512-BF16 (Intel Sapphire Rapids, AMD Zen 4 and later).
Elsewhere PyTorch emulates it, and on an AVX2 CPU a bf16 matrix multiply is about 70x slower
than a float32 one, so "auto" picks float32 there.
"""

import contextlib
import platform
import statistics
import time

import torch

from lib.files import UserError

DTYPES = ("auto", "bf16", "fp32")


class HardwareError(UserError):
    """A device or precision that cannot be used here."""


def resolve_device(name):
    """'auto', 'cpu', 'cuda' or 'cuda:N' -> a usable torch device string."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HardwareError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU here (use --device cpu or auto)")
    try:
        torch.empty(0, device=name)
    except (RuntimeError, ValueError) as error:
        raise HardwareError(f"device {name!r} is not usable: {str(error).strip().splitlines()[0]}") from None
    return name


def machine_name(device):
    """The model name of the GPU, or of the CPU as Linux reports it."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def native_bf16(device):
    """Whether this device multiplies bfloat16 matrices in hardware."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported(including_emulation=False)
    # private helpers, present since torch 2.2; a CPU they cannot vouch for counts as without
    flags = [getattr(torch.cpu, name, lambda: False) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(flag() for flag in flags)


def resolve_dtype(name, device):
    """'auto', 'bf16' or 'fp32' -> 'bf16' or 'fp32' for this device."""
    if name not in DTYPES:
        raise HardwareError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return name


def autocast(dtype, device):
    """bf16 autocast for 'bf16', nothing for 'fp32'. Weights, norms and the rotary tables
    stay float32 either way; only the matrix multiplies run in bf16."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)


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
