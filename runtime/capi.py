"""The C-interface package runner: a package's model library called through ctypes, without the GIL.

A package is a zip archive holding one compiled model library (and, for a GPU, its kernels' binaries). This runner
extracts it into a temp folder and calls the library's C functions (AOTInductorModelContainer*, the interface that
torch's own package loader calls) through ctypes, which lets go of the GIL for the call: torch's loader holds it for
a whole run (pytorch/pytorch#197516), so a load's Python work (the scheduler's import) stood still while a package
warmed up, and threads serving requests could not overlap one's compiled call with another's Python. It relies on
the library's C interface and the package's zip layout, which torch does not promise to keep: `self_check` runs
before its first use, and packages.py falls back to torch's public loader where it fails.
"""

from __future__ import annotations

import _ctypes
import contextlib
import ctypes
import functools
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import FastDiffError
from .format import device_index, make_libstdcxx_global
from .packages import (
    CompiledModule,
    PackageInputs,
    RunnerUnavailable,
    check_constants,
    extract_model,
    extraction_folder,
    load_error,
    model_members,
)


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
    "AOTInductorModelContainerGetConstantDtype": [_handle, _size, ctypes.POINTER(ctypes.c_int32)],
    "AOTInductorModelContainerGetConstantDataSize": [_handle, _size, ctypes.POINTER(_size)],
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

    def __init__(self, path: Path, data: bytes, device: torch.device, runnable: bool = True) -> None:
        """`runnable`: refuse (RunnerUnavailable) a library this runner could open but not run (extern kernels); off
        where only its declarations are read."""
        make_libstdcxx_global()
        self.device_index = device_index(device)
        self.container = _handle()
        self._library = None
        self.folder = extraction_folder()
        library_path = None
        try:
            library_path = _extract_library(data, path, self.folder, runnable)
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
            if not isinstance(e, Exception) or isinstance(e, RunnerUnavailable):
                raise  # a Ctrl-C, or torch's loader's turn
            raise load_error(path, e, library_path) from None

    def _function(self, name: str, argtypes: list) -> Any:
        try:
            function = getattr(self._library, name)
        except AttributeError:
            raise RunnerUnavailable(
                f"its library has no {name}: not an AOTInductor model library of this torch"
            ) from None
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

    def constants(self) -> dict[str, tuple[str, int, int]]:
        """Each constant's name in the library -> its name in the exported model (a weight file's key), the dtype
        code and the byte size the compiled code reads it as."""
        found = {}
        for i in range(self.count("Constants")):
            name, fqn = ctypes.c_char_p(), ctypes.c_char_p()
            dtype, nbytes = ctypes.c_int32(), _size()
            self.call("GetConstantName", self.container, i, ctypes.byref(name))
            self.call("GetConstantOriginalFQN", self.container, i, ctypes.byref(fqn))
            self.call("GetConstantDtype", self.container, i, ctypes.byref(dtype))
            self.call("GetConstantDataSize", self.container, i, ctypes.byref(nbytes))
            found[name.value.decode()] = (fqn.value.decode(), dtype.value, nbytes.value)
        return found

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


def _extract_library(data: bytes, path: Path, folder: str, runnable: bool = True) -> str:
    """Extract the package's model files into `folder` (packages.extract_model); the library's path."""
    members = model_members(data, path)
    libraries = [inner for _, inner in members if inner.endswith(".so")]
    if len(libraries) != 1:
        raise RunnerUnavailable(f"expected one model library in the archive, found {len(libraries)}")
    if runnable and libraries[0].removesuffix(".so") + ".json" in {inner for _, inner in members}:
        # its extern kernels run through torch's proxy executor, which only torch's own loader provides
        raise RunnerUnavailable("it calls operators outside AOTInductor's C shim (torch's proxy executor)")
    extract_model(data, path, folder)
    return os.path.join(folder, *libraries[0].split("/"))


def declared_constants(path: Path, data: bytes, device: torch.device) -> dict[str, tuple[int, int]]:
    """What the package's library declares of its constants (model name -> dtype code, byte size), read through its
    C interface for torch's loader, which does not tell. A package whose declarations cannot be read is refused:
    its weights could not be checked."""
    try:
        library = PackageLibrary(path, data, device, runnable=False)
    except RunnerUnavailable as e:
        raise FastDiffError(
            f"cannot read what compiled package {path} declares of its weights ({e}), so they cannot be checked",
            "the artifact is damaged or was built by another torch: export the model again",
        ) from None
    try:
        return {fqn: (dtype, nbytes) for fqn, dtype, nbytes in library.constants().values()}
    finally:
        library.close()


class CapiModule(CompiledModule):
    """A package run through its library's C interface: a call lets go of the GIL."""

    runner = "capi"

    def __init__(
        self,
        path: Path,
        weights: Mapping[str, torch.Tensor],
        device: torch.device,
        data: bytes,
        expects: PackageInputs | None = None,
    ) -> None:
        super().__init__(path, weights, device, expects)
        self._weight_handles: list[int] = []
        self._library = None
        self._library = PackageLibrary(path, data, device)
        try:
            constants = self._library.constants()
            check_constants(path, {fqn: (dtype, n) for fqn, dtype, n in constants.values()}, weights)
            names = {name: fqn for name, (fqn, _, _) in constants.items()}
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

    def _run(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if self._library is None or not self._library.container:
            raise RuntimeError(f"{self.path} was closed")
        stream = torch.cuda.current_stream(self.device_index).cuda_stream if self.device_index >= 0 else None
        outputs = (_handle * self._num_outputs)()
        inputs_array = (_handle * len(inputs))(*_new_handles(list(inputs)))  # the run takes these handles over
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
        return _steal_handles(list(outputs))

    def close(self) -> None:
        with self._lock:
            try:
                if self._library is not None:
                    self._library.close()
            finally:
                if self._weight_handles:
                    handles, self._weight_handles = self._weight_handles, []
                    _steal_handles(handles)


@functools.cache
def self_check() -> str | None:
    """Why this runner cannot run in this process (None: it can). Checked once: the torch functions it uses to pass
    tensors across the C interface exist and hand a tensor over and back intact."""
    aoti = getattr(torch._C, "_aoti", None)
    for name in ("unsafe_alloc_void_ptrs_from_tensors", "alloc_tensors_by_stealing_from_void_ptrs"):
        if not hasattr(aoti, name):
            return f"torch {torch.__version__} has no torch._C._aoti.{name}"
    try:
        tensor = torch.arange(4.0)
        (back,) = _steal_handles(_new_handles([tensor]))
    except Exception as e:  # an ABI that changed under the same names
        return f"handing a tensor to the C interface failed ({type(e).__name__}: {e})"
    if back.data_ptr() != tensor.data_ptr() or not torch.equal(back, tensor):
        return "a tensor handed to the C interface came back changed"
    return None
