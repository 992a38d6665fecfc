"""Compiled AOTInductor packages, bound to weights the runtime owns.

`torch._inductor.aoti_load_package` test-compiles a C++ program on every call (to query the device); the loader it
wraps needs none of that, so the runtime calls the loader directly. Weights are bound with `user_managed=True`:
the package uses the runtime's tensors in place, so packages for several resolutions share one copy.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import shutil
import sys
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import treespec_loads

from .errors import FastDiffError

_libstdcxx_global = False


def make_libstdcxx_global() -> None:
    """Put the process's libstdc++ into the global symbol scope before the first package is opened.

    Python opens torch's extension with RTLD_LOCAL, so the libstdc++ it pulls in stays local to it. A package's
    wrapper.so does not list libstdc++ as a dependency, so its C++ runtime symbols (std::regex, locales) then bind
    to uninitialised copies: on the project's H200 image (torch 2.11) every package load segfaulted, unless
    libstdc++ was preloaded. Promoting the already loaded library to RTLD_GLOBAL does the same from inside the
    process (seen there: exit 139 without it, a clean load with it).
    """
    global _libstdcxx_global
    if _libstdcxx_global or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
    except OSError:
        pass  # not loaded under that name: nothing to promote
    _libstdcxx_global = True


# Every package's loader extracts the package into a folder of the temp dir and deletes it when destroyed. Python does
# not promise to destroy every object at exit (one reachable from builtins, say, through an import hook's globals,
# outlives the teardown), and such a pipeline left its packages' folders behind: released here before the teardown.
_loaded: weakref.WeakSet[CompiledModule] = weakref.WeakSet()


@atexit.register
def _release_loaded() -> None:
    modules = list(_loaded)
    for index in {m.device_index for m in modules if m.device_index >= 0}:
        with contextlib.suppress(RuntimeError):  # a GPU in an error state: nothing runs on it any more
            torch.cuda.synchronize(index)  # no kernel of theirs may still be running when their code is unloaded
    for module in modules:
        module._loader = None


class CompiledModule:
    """One AOTInductor package: call it with the flat tensor inputs it was exported with."""

    def __init__(self, path: Path, weights: Mapping[str, torch.Tensor], device: torch.device) -> None:
        make_libstdcxx_global()
        self.path = path
        device_index = -1 if device.type == "cpu" else device.index
        if device_index is None:  # plain "cuda"
            device_index = torch.cuda.current_device()
        self.device_index = device_index
        try:
            self._loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, device_index)
        except Exception as e:  # the loader reports damaged archives and foreign binaries as RuntimeError
            _remove_extraction(str(e))
            raise FastDiffError(
                f"cannot load compiled package {path}: {str(e).splitlines()[0]}",
                "the artifact is damaged or was built elsewhere: run fastdiff-inspect --verify, or export again",
            ) from None
        names = self._loader.get_constant_fqns()
        missing = [n for n in names if n not in weights]
        if missing:
            raise FastDiffError(
                f"{path} needs {len(missing)} weights that the weight file lacks (e.g. {missing[0]})",
                "the artifact's files do not belong together: export the model again",
            )
        self._loader.load_constants({n: weights[n] for n in names}, False, False, True)
        self.weights = weights  # user-managed: the package uses these tensors in place
        self.num_inputs = treespec_loads(self._loader.get_call_spec()[0]).num_leaves  # the flat tensor inputs
        _loaded.add(self)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = self._loader.run(list(inputs))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _remove_extraction(error: str) -> None:
    """A loader that failed leaves the folder it extracted the package into (only a loader that was made deletes its
    own); its error names it when the package's library cannot be opened (a damaged or foreign binary)."""
    match = re.search(r"(/\S*/aotinductor_\w{6})/", error)
    folder = match and Path(match.group(1))
    temp_dirs = {Path(os.environ.get("TMPDIR") or "/tmp"), Path("/tmp")}  # torch 2.11 extracts to /tmp regardless
    if folder and folder.parent in temp_dirs and not folder.is_symlink():
        shutil.rmtree(folder, ignore_errors=True)


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
        # which a capture allows (Inductor's CUDA-graph trees warm up once, too). A run costs the load host time: on
        # the H200, SDXL's warm-up spent 1.06 s of it on three UNet runs and three of each text encoder, 0.49 s in
        # cuDNN attention's host side (bench/results/2026-12-01-h200-l, probe-warmup.txt).
        with torch.cuda.stream(stream):
            self.module(*static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_output = self.module(*static_inputs)
        return static_inputs, graph, static_output
