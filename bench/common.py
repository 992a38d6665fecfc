"""Shared benchmark helpers: timing, environment record, result files."""

from __future__ import annotations

import json
import platform
import shlex
import statistics
import sys
import tempfile
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


GPU_ACTIVITY = ("kernel", "gpu_memcpy", "gpu_memset")  # chrome-trace categories of work on the GPU
RUNTIME_CALLS = ("cuda_runtime", "cuda_driver")  # the host calls that launched it (graph replays, kernels, copies)


def timeline(fn: Callable[[], object], device: torch.device) -> dict:
    """One call of `fn` on the GPU's timeline (torch.profiler, CUDA only): its wall time, how much of it the GPU was
    busy, the longest idle gaps, and per phase the runtime names (record_function "fastdiff::...") its host time and
    the GPU work it launched. Says where an end-to-end time beyond the sum of the kernels goes."""
    from torch.profiler import ProfilerActivity, profile, record_function

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("bench::call"):
            fn()
            sync(device)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    return timeline_summary(events)


def timeline_summary(events: list[dict]) -> dict:
    """timeline's numbers from chrome-trace events (times in ms from the call's start)."""
    call = next(e for e in events if e["name"] == "bench::call")
    t0, t1 = call["ts"], call["ts"] + call["dur"]
    gpu = sorted((max(e["ts"], t0), min(e["ts"] + e["dur"], t1), e) for e in events if e.get("cat") in GPU_ACTIVITY)
    gpu = [g for g in gpu if g[1] > g[0]]
    busy, gaps, edge = 0.0, [], t0
    for start, end, _ in gpu:
        if start > edge:
            gaps.append((edge, start))
        busy += max(0.0, end - max(start, edge))
        edge = max(edge, end)
    if t1 > edge:
        gaps.append((edge, t1))
    phases = sorted(
        (e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("fastdiff::")),
        key=lambda e: e["ts"],
    )
    launches = [e for e in events if e.get("cat") in RUNTIME_CALLS and "correlation" in e.get("args", {})]
    launched_at = {e["args"]["correlation"]: e["ts"] for e in launches}
    by_phase = {p["name"]: {"host_ms": p["dur"] / 1e3, "gpu": []} for p in phases}
    for start, end, e in gpu:
        at = launched_at.get(e.get("args", {}).get("correlation"))
        phase = next((p["name"] for p in phases if at is not None and p["ts"] <= at <= p["ts"] + p["dur"]), None)
        if phase is not None:
            by_phase[phase]["gpu"].append((start, end))
    phase_rows = {}
    for name, info in by_phase.items():
        spans = info["gpu"]
        phase_rows[name] = {
            "host_ms": info["host_ms"],
            "gpu_ms": sum(end - start for start, end in spans) / 1e3,
            "gpu_from_ms": (min(s for s, _ in spans) - t0) / 1e3 if spans else None,
            "gpu_to_ms": (max(e for _, e in spans) - t0) / 1e3 if spans else None,
        }
    return {
        "wall_ms": (t1 - t0) / 1e3,
        "gpu_busy_ms": busy / 1e3,
        "gpu_idle_ms": (t1 - t0 - busy) / 1e3,
        "longest_gaps_ms": [
            {"at_ms": (a - t0) / 1e3, "ms": (b - a) / 1e3} for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:8]
        ],
        "phases": phase_rows,
    }


def timeline_table(name: str, tl: dict) -> list[str]:
    lines = [
        f"### {name}: one generation on the GPU's timeline (profiled)",
        "",
        f"Wall {tl['wall_ms']:.1f} ms: GPU busy {tl['gpu_busy_ms']:.1f} ms, idle {tl['gpu_idle_ms']:.1f} ms. "
        "Longest idle gaps (start, length): "
        + ", ".join(f"{g['at_ms']:.1f} ms +{g['ms']:.2f}" for g in tl["longest_gaps_ms"]),
        "",
    ]
    if tl["phases"]:
        lines += ["| phase | host ms | GPU ms launched | GPU from .. to ms |", "|---|---|---|---|"]
        for phase, p in tl["phases"].items():
            window = "" if p["gpu_from_ms"] is None else f"{p['gpu_from_ms']:.1f} .. {p['gpu_to_ms']:.1f}"
            lines.append(f"| {phase.removeprefix('fastdiff::')} | {p['host_ms']:.1f} | {p['gpu_ms']:.1f} | {window} |")
    return [*lines, ""]


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


def write_results(out: Path, record: dict, table: str, echo: bool = True) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    if echo:
        print(table, flush=True)
