"""Compatibility of an artifact with this process: device kind, GPU architecture, CPU ISA and torch version.

Compiled packages hold machine code for one device kind and architecture, and call into libtorch through an ABI
that is only stable within one torch minor release, so these must match where the artifact is loaded.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import FastDiffError
from .format import Manifest, device_record


def torch_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """`device` made the current CUDA device for the block (restored after it): AOTInductor packages run on the
    current device's stream, and a package's loader makes its own device current, so a pipeline on another GPU than
    the current one loads and runs inside this."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_compatible(manifest: Manifest, device: torch.device) -> None:
    """Raise a FastDiffError naming the mismatch if the artifact cannot run on `device` in this process."""
    built = manifest.device
    if built["type"] != device.type:
        raise FastDiffError(
            f"this artifact was compiled for {built['type']}, not {device.type}",
            f"load it with device={built['type']!r}, or export the model again with --device {device.type}",
        )
    here = device_record(device)
    if device.type == "cuda" and built.get("capability") != here["capability"]:
        raise FastDiffError(
            f"this artifact was compiled for compute capability {built.get('capability')} ({built.get('name')}), "
            f"but {here['name']} is {here['capability']}",
            "export the model again on this kind of GPU",
        )
    if device.type == "cpu" and not _cpu_isa_covers(here["cpu_isa"], built.get("cpu_isa")):
        raise FastDiffError(
            f"this artifact was compiled for CPUs with {built.get('cpu_isa')}, this CPU has {here['cpu_isa']}",
            "export the model again on this machine",
        )
    built_torch = manifest.versions.get("torch", "")
    if torch_minor(built_torch) != torch_minor(torch.__version__):
        raise FastDiffError(
            f"this artifact was compiled with torch {built_torch}, this process has torch {torch.__version__}",
            f"install torch {torch_minor(built_torch)}.x, or export the model again with this torch",
        )


_X86_ISA_LADDER = ("DEFAULT", "AVX2", "AVX512")


def _cpu_isa_covers(here: str, built: str | None) -> bool:
    if here in _X86_ISA_LADDER and built in _X86_ISA_LADDER:
        return _X86_ISA_LADDER.index(here) >= _X86_ISA_LADDER.index(built)
    return here == built
