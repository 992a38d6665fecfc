"""Compiled packages run through their library's C interface: without the GIL, one call at a time per module, and
unloaded (their extracted files deleted) on close."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fastdiff.runtime.packages import CompiledModule


@pytest.fixture(scope="module")
def unet_call(tiny_pipeline) -> tuple[CompiledModule, tuple[torch.Tensor, ...]]:
    """The tiny artifact's 64x64 UNet package and the inputs of a one-step generation's call."""
    unet, seen = tiny_pipeline.unets["64x64"], []
    tiny_pipeline.unets["64x64"] = lambda *inputs: seen.append(inputs) or unet(*inputs)
    try:
        tiny_pipeline("a cat", num_inference_steps=1, height=64, width=64, output_type="latent")
    finally:
        tiny_pipeline.unets["64x64"] = unet
    return unet, seen[0]


def test_a_call_lets_other_threads_run(unet_call) -> None:
    """A thread counting in Python keeps most of its pace while the main thread runs the package (torch's package
    loader holds the GIL for the whole call: 2 % of it there, on this project's CPU machine)."""
    unet, inputs = unet_call
    count, stop = [0], threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)  # one core for the package, one for the counting thread
    sys.setswitchinterval(0.0001)
    thread = threading.Thread(target=spin)
    thread.start()
    try:
        start = count[0]
        time.sleep(0.5)
        alone = (count[0] - start) / 0.5
        start, t0 = count[0], time.perf_counter()
        for _ in range(10):
            unet(*inputs)
        beside = (count[0] - start) / (time.perf_counter() - t0)
    finally:
        stop.set()
        thread.join()
        torch.set_num_threads(threads)
        sys.setswitchinterval(interval)
    assert beside > 0.25 * alone, f"the counting thread kept {beside / alone:.0%} of its pace"


def test_calls_from_threads_take_turns(unet_call, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module's calls from several threads run one at a time (the library's single-threaded run keeps one set of
    buffers), and give what calls made in turn give."""
    unet, inputs = unet_call
    latents = [inputs[0] + i for i in range(4)]
    expected = [unet(x, *inputs[1:]) for x in latents]
    run, active, most = unet._library._functions["AOTInductorModelContainerRunSingleThreaded"], [0], [0]

    def overlap_recording_run(*args):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.02)  # lets go of the GIL: another thread's call would start here
        try:
            return run(*args)
        finally:
            active[0] -= 1

    monkeypatch.setitem(unet._library._functions, "AOTInductorModelContainerRunSingleThreaded", overlap_recording_run)
    got: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda i=i: got.update({i: unet(latents[i], *inputs[1:])})) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
    for i in range(4):
        torch.testing.assert_close(got[i], expected[i], rtol=0, atol=0)


def test_a_call_with_the_wrong_inputs_raises(unet_call, monkeypatch: pytest.MonkeyPatch) -> None:
    """Too few inputs: a TypeError (the library's own check would end the process). A run that fails in the
    library: a RuntimeError naming the function and the library's error where it keeps one."""
    unet, inputs = unet_call
    with pytest.raises(TypeError, match=r"64x64.pt2 takes 5 inputs, got 4"):
        unet(*inputs[:-1])
    monkeypatch.setitem(unet._library._functions, "AOTInductorModelContainerRunSingleThreaded", lambda *args: 1)
    with pytest.raises(RuntimeError, match="AOTInductorModelContainerRunSingleThreaded failed: "):
        unet(*inputs)


def test_closed_module_is_unloaded(tiny_artifact: Path, unet_call) -> None:
    weights = unet_call[0].weights
    module = CompiledModule(tiny_artifact / "unet" / "64x64.pt2", weights, torch.device("cpu"))
    folder = Path(module._library.folder)
    assert next(folder.rglob("*.so"))  # extracted while loaded
    assert not list(folder.rglob("*.cpp"))  # but not the sources it was built from
    torch.testing.assert_close(module(*unet_call[1]), unet_call[0](*unet_call[1]), rtol=0, atol=0)
    module.close()
    assert not folder.exists()
    with pytest.raises(RuntimeError, match="64x64.pt2 was closed"):
        module(*unet_call[1])
    module.close()  # again: nothing left to do
