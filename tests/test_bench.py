"""The benchmark's own arithmetic for one generation's timeline (bench/common.py: GPU busy and idle time, idle gaps,
the GPU work each runtime phase launched), on a real CPU profiler trace and on GPU events laid out by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fastdiff.runtime.pipeline import PHASES

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from common import timeline, timeline_summary  # noqa: E402


def test_timeline_of_a_generation_names_its_phases(tiny_pipeline) -> None:
    tl = timeline(
        lambda: tiny_pipeline("a photo of a cat", num_inference_steps=2, height=64, width=64), torch.device("cpu")
    )
    assert list(tl["phases"]) == [f"fastdiff::{phase}" for phase in PHASES]
    assert all(p["host_ms"] > 0 and p["gpu_ms"] == 0 for p in tl["phases"].values())
    assert sum(p["host_ms"] for p in tl["phases"].values()) <= tl["wall_ms"]
    assert tl["gpu_busy_ms"] == 0 and tl["gpu_idle_ms"] == pytest.approx(tl["wall_ms"])


def _event(name: str, cat: str, ts: float, dur: float, correlation: int | None = None) -> dict:
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def test_timeline_attributes_gpu_work_to_the_phase_that_launched_it() -> None:
    """A 100 us call: encode_prompt launches a kernel that runs 20-50 us, denoise a graph whose two kernels overlap
    (60-80 and 70-75 us); a kernel launched before the call and one running past its end are clipped to it."""
    events = [
        _event("bench::call", "user_annotation", 1000, 100),
        _event("fastdiff::encode_prompt", "user_annotation", 1000, 30),
        _event("fastdiff::denoise", "user_annotation", 1030, 60),
        _event("cudaLaunchKernel", "cuda_runtime", 1010, 2, correlation=1),
        _event("cudaGraphLaunch", "cuda_runtime", 1040, 2, correlation=2),
        _event("text", "kernel", 1020, 30, correlation=1),
        _event("unet_a", "kernel", 1060, 20, correlation=2),
        _event("unet_b", "kernel", 1070, 5, correlation=2),
        _event("earlier", "kernel", 900, 50, correlation=9),  # before the call: left out
        _event("copy", "gpu_memcpy", 1095, 10, correlation=9),  # runs 95-105 us: counted to the call's end
    ]
    tl = timeline_summary(events)
    assert tl["wall_ms"] == pytest.approx(0.1)
    assert tl["gpu_busy_ms"] == pytest.approx(0.055)  # 20-50, 60-80, 95-100 us
    assert tl["gpu_idle_ms"] == pytest.approx(0.045)
    gaps = [(g["at_ms"], g["ms"]) for g in tl["longest_gaps_ms"]]
    # flat: pytest.approx takes no nested sequences (pytest 9.2 refuses them)
    assert [x for gap in gaps for x in gap] == pytest.approx([0.0, 0.02, 0.08, 0.015, 0.05, 0.01])
    encode, denoise = tl["phases"]["fastdiff::encode_prompt"], tl["phases"]["fastdiff::denoise"]
    assert (encode["host_ms"], encode["gpu_ms"], encode["gpu_from_ms"], encode["gpu_to_ms"]) == pytest.approx(
        (0.03, 0.03, 0.02, 0.05)
    )
    assert (denoise["gpu_ms"], denoise["gpu_from_ms"], denoise["gpu_to_ms"]) == pytest.approx((0.025, 0.06, 0.08))


@pytest.mark.slow  # three processes, each importing torch and diffusers
def test_modes_puts_every_mode_side_by_side(tiny_artifact: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """bench/modes.py: a process per mode, a row per mode, batch and step count, each mode's step time from its two
    step counts, and one step's error against eager fp32 (an fp32 artifact: none to speak of)."""
    import json
    import subprocess

    out = tmp_path / "modes"
    command = [
        sys.executable,
        str(Path(__file__).parents[1] / "bench" / "modes.py"),
        "--checkpoint",
        str(tiny_checkpoint),
    ]
    command += ["--artifact", f"fp32={tiny_artifact}", "--baselines", "eager", "--batches", "1,2", "--steps", "1,3"]
    command += ["--res", "64", "--runs", "1", "--warmup", "1", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modes = json.loads((out / "modes.json").read_text())["modes"]
    assert list(modes) == ["diffusers eager", "fastdiff fp32"]
    for record in modes.values():
        assert [(r["batch"], r["steps"]) for r in record["rows"]] == [(1, 1), (2, 1), (1, 3), (2, 3)]
        # the same step time on both rows of a batch (a difference of one run each: its sign is noise on 2 cores)
        assert all(isinstance(r["step_ms"], float) and r["images_per_s"] > 0 for r in record["rows"])
        assert record["rows"][0]["step_ms"] == record["rows"][2]["step_ms"]
    assert modes["fastdiff fp32"]["step_error"] < 1e-4
    assert 1e-4 < modes["diffusers eager"]["step_error"] < 0.05  # the baseline runs in bf16
    table = (out / "modes.md").read_text()
    assert table.count("| fastdiff fp32 |") == 4 and "bench/modes.py" in table
