"""What the server's tests share: a real fastdiff-serve process on a free port of 127.0.0.1, images decoded from the
API's answers, and the pipeline's own images to compare them with."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import torch

SERVE = "import sys; sys.argv[0] = 'fastdiff-serve'; from fastdiff.runtime.serve.cli import main; main()"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def serve_command(artifact: Path, port: int, *args: str) -> list[str]:
    return [sys.executable, "-c", SERVE, str(artifact), "--port", str(port), "--device", "cpu", *args]


@contextmanager
def serving(artifact: Path, log: Path, *args: str, ready_timeout: float = 180) -> Iterator[Server]:
    """fastdiff-serve ARTIFACT on a free port, once /readyz says 200; terminated (and waited for) afterwards."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(serve_command(artifact, port, *args), stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_ready(server, ready_timeout)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, f"fastdiff-serve exited {server.proc.returncode}:\n{server.output()[-3000:]}"
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:  # not listening yet
            pass
        time.sleep(0.1)
    raise AssertionError(f"fastdiff-serve not ready after {timeout} s:\n{server.output()[-3000:]}")


def decode(b64: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def alone(pipe, prompt: str, seed: int, n: int = 1, steps: int = 4, **kwargs) -> list[np.ndarray]:
    """The pipeline's own images for the request, called alone with the request's seed."""
    generator = torch.Generator().manual_seed(seed)
    images = pipe(prompt, num_inference_steps=steps, generator=generator, num_images_per_prompt=n, **kwargs).images
    return [np.asarray(image) for image in images]


@contextmanager
def loras_loaded(pipe, loras: Mapping[str, Path]) -> Iterator[None]:
    """The LoRAs loaded into the pipeline as adapters of their names, the base merged; unloaded afterwards (pipelines
    of this process over the same artifact share its weights)."""
    try:
        for name, path in loras.items():
            pipe.load_lora_weights(path, adapter_name=name)
        pipe.set_adapters([])
        yield
    finally:
        pipe.unload_lora_weights()


def merged(pipe, lora: str | None, scale: float = 1.0):
    """The pipeline with the LoRA `lora` merged at `scale` (None: the base), as a request for it is served."""
    pipe.set_adapters([] if lora is None else [lora], None if lora is None else [scale])
    return pipe


def assert_same_image(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal but for float rounding: a batched call computes each image's rows in matrix products of another shape,
    whose sums round differently by ~1e-6 (measured on the tiny model); the 8-bit pixels then differ by at most one
    level, where a value lay on a rounding boundary. A wrong prompt, seed or row order changes them by far more."""
    assert got.shape == expected.shape
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1, f"pixels differ by up to {diff.max()}"
    assert (diff > 0).mean() < 0.02, f"{(diff > 0).mean():.1%} of the pixel values differ"


def sigterm(server: Server) -> None:
    os.kill(server.proc.pid, signal.SIGTERM)
