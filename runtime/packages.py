"""Compiled AOTInductor packages, bound to weights the runtime owns, run through their library's C interface.

A package is a zip archive holding one compiled model library (and, for a GPU, its kernels' binaries). The runtime
extracts it into a temp folder and calls the library's C functions (AOTInductorModelContainer*, the interface that
torch's own package loader calls) through ctypes, which lets go of the GIL for the call: torch's loader holds it for
a whole run (pytorch/pytorch#197516), so a load's Python work (the scheduler's import) stood still while a package
warmed up, and threads serving requests could not overlap one's compiled call with another's Python. Weights are
bound user-managed: the package uses the runtime's tensors in place, so packages for several resolutions share one
copy. `torch._inductor.aoti_load_package`, besides, test-compiles a C++ program on every call to query the device.
"""

from __future__ import annotations

import _ctypes
import atexit
import contextlib
import ctypes
import os
import shutil
import sys
import tempfile
import threading
import weakref
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

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


class _ConstantEntry(ctypes.Structure):  # AOTInductorConstantMapEntry
    _fields_ = [("name", ctypes.c_char_p), ("handle", ctypes.c_void_p)]


_handle = ctypes.c_void_p
_size = ctypes.c_size_t
_out_str = ctypes.POINTER(ctypes.c_char_p)
_SIGNATURES = {  # the library's C functions used here (torch/csrc/inductor/aoti_runtime/interface.h)
    "AOTInductorModelContainerCreateWithDevice": [ctypes.POINTER(_handle), _size, ctypes.c_char_p, ctypes.c_char_p],
    "AOTInductorModelContainerDelete": [_handle],
    "AOTInductorModelContainerGetNumInputs": [_handle, ctypes.POINTER(_size)],
    "AOTInductorModelContainerGetNumOutputs": [_handle, ctypes.POINTER(_size)],
    "AOTInductorModelContainerGetNumConstants": [_handle, ctypes.POINTER(_size)],
    "AOTInductorModelContainerGetConstantName": [_handle, _size, _out_str],
    "AOTInductorModelContainerGetConstantOriginalFQN": [_handle, _size, _out_str],
    "AOTInductorModelContainerUpdateUserManagedConstantBufferPairs": [
        _handle,
        ctypes.POINTER(_ConstantEntry),
        _size,
        ctypes.c_bool,
        ctypes.c_bool,
    ],
    # (container, inputs, number of inputs, outputs, number of outputs, stream, proxy executor); single-threaded: no
    # stream synchronisation of its own, so that the call can be captured in a CUDA graph
    "AOTInductorModelContainerRunSingleThreaded": [
        _handle,
        ctypes.POINTER(_handle),
        _size,
        ctypes.POINTER(_handle),
        _size,
        _handle,
        _handle,
    ],
}

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
_new_capsule = ctypes.pythonapi.PyCapsule_New
_new_capsule.restype, _new_capsule.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def _new_handles(tensors: list[torch.Tensor]) -> list[int]:
    """New AtenTensorHandles (owning references to `tensors`), as a run takes its inputs."""
    return [_capsule_pointer(c, None) for c in torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(tensors)]


def _steal_handles(handles: list[int]) -> list[torch.Tensor]:
    """The tensors behind `handles`, which are released."""
    return torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs([_new_capsule(h, None, None) for h in handles])


class PackageLibrary:
    """A package's model library, extracted into a temp folder and opened, with one model container on `device`."""

    def __init__(self, path: Path, device: torch.device) -> None:
        make_libstdcxx_global()
        index = torch.cuda.current_device() if device.type == "cuda" and device.index is None else device.index
        self.device_index = -1 if device.type == "cpu" else index
        self.folder = tempfile.mkdtemp(prefix="fastdiff-package-")
        self.container = _handle()
        self._library = None
        library_path = None
        try:
            library_path = _extract_library(path, self.folder)
            self._library = ctypes.CDLL(library_path)
            self._functions = {name: self._function(name, args) for name, args in _SIGNATURES.items()}
            device_name = "cpu" if self.device_index < 0 else f"cuda:{self.device_index}"
            self.call(
                "CreateWithDevice",
                ctypes.byref(self.container),
                1,
                device_name.encode(),
                os.path.dirname(library_path).encode(),  # where a GPU package's kernel binaries are
            )
        except BaseException as e:
            self.close()
            if not isinstance(e, Exception):  # a Ctrl-C
                raise
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            if library_path:
                detail = detail.replace(library_path, "its library")
            raise FastDiffError(
                f"cannot load compiled package {path}: {detail}",
                "the artifact is damaged or was built elsewhere: run fastdiff-inspect --verify, or export again",
            ) from None

    def _function(self, name: str, argtypes: list) -> Any:
        try:
            function = getattr(self._library, name)
        except AttributeError:
            raise OSError(f"its library has no {name}: not an AOTInductor model library of this torch") from None
        function.argtypes, function.restype = argtypes, ctypes.c_int
        return function

    def call(self, name: str, *args: Any) -> None:
        """AOTInductorModelContainer<name>(*args), its error raised as a RuntimeError."""
        if self._functions[f"AOTInductorModelContainer{name}"](*args) != 0:
            raise RuntimeError(f"AOTInductorModelContainer{name} failed: {self._last_error()}")

    def _last_error(self) -> str:
        try:  # libraries built by torch 2.12 and later keep it; older ones only print it
            get = ctypes.PYFUNCTYPE(ctypes.c_int, _out_str)(("AOTInductorGetLastError", self._library))
        except AttributeError:
            get = None
        message = ctypes.c_char_p()
        if get is None or get(ctypes.byref(message)) != 0 or not message.value:
            return "the package's error is printed above"
        return message.value.decode(errors="replace")

    def count(self, what: str) -> int:
        n = _size()
        self.call(f"GetNum{what}", self.container, ctypes.byref(n))
        return n.value

    def constant_names(self) -> dict[str, str]:
        """Each constant's name in the library -> its name in the exported model (a weight file's key)."""
        names = {}
        for i in range(self.count("Constants")):
            name, fqn = ctypes.c_char_p(), ctypes.c_char_p()
            self.call("GetConstantName", self.container, i, ctypes.byref(name))
            self.call("GetConstantOriginalFQN", self.container, i, ctypes.byref(fqn))
            names[name.value.decode()] = fqn.value.decode()
        return names

    def close(self) -> None:
        """Delete the container, unload the library and remove the extracted files, once the GPU has run the
        library's kernels (their code goes with it)."""
        try:
            if self.container:
                container, self.container = self.container, _handle()
                if self.device_index >= 0:
                    with torch.cuda.device(self.device_index):
                        with contextlib.suppress(RuntimeError):  # a GPU in an error state runs nothing any more
                            torch.cuda.synchronize()
                        self.call("Delete", container)
                else:
                    self.call("Delete", container)
        finally:
            if self._library is not None:
                _ctypes.dlclose(self._library._handle)
                self._library = None
            shutil.rmtree(self.folder, ignore_errors=True)


def _extract_library(path: Path, folder: str) -> str:
    """Extract the package's model ("model": its library and kernel binaries, not the C++ sources it was built from)
    into `folder`; the library's path."""
    with zipfile.ZipFile(path) as archive:
        members = [n for n in archive.namelist() if n.split("/")[1:4] == ["data", "aotinductor", "model"]]
        libraries = [n for n in members if n.endswith(".so")]
        if len(libraries) != 1:
            raise OSError(f"expected one model library in the archive, found {len(libraries)}")
        if libraries[0].removesuffix(".so") + ".json" in members:
            # its extern kernels run through torch's proxy executor, which only torch's own loader provides
            raise OSError("it calls operators outside AOTInductor's C shim, which this runtime cannot run")
        for name in members:
            if not name.endswith(".cpp"):
                archive.extract(name, folder)
    return os.path.join(folder, libraries[0])


# Every package is extracted into a folder of the temp dir, deleted when its module is closed. Python does not
# promise to destroy every object at exit (one reachable from builtins, say, through an import hook's globals,
# outlives the teardown), and such a pipeline left its packages' folders behind: closed here before the teardown.
_loaded: weakref.WeakSet[CompiledModule] = weakref.WeakSet()


@atexit.register
def _release_loaded() -> None:
    for module in list(_loaded):
        module.close()


class CompiledModule:
    """One AOTInductor package: call it with the flat tensor inputs it was exported with. A call runs without the
    GIL; calls to one module from several threads run one at a time."""

    def __init__(self, path: Path, weights: Mapping[str, torch.Tensor], device: torch.device) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._weight_handles: list[int] = []
        self._library = PackageLibrary(path, device)
        self.device_index = self._library.device_index  # -1: the CPU
        try:
            names = self._library.constant_names()
            missing = [fqn for fqn in names.values() if fqn not in weights]
            if missing:
                raise FastDiffError(
                    f"{path} needs {len(missing)} weights that the weight file lacks (e.g. {missing[0]})",
                    "the artifact's files do not belong together: export the model again",
                )
            # The container takes references of its own, which torch 2.11-2.13's libraries never release
            # (pytorch/pytorch#194480: Weights releases the memory itself); these handles are released on close.
            self._weight_handles = _new_handles([weights[fqn] for fqn in names.values()])
            entries = [_ConstantEntry(n.encode(), h) for n, h in zip(names, self._weight_handles, strict=True)]
            self._library.call(
                "UpdateUserManagedConstantBufferPairs",
                self._library.container,
                (_ConstantEntry * len(entries))(*entries),
                len(entries),
                False,  # the active buffer
                False,  # a partial update is not an error (every name was checked above)
            )
            self.num_inputs = self._library.count("Inputs")  # the flat tensor inputs
            self._num_outputs = self._library.count("Outputs")
        except BaseException:
            self.close()
            raise
        self.weights = weights  # user-managed: the package uses these tensors in place
        _loaded.add(self)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != self.num_inputs:  # the library's own check ends the process
            raise TypeError(f"{self.path} takes {self.num_inputs} inputs, got {len(inputs)}")
        stream = torch.cuda.current_stream(self.device_index).cuda_stream if self.device_index >= 0 else None
        outputs = (_handle * self._num_outputs)()
        with self._lock:
            if not self._library.container:
                raise RuntimeError(f"{self.path} was closed")
            # the run takes the input handles over
            inputs_array = (_handle * len(inputs))(*_new_handles(list(inputs)))
            self._library.call(
                "RunSingleThreaded",
                self._library.container,
                inputs_array,
                len(inputs),
                outputs,
                self._num_outputs,
                stream,
                None,
            )
        tensors = _steal_handles(list(outputs))
        return tensors[0] if len(tensors) == 1 else tuple(tensors)

    def close(self) -> None:
        """Unload the package's code and delete its extracted files (after the GPU has run its kernels)."""
        with self._lock:
            try:
                library = getattr(self, "_library", None)
                if library is not None:
                    library.close()
            finally:
                if self._weight_handles:
                    handles, self._weight_handles = self._weight_handles, []
                    _steal_handles(handles)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


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
