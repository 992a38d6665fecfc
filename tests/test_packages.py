"""Compiled packages behind one interface, through both runners: the C interface (without the GIL) and torch's
public loader (the fallback). Each binds the runtime's weights, runs one call at a time per module, and is unloaded
on close; the runner is chosen automatically, or by FASTDIFF_PACKAGE_RUNNER."""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fastdiff.runtime import FastDiffError, load_pipeline, read_manifest
from fastdiff.runtime import capi as capi_module
from fastdiff.runtime.capi import CapiModule
from fastdiff.runtime.packages import (
    RUNNER_VARIABLE,
    CompiledModule,
    PackageInputs,
    RunnerUnavailable,
    TorchModule,
    load_module,
)

RUNNERS = {"capi": CapiModule, "torch": TorchModule}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def unet_inputs(tiny_pipeline) -> tuple[CompiledModule, tuple[torch.Tensor, ...]]:
    """The tiny artifact's 64x64 UNet module (as load_pipeline loaded it) and the inputs of a one-step call."""
    unet, seen = tiny_pipeline.unets["64x64"], []
    tiny_pipeline.unets["64x64"] = lambda *inputs: seen.append(inputs) or unet(*inputs)
    try:
        tiny_pipeline("a cat", num_inference_steps=1, height=64, width=64, output_type="latent")
    finally:
        tiny_pipeline.unets["64x64"] = unet
    return unet, seen[0]


@pytest.fixture(scope="module", params=sorted(RUNNERS))
def unet_call(request, tiny_artifact: Path, unet_inputs) -> tuple[CompiledModule, tuple[torch.Tensor, ...]]:
    """The same package loaded by each runner, bound to the same weights."""
    loaded, inputs = unet_inputs
    path = tiny_artifact / "unet" / "64x64.pt2"
    module = RUNNERS[request.param](path, loaded.weights, CPU, path.read_bytes())
    yield module, inputs
    module.close()


def test_both_runners_compute_the_same(unet_inputs, unet_call) -> None:
    (loaded, inputs), (module, _) = unet_inputs, unet_call
    assert module.num_inputs == len(inputs) == 5
    torch.testing.assert_close(module(*inputs), loaded(*inputs), rtol=0, atol=0)


def test_a_capi_call_lets_other_threads_run(unet_call) -> None:
    """A thread counting in Python keeps most of its pace while the main thread runs the package through the C
    interface (torch's loader holds the GIL for the whole call)."""
    unet, inputs = unet_call
    if unet.runner != "capi":
        pytest.skip("torch's loader holds the GIL for a call")
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
    """A module's calls from several threads run one at a time (a single-threaded run keeps one set of buffers),
    and give what calls made in turn give."""
    unet, inputs = unet_call
    latents = [inputs[0] + i for i in range(4)]
    expected = [unet(x, *inputs[1:]) for x in latents]
    run, active, most = unet._run, [0], [0]

    def overlap_recording_run(*args):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.02)  # lets go of the GIL: another thread's call would start here
        try:
            return run(*args)
        finally:
            active[0] -= 1

    monkeypatch.setattr(unet, "_run", overlap_recording_run)
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
    C interface's library: a RuntimeError naming the function and the library's error where it keeps one."""
    unet, inputs = unet_call
    with pytest.raises(TypeError, match=r"64x64.pt2 takes 5 inputs, got 4"):
        unet(*inputs[:-1])
    if unet.runner == "capi":
        monkeypatch.setitem(unet._library._functions, "AOTInductorModelContainerRunSingleThreaded", lambda *a: 1)
        with pytest.raises(RuntimeError, match="AOTInductorModelContainerRunSingleThreaded failed: "):
            unet(*inputs)


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_closed_module_is_unloaded(tiny_artifact: Path, unet_inputs, runner: str) -> None:
    loaded, inputs = unet_inputs
    path = tiny_artifact / "unet" / "64x64.pt2"
    module = RUNNERS[runner](path, loaded.weights, CPU, path.read_bytes())
    if runner == "capi":
        folder = Path(module._library.folder)
        assert next(folder.rglob("*.so"))  # extracted while loaded
        assert not list(folder.rglob("*.cpp"))  # but not the sources it was built from
    torch.testing.assert_close(module(*inputs), loaded(*inputs), rtol=0, atol=0)
    module.close()
    if runner == "capi":
        assert not folder.exists()
    with pytest.raises(RuntimeError, match="64x64.pt2 was closed"):
        module(*inputs)
    module.close()  # again: nothing left to do


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_a_call_the_package_was_not_exported_for_is_refused(tiny_artifact: Path, unet_inputs, runner: str) -> None:
    """The compiled code trusts its inputs (another shape makes it read out of bounds): each call is checked against
    what the manifest records the package was exported to take, before the package runs."""
    (loaded, inputs), path = unet_inputs, tiny_artifact / "unet" / "64x64.pt2"
    assert loaded.expects is not None  # load_pipeline's modules are checked too
    expects = PackageInputs.recorded(read_manifest(tiny_artifact).unet, "64x64")
    assert expects.shapes[0] == (None, 4, 8, 8) and expects.max_batch == 4  # the session's artifacts: batch size 2
    module = RUNNERS[runner](path, loaded.weights, CPU, path.read_bytes(), expects)
    sample, timestep, *conditioning = inputs
    wrong = {
        "channels": ((torch.cat([sample, sample], 1), timestep, *conditioning), "[1..4, 4, 8, 8]; this call gives"),
        "batch": ((*(torch.cat([t] * 3) if t.dim() else t for t in inputs),), "torch.float32 [6, 4, 8, 8]"),
        "dtype": ((sample.double(), timestep, *conditioning), "this call gives torch.float64"),
        "strides": ((sample.transpose(2, 3), timestep, *conditioning), "on cpu, not contiguous"),
        "timestep": ((sample, timestep[None], *conditioning), "takes timestep as torch.float32 []"),
    }
    for name, (call, phrase) in wrong.items():
        with pytest.raises(FastDiffError, match=re.escape(phrase)) as raised:
            module(*call)
        assert "do not belong together" in raised.value.fix, name
    torch.testing.assert_close(module(*inputs), loaded(*inputs), rtol=0, atol=0)
    module.close()


@pytest.mark.parametrize(
    ("variable", "runner"), [("", "capi"), ("capi", "capi"), ("torch", "torch"), (" Torch ", "torch")]
)
def test_the_runner_is_chosen_by_the_environment(
    tiny_artifact: Path, unet_inputs, monkeypatch: pytest.MonkeyPatch, variable: str, runner: str
) -> None:
    monkeypatch.setenv(RUNNER_VARIABLE, variable)
    module = load_module(tiny_artifact / "unet" / "64x64.pt2", unet_inputs[0].weights, CPU)
    assert module.runner == runner
    module.close()


def test_an_unknown_runner_is_refused(tiny_artifact: Path, unet_inputs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RUNNER_VARIABLE, "ctypes")
    with pytest.raises(FastDiffError, match="FASTDIFF_PACKAGE_RUNNER='ctypes' names no package runner") as raised:
        load_module(tiny_artifact / "unet" / "64x64.pt2", unet_inputs[0].weights, CPU)
    assert "capi, torch" in raised.value.fix


@pytest.mark.parametrize("failure", ["self-check", "package"])
def test_torch_loader_takes_over_where_the_c_interface_cannot_run(
    tiny_artifact: Path, unet_inputs, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """A failed self-check (torch changed the functions the C interface needs), or a package the C interface cannot
    run (another layout, extern kernels needing torch's proxy executor): torch's loader runs it, unless the
    environment asks for the C interface, which is then refused with the reason."""
    if failure == "self-check":
        monkeypatch.setattr(capi_module, "self_check", lambda: "torch 9.9 has no torch._C._aoti.x")
        reason = "torch 9.9 has no torch._C._aoti.x"
    else:
        extract_library = capi_module._extract_library

        def unavailable(data, path, folder, runnable=True):  # opened for its declarations, not run (extern kernels)
            if runnable:
                raise RunnerUnavailable("it calls operators outside AOTInductor's C shim")
            return extract_library(data, path, folder, runnable)

        monkeypatch.setattr(capi_module, "_extract_library", unavailable)
        reason = "operators outside AOTInductor's C shim"
    path, (loaded, inputs) = tiny_artifact / "unet" / "64x64.pt2", unet_inputs
    module = load_module(path, loaded.weights, CPU)
    assert module.runner == "torch"
    torch.testing.assert_close(module(*inputs), loaded(*inputs), rtol=0, atol=0)
    module.close()
    monkeypatch.setenv(RUNNER_VARIABLE, "capi")
    with pytest.raises(FastDiffError, match="the C-interface package runner cannot run here") as raised:
        load_module(path, loaded.weights, CPU)
    assert reason in raised.value.problem


def test_the_c_interface_passes_its_self_check() -> None:
    assert capi_module.self_check() is None


def test_every_family_generates_the_same_through_torch_loader(
    tiny_artifact: Path, sd_artifact: Path, pixart_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole pipeline on torch's loader gives, bit for bit, what it gives on the C interface (which the
    equivalence tests hold against diffusers), for each family."""
    for path in (tiny_artifact, sd_artifact, pixart_artifact):
        images = []
        for runner in RUNNERS:
            monkeypatch.setenv(RUNNER_VARIABLE, runner)
            pipe = load_pipeline(path, device="cpu")
            pipe.set_progress_bar_config(disable=True)
            assert {m.runner for m in pipe.unets.values()} == {runner}
            generator = torch.Generator().manual_seed(1)
            images.append(pipe("a photo of a cat", num_inference_steps=2, generator=generator, output_type="np").images)
        torch.testing.assert_close(torch.as_tensor(images[0]), torch.as_tensor(images[1]), rtol=0, atol=0)


def test_weights_are_checked_against_what_the_code_declares() -> None:
    """A package declares each constant's dtype and byte size: exact (CUDA packages) or rounded up to the alignment
    (CPU packages). A weight of another dtype or size is refused by name."""
    from fastdiff.runtime.packages import check_constants

    weights = {"w": torch.zeros(3, dtype=torch.float32)}  # 12 bytes
    check_constants(Path("p.pt2"), {"w": (6, 12)}, weights)
    check_constants(Path("p.pt2"), {"w": (6, 64)}, weights)
    for declared, phrase in (((6, 16), "float32 of 16 bytes"), ((15, 12), "bfloat16 of 12 bytes"), ((99, 12), "99")):
        with pytest.raises(FastDiffError, match=f"p.pt2 takes weight w as .*{phrase}"):
            check_constants(Path("p.pt2"), {"w": declared}, weights)
    with pytest.raises(FastDiffError, match="needs 1 weights that the weight file lacks"):
        check_constants(Path("p.pt2"), {"v": (6, 12)}, weights)
