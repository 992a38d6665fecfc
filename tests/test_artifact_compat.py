"""An artifact compiled for another machine (device, GPU architecture, CPU instruction set) or another torch is
refused before it is loaded, naming what differs; what does match loads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import invoke_cli
from helpers import assert_clean_error, copy_artifact, edit_manifest, images_in, run

from fastdiff.runtime import FastDiffError, load_pipeline, read_manifest
from fastdiff.runtime import compat as compat_module
from fastdiff.runtime.compat import check_compatible


def test_artifact_for_another_device(tiny_artifact: Path, tmp_path: Path) -> None:
    art = copy_artifact(tiny_artifact, tmp_path)
    edit_manifest(art, lambda d: d["device"].update(type="cuda", name="NVIDIA H100", capability="9.0"))
    assert_clean_error(run(art, tmp_path), "compiled for cuda, not cpu")
    with pytest.raises(FastDiffError, match="compiled for cuda, not cpu"):
        load_pipeline(art, device="cpu")
    if not torch.cuda.is_available():  # the default device is the artifact's
        proc = invoke_cli("fastdiff-run", str(art), "-p", "a cat", "--out", str(tmp_path / "img.png"))
        assert_clean_error(proc, "compiled for cuda, but no CUDA GPU is visible", "a machine with a GPU")
        with pytest.raises(FastDiffError, match="no CUDA GPU"):
            load_pipeline(art)
        proc = invoke_cli("fastdiff-inspect", str(art))  # the summary, then the check's failure
        assert_clean_error(proc, "cannot load here", "no CUDA GPU is visible")
        assert re.search(r"^loads here\s+no: this artifact was compiled for cuda", proc.stdout, re.M), proc.stdout
    assert images_in(tmp_path) == []


def _cuda_record(capability: str) -> dict[str, Any]:
    return {"type": "cuda", "cpu_isa": "AVX2", "name": f"GPU sm{capability}", "capability": capability}


def test_artifact_for_another_gpu_architecture(tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Faked: a manifest built on capability 8.0, a process whose GPU says 9.0."""
    manifest = read_manifest(tiny_artifact)
    manifest.device = _cuda_record("8.0")
    monkeypatch.setattr(compat_module, "device_record", lambda device: _cuda_record("9.0"))
    with pytest.raises(FastDiffError, match=r"compute capability 8\.0 .* is 9\.0") as info:
        check_compatible(manifest, torch.device("cuda"))
    assert "export the model again on this kind of GPU" in str(info.value)
    monkeypatch.setattr(compat_module, "device_record", lambda device: _cuda_record("8.0"))
    check_compatible(manifest, torch.device("cuda"))  # the same architecture is fine


def test_artifact_for_a_wider_cpu_isa(tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = read_manifest(tiny_artifact)
    manifest.device = {**manifest.device, "cpu_isa": "AVX512"}
    monkeypatch.setattr(compat_module, "device_record", lambda device: {"type": "cpu", "cpu_isa": "AVX2"})
    with pytest.raises(FastDiffError, match="compiled for CPUs with AVX512, this CPU has AVX2"):
        check_compatible(manifest, torch.device("cpu"))
    manifest.device = {**manifest.device, "cpu_isa": "DEFAULT"}
    check_compatible(manifest, torch.device("cpu"))  # a narrower ISA runs on a wider CPU


def test_incompatible_torch(tiny_artifact: Path, tmp_path: Path) -> None:
    art = copy_artifact(tiny_artifact, tmp_path)
    edit_manifest(art, lambda d: d["versions"].update(torch="2.9.0"))
    assert_clean_error(run(art, tmp_path), "compiled with torch 2.9.0", "install torch 2.9.x")
    with pytest.raises(FastDiffError, match="compiled with torch 2.9.0"):
        load_pipeline(art, device="cpu")
    proc = invoke_cli("fastdiff-inspect", str(art))
    assert_clean_error(proc, "cannot load here", "compiled with torch 2.9.0", "install torch 2.9.x")
    with open(art / "unet" / "weights.safetensors", "ab") as f:  # damaged too: one error naming both
        f.write(b"\0")
    proc = invoke_cli("fastdiff-inspect", str(art))
    assert_clean_error(proc, "do not match the manifest, and it cannot load here: ", "compiled with torch 2.9.0")
    assert proc.stderr.count("error:") == 1, proc.stderr


def test_same_torch_minor_is_compatible(tiny_artifact: Path) -> None:
    manifest = read_manifest(tiny_artifact)
    major_minor = ".".join(torch.__version__.split(".")[:2])
    manifest.versions = {**manifest.versions, "torch": f"{major_minor}.99"}
    check_compatible(manifest, torch.device("cpu"))
