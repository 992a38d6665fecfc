"""Compiled AOTInductor packages, bound to weights the runtime owns: one interface, two runners.

`load_module(path, weights, device)` gives a CompiledModule: call it with the flat tensor inputs the package was
exported with. Weights are bound user-managed (the package uses the runtime's tensors in place, so packages for
several resolutions share one copy). Two runners implement it:

- "capi" (capi.py): the package's library called through its C interface with ctypes, without the GIL, so that a
  load's other threads and a server's other requests run beside a compiled call. The default, where its self-check
  passes.
- "torch": torch's public loader, `torch._inductor.package.load_package(..., run_single_threaded=True)` with
  `load_constants(..., user_managed=True)`. It holds the GIL for a call; it is the fallback that always works.

FASTDIFF_PACKAGE_RUNNER=capi or torch forces one (for debugging); unset, the C interface is used where its
self-check passes and a package it cannot run (a layout it does not know, extern kernels that need torch's proxy
executor) goes to torch's loader.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import FastDiffError
from .format import make_libstdcxx_global

log = logging.getLogger(__name__)

RUNNER_VARIABLE = "FASTDIFF_PACKAGE_RUNNER"
RUNNERS = ("capi", "torch")


class RunnerUnavailable(Exception):
    """The C-interface runner cannot run this package here; torch's loader may."""


def missing_weights(path: Path, names: Iterable[str], weights: Mapping[str, torch.Tensor]) -> None:
    """Refuse a package whose constants the weight file lacks."""
    missing = [name for name in names if name not in weights]
    if missing:
        raise FastDiffError(
            f"{path} needs {len(missing)} weights that the weight file lacks (e.g. {missing[0]})",
            "the artifact's files do not belong together: export the model again",
        )


# Modules still loaded at exit are closed before the interpreter's teardown: Python does not promise to destroy every
# object (one reachable from builtins outlives it), and their extracted files would stay in the temp folder.
_loaded: weakref.WeakSet[CompiledModule] = weakref.WeakSet()


@atexit.register
def _release_loaded() -> None:
    for module in list(_loaded):
        module.close()


class CompiledModule:
    """One AOTInductor package bound to weights. A call takes the flat tensor inputs the package was exported with;
    calls to one module from several threads run one at a time."""

    runner: str  # "capi" or "torch"
    num_inputs: int

    def __init__(self, path: Path, weights: Mapping[str, torch.Tensor], device: torch.device) -> None:
        self.path = path
        self.weights = weights  # user-managed: the package uses these tensors in place
        index = torch.cuda.current_device() if device.type == "cuda" and device.index is None else device.index
        self.device_index = -1 if device.type == "cpu" else index  # -1: the CPU
        self._lock = threading.Lock()
        _loaded.add(self)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != self.num_inputs:  # the library's own check ends the process
            raise TypeError(f"{self.path} takes {self.num_inputs} inputs, got {len(inputs)}")
        with self._lock:
            outputs = self._run(inputs)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _run(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        raise NotImplementedError

    def close(self) -> None:
        """Unload the package's code and delete its extracted files (after the GPU has run its kernels)."""
        raise NotImplementedError

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class TorchModule(CompiledModule):
    """A package run through torch's public loader."""

    runner = "torch"

    def __init__(self, path: Path, weights: Mapping[str, torch.Tensor], device: torch.device) -> None:
        super().__init__(path, weights, device)
        from torch._inductor.package import load_package
        from torch.utils import _pytree

        make_libstdcxx_global()
        self._model = None
        try:
            with _device_of(self.device_index):  # the loader makes the package's device current
                self._model = load_package(str(path), run_single_threaded=True, device_index=self.device_index)
        except Exception as e:
            raise FastDiffError(
                f"cannot load compiled package {path}: {_first_line(e)}",
                "the artifact is damaged or was built elsewhere: run fastdiff-inspect --verify, or export again",
            ) from None
        names = self._model.get_constant_fqns()
        missing_weights(path, names, weights)
        self._model.load_constants({n: weights[n] for n in names}, check_full_update=True, user_managed=True)
        self.num_inputs = _pytree.treespec_loads(self._model.loader.get_call_spec()[0]).num_leaves

    def _run(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if self._model is None:
            raise RuntimeError(f"{self.path} was closed")
        return self._model.loader.boxed_run(list(inputs))

    def close(self) -> None:
        with self._lock:
            if self._model is not None and self.device_index >= 0:
                with torch.cuda.device(self.device_index), contextlib.suppress(RuntimeError):
                    torch.cuda.synchronize()  # its kernels' code goes with it
            self._model = None


def _device_of(index: int) -> contextlib.AbstractContextManager:
    return torch.cuda.device(index) if index >= 0 else contextlib.nullcontext()


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def chosen_runner() -> str | None:
    """The runner FASTDIFF_PACKAGE_RUNNER names, or None (automatic)."""
    name = os.environ.get(RUNNER_VARIABLE, "").strip().lower()
    if not name:
        return None
    if name not in RUNNERS:
        raise FastDiffError(
            f"{RUNNER_VARIABLE}={name!r} names no package runner", f"use one of {', '.join(RUNNERS)}, or unset it"
        )
    return name


def load_module(path: Path, weights: Mapping[str, torch.Tensor], device: torch.device) -> CompiledModule:
    """The package at `path`, bound to `weights`, on `device`, through the runner chosen (see the module's doc)."""
    from . import capi

    runner = chosen_runner()
    if runner == "torch":
        return TorchModule(path, weights, device)
    problem = capi.self_check()
    if problem is None:
        try:
            return capi.CapiModule(path, weights, device)
        except RunnerUnavailable as e:
            problem = f"{path}: {e}"
    if runner == "capi":
        raise FastDiffError(
            f"the C-interface package runner cannot run here: {problem}", f"unset {RUNNER_VARIABLE}, or set it to torch"
        )
    log.info("package runner: torch's loader (the C interface cannot run it: %s)", problem)
    return TorchModule(path, weights, device)


class CUDAGraphModule:
    """Replays a compiled module (the UNet step, a text encoder) as a CUDA graph, one per input signature, with
    static input buffers.

    AOTInductor ignores Inductor's own cudagraph option, so launch overhead is removed here: the first call
    with a new signature warms up and captures; later calls copy inputs into the static buffers and replay.
    The package must be loaded single-threaded (as CompiledModule does) for its kernels to be capturable.
    """

    def __init__(self, module: CompiledModule) -> None:
        self.module = module
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[list[torch.Tensor], torch.cuda.CUDAGraph, Any]] = {}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        key = tuple((t.shape, t.dtype) for t in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        static_inputs, graph, static_output = self.graphs[key]
        for buffer, value in zip(static_inputs, inputs, strict=True):
            buffer.copy_(value, non_blocking=True)
        graph.replay()
        # the next replay overwrites the static outputs
        if isinstance(static_output, torch.Tensor):
            return static_output.clone()
        return tuple(t.clone() for t in static_output)

    def _capture(self, inputs: tuple[torch.Tensor, ...]):
        static_inputs = [t.clone() for t in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # One run first, off the capture: it loads the kernels and has cuBLAS and cuDNN choose and allocate, none of
        # which a capture allows (Inductor's CUDA-graph trees warm up once, too).
        with torch.cuda.stream(stream):
            self.module(*static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_output = self.module(*static_inputs)
        return static_inputs, graph, static_output
