"""Component weights: one safetensors file per component, streamed onto the target device.

safetensors' `load_file(device="cuda")` copies each tensor from pageable (mmap'd) memory, at a third of the page
cache's speed. Here reader threads fill a small ring of pinned buffers with chunks of the file while the copies out of
the chunks already read run asynchronously, at the page cache's speed (docs/benchmarks.md). On the CPU the file is
memory-mapped instead (no copy).

Pipelines of one process share weights: a file that a live pipeline already holds on a device (unchanged on disk
since) is not loaded again, so a second pipeline over the same artifact -- for another resolution, say -- adds no
second copy. The registry holds the tensors weakly: they go when the last pipeline using them does (see Weights).

safetensors stores dense row-major tensors. A weight the compiled code expects in channels_last layout is stored
as its NHWC permutation and viewed back as NCHW here, which restores the strides without a copy.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from collections.abc import Iterable
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import FastDiffError
from .format import SAFETENSORS_DTYPES

CHUNK_BYTES = 32 << 20
STAGING_BUFFERS = 4  # also the number of reader threads

DTYPES = {name: getattr(torch, torch_name) for name, torch_name in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offsets in the file
    end: int


class Weights(dict):
    """A component's tensors on one device, by name (a dict the process-wide registry can reference weakly).

    When it goes (with the last pipeline using it), the memory of its tensors is released even if something else
    still references them: every AOTInductor package keeps a reference to each user-managed constant it is given
    and never drops it (the runtime code that torch 2.11 and 2.13 compile into each package has the leak that
    pytorch/pytorch#194480 fixes upstream), so a dropped SDXL pipeline would otherwise keep its 6.9 GB on the GPU
    for the life of the process. Tensors taken out of it must not outlive it. safetensors' memory-mapped CPU
    tensors cannot be released that way; their pages belong to the file.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(tensors)
        # Pipelines that bind these tensors take turns: a LoRA merge through one rewrites them under the others.
        self.turn = threading.RLock()
        storages = {s.data_ptr(): s for s in (t.untyped_storage() for t in tensors.values())}
        resizable = [s for ptr, s in storages.items() if ptr and s.resizable()]
        weakref.finalize(self, release_storages, resizable).atexit = False  # the process's end frees everything


def release_storages(storages: list[torch.UntypedStorage]) -> None:
    for storage in storages:
        storage.resize_(0)


_live: weakref.WeakValueDictionary[tuple, Weights] = weakref.WeakValueDictionary()
_live_lock = threading.Lock()
_loading: dict[tuple, threading.Lock] = {}  # a lock per file being loaded


def shared_weights(
    path: Path,
    device: torch.device,
    channels_last: Iterable[str] = (),
    stop: threading.Event | None = None,
    digest: str | None = None,
) -> Weights:
    """load_weights, unless a live pipeline of this process already holds this file, unchanged, on `device`: the
    same file (device and inode, size, modification time) of an artifact with the same manifest `digest`. Callers
    keep the returned Weights alive for as long as they use its tensors."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stat = os.stat(path)
    identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    key = (identity, digest, str(device), tuple(channels_last))
    with _live_lock:
        weights = _live.get(key)
        if weights is not None:
            return weights
        loading = _loading.setdefault(key, threading.Lock())
    with loading:  # one load of a file at a time; loads of other files (another artifact, another GPU) go on
        with _live_lock:
            weights = _live.get(key)
        if weights is None:
            try:
                weights = Weights(load_weights(path, device, channels_last, stop))
                with _live_lock:
                    _live[key] = weights
            finally:
                with _live_lock:
                    _loading.pop(key, None)
    return weights


def load_weights(
    path: Path, device: torch.device, channels_last: Iterable[str] = (), stop: threading.Event | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on `device`, with channels_last ones given their strides back (`stop`: see
    stream_weights)."""
    try:
        tensors = load_file(path) if device.type == "cpu" else stream_weights(path, device, stop=stop)
    except (OSError, ValueError, SafetensorError) as e:
        raise FastDiffError(
            f"cannot read weights {path}: {e}", "the file is truncated or corrupted: export the model again"
        ) from None
    for name in channels_last:
        if name not in tensors or tensors[name].dim() != 4:
            raise FastDiffError(
                f"the manifest names {name} as a channels_last weight; {path} has no such 4-d tensor",
                "the artifact's files do not belong together: export the model again",
            )
        tensors[name] = tensors[name].permute(0, 3, 1, 2)
    return tensors


def read_header(path: Path) -> list[StoredTensor]:
    """The tensors a safetensors file holds, checked against the file's size; ValueError if it is damaged."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > size - 8:
            raise ValueError(f"header length {length} runs past the end of the {size}-byte file")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    base = 8 + length
    stored = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (base + int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r} has an invalid entry {info!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        if min(shape, default=0) < 0 or not base <= begin <= end <= size or end - begin != numel * dtype.itemsize:
            raise ValueError(f"tensor {name!r}: offsets {info['data_offsets']} do not fit its shape or the file")
        stored.append(StoredTensor(name, dtype, shape, begin, end))
    return stored


def stream_weights(
    path: Path,
    device: torch.device,
    chunk_bytes: int = CHUNK_BYTES,
    buffers: int = STAGING_BUFFERS,
    *,
    stop: threading.Event | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of the file, allocated on `device` and filled chunk by chunk through `buffers` staging buffers
    (pinned for a GPU): reading chunk i + buffers waits only for the copies out of chunk i. Works for any device;
    load_weights uses it for GPUs. Once `stop` is set, no further chunk is read: CancelledError."""
    header = read_header(path)
    tensors = {t.name: torch.empty(t.shape, dtype=t.dtype, device=device) for t in header}
    stored = sorted((t for t in header if t.end > t.start), key=lambda t: t.start)
    if not stored:
        return tensors
    end = max(t.end for t in stored)
    chunks = [(offset, min(chunk_bytes, end - offset)) for offset in range(stored[0].start, end, chunk_bytes)]
    on_gpu = device.type == "cuda"
    staging = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=on_gpu) for _ in range(min(buffers, len(chunks)))]
    copied: list[torch.cuda.Event | None] = [None] * len(staging)  # per buffer: its last chunk's copies are done

    def read(i: int) -> torch.Tensor:
        if stop is not None and stop.is_set():
            raise CancelledError(f"loading {path} was stopped")
        offset, size = chunks[i]
        slot = i % len(staging)
        if copied[slot] is not None:
            copied[slot].synchronize()
        view = memoryview(staging[slot].numpy())[:size]
        while view:
            n = os.preadv(fd, [view], offset)
            if n == 0:
                raise ValueError(f"the file ends at byte {offset}, inside its tensor data")
            view, offset = view[n:], offset + n
        return staging[slot][:size]

    fd = os.open(path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(len(staging), thread_name_prefix="fastdiff-weights") as pool:
            reads = [pool.submit(read, i) for i in range(len(staging))]
            first = 0  # the first tensor not yet completely copied
            for i, (offset, size) in enumerate(chunks):
                chunk = reads[i].result()
                while first < len(stored) and stored[first].start < offset + size:
                    t = stored[first]
                    lo, hi = max(t.start, offset), min(t.end, offset + size)
                    target = tensors[t.name].view(-1).view(torch.uint8)
                    target[lo - t.start : hi - t.start].copy_(chunk[lo - offset : hi - offset], non_blocking=True)
                    if t.end > offset + size:
                        break  # its rest is in the next chunk
                    first += 1
                if on_gpu:  # the copies run on the target device's current stream
                    copied[i % len(staging)] = torch.cuda.current_stream(device).record_event()
                if i + len(staging) < len(chunks):
                    reads.append(pool.submit(read, i + len(staging)))
    finally:
        os.close(fd)
    return tensors
