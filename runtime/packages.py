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
import io
import logging
import os
import re
import shutil
import tempfile
import threading
import weakref
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import FastDiffError
from .format import CompiledComponent, device_index, make_libstdcxx_global

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


# c10::ScalarType codes, as a package's library reports its constants' dtypes (AOTInductor's aoti_torch_dtype_*)
SCALAR_TYPES = {
    0: torch.uint8,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.int64,
    5: torch.float16,
    6: torch.float32,
    7: torch.float64,
    11: torch.bool,
    15: torch.bfloat16,
    23: torch.float8_e5m2,
    24: torch.float8_e4m3fn,
}


CONSTANT_ALIGNMENT = 64  # a CPU package declares its constants' byte sizes rounded up to this; a CUDA package, exact


def check_constants(path: Path, declared: Mapping[str, tuple[int, int]], weights: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights that are not what the compiled code reads: each constant the package declares (name -> its
    dtype code and byte size) must be bound to a tensor of that dtype and size, or the code would misread it or read
    past it."""
    missing_weights(path, declared, weights)
    for name, (code, nbytes) in declared.items():
        tensor = weights[name]
        dtype = SCALAR_TYPES.get(code)
        got = tensor.numel() * tensor.element_size()
        if dtype != tensor.dtype or nbytes not in (got, -(-got // CONSTANT_ALIGNMENT) * CONSTANT_ALIGNMENT):
            wanted = f"{dtype or f'dtype code {code}'} of {nbytes} bytes"
            raise FastDiffError(
                f"{path} takes weight {name} as {wanted}; the weight file holds {tensor.dtype} of {got} bytes",
                "the artifact's files do not belong together: export the model again",
            )


# Modules still loaded at exit are closed before the interpreter's teardown: Python does not promise to destroy every
# object (one reachable from builtins outlives it), and their extracted files would stay in the temp folder.
_loaded: weakref.WeakSet[CompiledModule] = weakref.WeakSet()


@atexit.register
def _release_loaded() -> None:
    for module in list(_loaded):
        if module.owner == os.getpid():
            with contextlib.suppress(Exception):  # one that fails to close leaves the others' folders to clean
                module.close()


@dataclass(frozen=True)
class PackageInputs:
    """What a package was exported to take (the manifest records it): each input's name, dtype and shape, None for
    the batch (1 to max_batch), contiguous, on the package's device. The compiled code trusts its inputs: one of
    another shape, dtype or device makes it read out of bounds (a crash on a GPU)."""

    names: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    shapes: tuple[tuple[int | None, ...], ...]
    max_batch: int

    @classmethod
    def recorded(cls, component: CompiledComponent, key: str) -> PackageInputs | None:
        """The inputs of `component`'s package for case `key`; None in artifacts from before they were recorded."""
        if not component.input_shapes:
            return None
        dtypes = tuple(getattr(torch, name) for name in component.input_dtypes)
        shapes = tuple(tuple(shape) for shape in component.input_shapes[key])
        return cls(tuple(component.inputs), dtypes, shapes, component.max_batch)

    def check(self, path: Path, inputs: tuple[torch.Tensor, ...], index: int) -> None:
        """Refuse inputs the package was not exported to take (`index`: its device's, -1 for the CPU)."""
        for name, dtype, shape, t in zip(self.names, self.dtypes, self.shapes, inputs, strict=True):
            on_device = t.device.type == "cpu" if index < 0 else (t.device.type, t.device.index) == ("cuda", index)
            sizes = t.dim() == len(shape) and all(
                size == want if want is not None else 1 <= size <= self.max_batch
                for size, want in zip(t.shape, shape, strict=True)
            )
            if not (t.dtype == dtype and sizes and on_device and t.is_contiguous()):
                wanted = ", ".join(f"1..{self.max_batch}" if s is None else str(s) for s in shape)
                raise FastDiffError(
                    f"{path} takes {name} as {dtype} [{wanted}]; this call gives {t.dtype} {list(t.shape)} on "
                    f"{t.device}{'' if t.is_contiguous() else ', not contiguous'}",
                    "the artifact's files do not belong together, or this is a fastdiff bug: export the model again, "
                    "and report it if the new artifact fails the same way",
                )


class CompiledModule:
    """One AOTInductor package bound to weights. A call takes the flat tensor inputs the package was exported with
    (checked against `expects`, when the manifest records them); calls to one module from several threads run one at
    a time."""

    runner: str  # "capi" or "torch"
    num_inputs: int

    def __init__(
        self,
        path: Path,
        weights: Mapping[str, torch.Tensor],
        device: torch.device,
        expects: PackageInputs | None = None,
    ) -> None:
        self.path = path
        self.weights = weights  # user-managed: the package uses these tensors in place
        self.expects = expects
        self.device_index = device_index(device)  # -1: the CPU
        self._lock = threading.Lock()
        self.owner = os.getpid()  # a forked child inherits the module: its exit leaves the parent's files alone
        _loaded.add(self)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != self.num_inputs:  # the library's own check ends the process
            raise TypeError(f"{self.path} takes {self.num_inputs} inputs, got {len(inputs)}")
        if self.expects is not None:
            self.expects.check(self.path, inputs, self.device_index)
        with self._lock:
            outputs = self._run(inputs)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _run(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        raise NotImplementedError

    def close(self) -> None:
        """Unload the package's code and delete its extracted files (after the GPU has run its kernels)."""
        raise NotImplementedError

    def __del__(self) -> None:
        if getattr(self, "owner", None) == os.getpid():
            with contextlib.suppress(Exception):
                self.close()


class TorchModule(CompiledModule):
    """A package run through torch's public loader."""

    runner = "torch"

    def __init__(
        self,
        path: Path,
        weights: Mapping[str, torch.Tensor],
        device: torch.device,
        data: bytes,
        expects: PackageInputs | None = None,
    ) -> None:
        super().__init__(path, weights, device, expects)
        from torch._inductor.package import load_package
        from torch.utils import _pytree

        from . import capi

        make_libstdcxx_global()
        self._model = None
        model_members(data, path)  # no member that torch's own extraction could write outside its folder
        self.folder = extraction_folder()
        try:
            package = os.path.join(self.folder, "package.pt2")  # the bytes that were checked, not the path's
            with open(package, "xb") as f:
                f.write(data)
            with _device_of(self.device_index):  # the loader makes the package's device current
                self._model = load_package(package, run_single_threaded=True, device_index=self.device_index)
            check_constants(path, capi.declared_constants(path, data, device), weights)
            names = self._model.get_constant_fqns()
            missing_weights(path, names, weights)
            self._model.load_constants({n: weights[n] for n in names}, check_full_update=True, user_managed=True)
            self.num_inputs = _pytree.treespec_loads(self._model.loader.get_call_spec()[0]).num_leaves
        except BaseException as e:
            self.close()
            if isinstance(e, Exception):
                raise load_error(path, e) from None
            raise

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
            if getattr(self, "folder", None):
                shutil.rmtree(self.folder, ignore_errors=True)


def _device_of(index: int) -> contextlib.AbstractContextManager:
    return torch.cuda.device(index) if index >= 0 else contextlib.nullcontext()


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def load_error(path: Path, error: Exception, library: str | None = None) -> FastDiffError:
    """The FastDiffError for a package that failed to load: the temp folder's fault (full, read-only) or the
    package's (its library's path, in a temp folder, called "its library")."""
    if isinstance(error, FastDiffError):
        return error
    if isinstance(error, OSError) and error.errno is not None:
        return FastDiffError(
            f"cannot extract compiled package {path} into {tempfile.gettempdir()}: {error.strerror or error}",
            "free space there, or point TMPDIR to a writable folder with room",
        )
    detail = _first_line(error)
    return FastDiffError(
        f"cannot load compiled package {path}: {detail.replace(library, 'its library') if library else detail}",
        "the artifact is damaged or was built elsewhere: run fastdiff-inspect --verify, or export again",
    )


# Extraction ---------------------------------------------------------------------------------------------------------

MODEL_FOLDER = ("data", "aotinductor", "model")  # where a package's model library and kernels lie, under its name
MAX_EXTRACTED_BYTES = 4 << 30  # a package is tens of megabytes; more is not one
PACKAGE_SIZE_FIX = "the artifact is damaged or was tampered with: export the model again"
EXTRACTION_PREFIX = "fastdiff-package-"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def read_package(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise FastDiffError(
            f"cannot read compiled package {path}: {e.strerror or e}", "export the model again"
        ) from None


def model_members(data: bytes, path: Path) -> list[tuple[zipfile.ZipInfo, str]]:
    """The package's model files (its library, its kernels' binaries and metadata; not the C++ sources it was built
    from) as (member, path under the model folder). Refused: an archive that is not one, a member whose name would
    leave the folder it is extracted into, a model file whose name is not a plain file name, and more bytes than a
    package holds."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise FastDiffError(
            f"compiled package {path} is not a package archive ({e})", "export the model again"
        ) from None
    members, total = [], 0
    for info in archive.infolist():
        parts = info.filename.rstrip("/").split("/")
        if info.filename.startswith("/") or "\\" in info.filename or any(p in ("", ".", "..") for p in parts):
            raise FastDiffError(
                f"compiled package {path} holds a member named {info.filename!r:.200}, which leaves its folder",
                "the artifact is damaged or was tampered with: export the model again",
            )
        if tuple(parts[1:4]) != MODEL_FOLDER or info.is_dir() or info.filename.endswith(".cpp"):
            continue
        inner = parts[4:]
        if not inner or not all(_SAFE_NAME.fullmatch(p) for p in inner):
            raise FastDiffError(
                f"compiled package {path} holds a model file named {info.filename!r:.200}",
                "the artifact is damaged or was tampered with: export the model again",
            )
        total += info.file_size
        members.append((info, "/".join(inner)))
    if total > MAX_EXTRACTED_BYTES:
        raise FastDiffError(
            f"compiled package {path} unpacks to {total} bytes, more than a package holds", PACKAGE_SIZE_FIX
        )
    return members


def extract_model(data: bytes, path: Path, folder: str) -> list[str]:
    """The package's model files, written into `folder` under their checked names (never following a name that is
    there already); their paths."""
    written, total = [], 0
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info, inner in model_members(data, path):
            target = os.path.join(folder, *inner.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with archive.open(info) as source, open(target, "xb") as out:
                while block := source.read(1 << 20):
                    total += len(block)
                    if total > MAX_EXTRACTED_BYTES:
                        raise FastDiffError(
                            f"compiled package {path} unpacks to more bytes than a package holds", PACKAGE_SIZE_FIX
                        )
                    out.write(block)
            written.append(target)
    return written


_stale_removed = False


def extraction_folder() -> str:
    """A new folder of the temp folder for one package's files, named after this process (its pid and start time)
    so that a later load removes what a killed process left there."""
    global _stale_removed
    if not _stale_removed:
        _stale_removed = True
        remove_stale_extractions(tempfile.gettempdir())
    pid = os.getpid()
    return tempfile.mkdtemp(prefix=f"{EXTRACTION_PREFIX}{pid}-{process_start(pid)}-")


def process_start(pid: int) -> int:
    """When process `pid` started (clock ticks since boot, Linux), telling it from a later process of the same pid;
    0 where that is not known; -1 if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except FileNotFoundError:
        return -1 if Path("/proc/self/stat").exists() else (0 if _alive(pid) else -1)
    except (OSError, ValueError, IndexError):
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_extractions(tmp: str) -> None:
    """Remove the extraction folders in `tmp` of processes that are gone (killed before they could clean up)."""
    try:
        names = os.listdir(tmp)
    except OSError:
        return
    for name in names:
        fields = name[len(EXTRACTION_PREFIX) :].split("-") if name.startswith(EXTRACTION_PREFIX) else []
        if len(fields) < 3 or not (fields[0].isdigit() and fields[1].isdigit()):
            continue  # not named by this scheme: not ours to judge
        started = process_start(int(fields[0]))
        if started == -1 or (started and started != int(fields[1])):
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)


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


def load_module(
    path: Path,
    weights: Mapping[str, torch.Tensor],
    device: torch.device,
    data: bytes | None = None,
    expects: PackageInputs | None = None,
) -> CompiledModule:
    """The package at `path` (or its bytes `data`, as the loader read and verified them; `path` then names it),
    bound to `weights`, on `device`, through the runner chosen (see the module's doc), its calls checked against
    `expects`."""
    from . import capi

    data = read_package(path) if data is None else data
    runner = chosen_runner()
    if runner == "torch":
        return TorchModule(path, weights, device, data, expects)
    problem = capi.self_check()
    if problem is None:
        try:
            return capi.CapiModule(path, weights, device, data, expects)
        except RunnerUnavailable as e:
            problem = f"{path}: {e}"
    if runner == "capi":
        raise FastDiffError(
            f"the C-interface package runner cannot run here: {problem}", f"unset {RUNNER_VARIABLE}, or set it to torch"
        )
    log.info("package runner: torch's loader (the C interface cannot run it: %s)", problem)
    return TorchModule(path, weights, device, data, expects)


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


def bound_weights(module: Any) -> Mapping[str, torch.Tensor]:
    """The weights a compiled package binds, under its CUDA-graph replay or text-encoder wrapper."""
    while not isinstance(module, CompiledModule):
        module = module.module
    return module.weights
