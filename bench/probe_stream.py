"""How fast one artifact's largest weight file reaches the GPU, with nothing else running: raw preadv from the page
cache (1, 4, 8 threads), a pinned host-to-device copy, stream_weights at several staging rings, and safetensors'
load_file(device="cuda").

python bench/probe_stream.py ARTIFACT_DIR
"""

import os
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from fastdiff.runtime.weights import stream_weights

CHUNK = 32 << 20


def timed(label: str, size: int, fn, *args, **kwargs) -> None:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(f"{label}: {dt:.3f} s, {size / dt / 1e9:.2f} GB/s", flush=True)


def read_all(path: Path, size: int, threads: int) -> None:
    def work(k: int) -> None:
        fd, buf = os.open(path, os.O_RDONLY), bytearray(CHUNK)
        for offset in range(k * CHUNK, size, threads * CHUNK):
            os.preadv(fd, [buf], offset)
        os.close(fd)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def main() -> None:
    files = sorted(Path(sys.argv[1]).rglob("*.safetensors"), key=lambda p: p.stat().st_size)
    path = files[-1]
    size = path.stat().st_size
    print(f"{path}: {size / 1e9:.2f} GB")
    device = torch.device("cuda")
    torch.zeros(1, device=device)
    for threads in (1, 4, 8):
        timed(f"raw preadv, {threads} threads", size, read_all, path, size, threads)
    pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    on_gpu = torch.empty_like(pinned, device=device)
    timed("pinned host-to-device copy", size, on_gpu.copy_, pinned, non_blocking=True)
    del pinned, on_gpu
    for buffers in (4, 8):
        for chunk_mib in (8, 32, 64):
            timed(
                f"stream_weights, {buffers} buffers of {chunk_mib} MiB",
                size,
                stream_weights,
                path,
                device,
                chunk_mib << 20,
                buffers,
            )
    timed('safetensors load_file(device="cuda")', size, load_file, path, device="cuda")


if __name__ == "__main__":
    main()
