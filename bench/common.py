"""Shared benchmark helpers: timing, environment record, result files."""

from __future__ import annotations

import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, runs: int = 20) -> list[float]:
    """Wall times in ms of `fn`, device work included (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


# GPU kernel families by name (cuDNN, cuBLAS, CUTLASS, flash-attention and Triton kernel naming), checked in order.
# Inductor names its fused Triton kernels after the ops they fused (triton_poi_fused_convolution_native_group_norm_...
# is a bias add + GroupNorm, not a convolution), so those are Triton whatever their names say.
TRITON_FUSED = ("triton_poi", "triton_red", "triton_per")
KERNEL_FAMILIES = [
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("convolution", ("conv", "fprop", "implicit_gemm", "winograd")),
    ("matmul", ("gemm", "nvjet", "cutlass", "matmul", "scaled_mm", "_mm_", "tem_fused")),
    ("triton (fused elementwise, norms)", ("triton",)),
]


def kernel_family(name: str) -> str:
    lowered = name.lower()
    if lowered.startswith(TRITON_FUSED):
        return KERNEL_FAMILIES[-1][0]
    return next((family for family, keys in KERNEL_FAMILIES if any(k in lowered for k in keys)), "other")


def kernel_profile(fn: Callable[[], object], device: torch.device, runs: int = 5) -> dict:
    """GPU time per call of `fn` by kernel family and by kernel, longest first, from torch.profiler (CUDA only):
    every kernel, so that two variants' profiles can be compared kernel by kernel."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        sync(device)
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.device_time_total > 0]
    families: dict[str, float] = {}
    for e in kernels:
        family = kernel_family(e.key)
        families[family] = families.get(family, 0.0) + e.device_time_total / 1e3 / runs
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    return {
        "gpu_ms_per_call": sum(families.values()),
        "families_ms": dict(sorted(families.items(), key=lambda kv: -kv[1])),
        "kernels": [
            {"name": e.key[:160], "ms_per_call": e.device_time_total / 1e3 / runs, "calls": e.count // runs}
            for e in kernels
        ],
    }


def profile_table(name: str, profile: dict, top: int = 15) -> list[str]:
    total = profile["gpu_ms_per_call"]
    lines = [f"### {name}: GPU time per UNet step {total:.2f} ms", ""]
    lines += ["| kernel family | ms | share |", "|---|---|---|"]
    lines += [f"| {f} | {ms:.2f} | {ms / total:.0%} |" for f, ms in profile["families_ms"].items()]
    lines += ["", "| top kernels | ms | calls |", "|---|---|---|"]
    lines += [f"| `{k['name'][:90]}` | {k['ms_per_call']:.2f} | {k['calls']} |" for k in profile["kernels"][:top]]
    return [*lines, ""]


def summary(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def environment(device: torch.device) -> dict:
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
        "torchao": version("torchao"),
        "device": device.type,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


def write_results(out: Path, record: dict, table: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table, flush=True)
