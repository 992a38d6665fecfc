"""What only a GPU shows: on CUDA (weights streamed through pinned buffers, the UNet step and the text encoders
replayed as CUDA graphs) an artifact still matches diffusers, and the denoise loop never waits for the GPU. Skipped
without one; the GPU machine runs this file (bench/gpu_session.sh, step gpu-tests)."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_matches_diffusers, assert_no_packages_left_at_exit, run_cli

from fastdiff.runtime import load_pipeline
from fastdiff.runtime.packages import CUDAGraphModule

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"), pytest.mark.slow]  # exports


@pytest.fixture(scope="module", params=["tiny-sdxl", "tiny-sd"])
def cuda_pipelines(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, exact_float32):
    """The SDXL and SD 1.x families (Euler and PNDM schedulers), exported for CUDA in fp32, beside diffusers'."""
    import diffusers

    from fastdiff.exporter.presets import PRESETS

    preset = request.param
    out = tmp_path_factory.mktemp("cuda") / preset
    args = ("--res", "64", "--device", "cuda", "--dtype", "fp32", "--out", str(out))
    proc = run_cli("fastdiff-export", preset, *args)
    assert proc.returncode == 0, proc.stderr
    mine = load_pipeline(out, device="cuda")
    reference = diffusers.DiffusionPipeline.from_pretrained(PRESETS[preset].build()).to("cuda")
    for pipe in (mine, reference):
        pipe.set_progress_bar_config(disable=True)
    return mine, reference


def test_loaded_for_cuda_graphs(cuda_pipelines) -> None:
    """The UNet step and the text encoders replay CUDA graphs, captured by the warm-up at a default request's
    shapes (one prompt)."""
    mine, _ = cuda_pipelines
    modules = [mine.unets["64x64"], *(encoder.module for encoder in mine.conditioner.encoders)]
    assert len(modules) == {"tiny-sdxl": 3, "tiny-sd": 2}[mine.manifest.source["preset"]]
    for module in modules:
        assert isinstance(module, CUDAGraphModule)
        assert len(module.graphs) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="defaults"),
        pytest.param({"prompt": ["a cat", "a dog"], "negative_prompt": ["blurry", "dark"]}, id="batch-negative"),
        pytest.param({"guidance_scale": 1.0}, id="no-cfg"),
    ],
)
def test_matches_diffusers_on_the_gpu(cuda_pipelines, kwargs: dict) -> None:
    assert_matches_diffusers(*cuda_pipelines, **kwargs)


def test_the_denoise_loop_never_waits_for_the_gpu(cuda_pipelines, monkeypatch: pytest.MonkeyPatch) -> None:
    """Timesteps and sigmas stay on the CPU, no .item() or data-dependent branch: CUDA's sync debug mode would raise
    on the first synchronizing call."""
    mine, _ = cuda_pipelines
    denoise = mine._denoise

    def checked(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return denoise(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(mine, "_denoise", checked)
    latents = mine("a photo of a cat", num_inference_steps=8, height=64, width=64, output_type="latent").images
    assert torch.isfinite(latents).all()


def test_a_dropped_pipeline_frees_its_weights(cuda_pipelines, tmp_path: Path) -> None:
    """The packages keep references to the weights after they are gone (pytorch/pytorch#194480); the runtime
    releases the weights' device memory itself when the last pipeline using them goes. (Other memory stays with the
    process: cuBLAS workspaces and the like, ~0.1 GB here on the H200.)"""
    mine, _ = cuda_pipelines
    art = Path(shutil.copytree(mine.unets["64x64"].module.path.parents[1], tmp_path / "art"))  # not shared with mine
    pipe = load_pipeline(art, device="cuda")
    modules = [*pipe.unets.values(), *pipe.vae_decoders.values()]
    tensors = [t for m in modules for t in getattr(m, "module", m).weights.values()]
    storages = list({t.untyped_storage().data_ptr(): t.untyped_storage() for t in tensors}.values())
    weight_bytes = sum(s.nbytes() for s in storages)
    del tensors
    loaded = torch.cuda.memory_allocated()
    del pipe, modules
    gc.collect()
    assert max(s.nbytes() for s in storages) == 0
    assert loaded - torch.cuda.memory_allocated() >= weight_bytes


def test_exit_after_cuda_graphs_leaves_no_packages(cuda_pipelines, tmp_path: Path) -> None:
    """The runtime releases its packages at exit after the GPU is done, with the UNet step captured as a CUDA
    graph and a generation possibly still running."""
    mine, _ = cuda_pipelines
    assert_no_packages_left_at_exit(mine.unets["64x64"].module.path.parents[1], "cuda", tmp_path)


def test_int8_artifact_generates(tmp_path: Path) -> None:
    """cuBLAS's int8 matmul needs more than 16 rows: the linears that see one row per image stay unquantized, so an
    int8 artifact runs at one image with CFG (2 rows; the warm-up calls it so) and gives a finite image. (At 64² the
    tiny model's 4x4 latents would give its inner attention 16 rows at batch 1, which the export refuses.)"""
    pytest.importorskip("torchao")
    out = tmp_path / "int8"
    args = ("--res", "128", "--device", "cuda", "--dtype", "bf16", "--quantize", "int8", "--out", str(out))
    proc = run_cli("fastdiff-export", "tiny-sdxl", *args)
    assert proc.returncode == 0, proc.stderr
    pipe = load_pipeline(out, device="cuda")
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a photo of a cat", num_inference_steps=4, output_type="np").images
    assert images.shape == (1, 128, 128, 3) and np.isfinite(images).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_pipeline_on_another_gpu_runs_there(cuda_pipelines) -> None:
    """A package runs on the current device's stream and its loader makes its own device current: a pipeline on
    cuda:1 loads and runs with cuda:1 current, and leaves the caller's current device as it was."""
    mine, _ = cuda_pipelines
    torch.cuda.set_device(0)
    other = load_pipeline(mine.unets["64x64"].module.path.parents[1], device="cuda:1")
    assert torch.cuda.current_device() == 0
    kwargs = {"num_inference_steps": 4, "output_type": "latent", "generator": torch.Generator().manual_seed(3)}
    there = other("a photo of a cat", **kwargs).images
    assert there.device == torch.device("cuda", 1) and torch.cuda.current_device() == 0
    kwargs["generator"] = torch.Generator().manual_seed(3)
    here = mine("a photo of a cat", **kwargs).images
    torch.testing.assert_close(there.cpu(), here.cpu(), rtol=1e-4, atol=1e-5)


def test_torch_loader_replays_cuda_graphs_too(cuda_pipelines, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback runner (torch's public loader) loads the same artifact for CUDA-graph replay and gives what the
    C interface gives."""
    from fastdiff.runtime.packages import RUNNER_VARIABLE

    mine, _ = cuda_pipelines
    monkeypatch.setenv(RUNNER_VARIABLE, "torch")
    other = load_pipeline(mine.unets["64x64"].module.path.parents[1], device="cuda")
    other.set_progress_bar_config(disable=True)
    assert other.unets["64x64"].module.runner == "torch" and len(other.unets["64x64"].graphs) == 1
    kwargs = {"num_inference_steps": 4, "output_type": "latent"}
    theirs = other("a photo of a cat", generator=torch.Generator().manual_seed(3), **kwargs).images
    here = mine("a photo of a cat", generator=torch.Generator().manual_seed(3), **kwargs).images
    torch.testing.assert_close(theirs, here, rtol=1e-5, atol=1e-6)


def test_tokens_beyond_the_vocabulary_never_reach_the_gpu(cuda_pipelines, tmp_path: Path) -> None:
    """A tokenizer that could yield ids past the encoder's embedding (a device-side assert would end the process's
    CUDA context) is refused at load, before any GPU call."""
    from tokenizers import Tokenizer

    mine, _ = cuda_pipelines
    art = Path(shutil.copytree(mine.unets["64x64"].module.path.parents[1], tmp_path / "art"))
    tokenizer = Tokenizer.from_file(str(art / "tokenizer" / "tokenizer.json"))
    tokenizer.add_tokens([f"<extra{i}>" for i in range(8)])
    tokenizer.save(str(art / "tokenizer" / "tokenizer.json"))
    from fastdiff.runtime.format import MANIFEST_NAME, describe_files

    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["files"] = describe_files(art)
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    proc = run_cli("fastdiff-run", str(art), "-p", "<extra7>", "--steps", "1", "--out", str(tmp_path / "a.png"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "its text encoder embeds only" in proc.stderr


def test_out_of_gpu_memory_is_one_clear_error(cuda_pipelines, tmp_path: Path) -> None:
    """A GPU too full for the artifact: one error line, exit 2, no image."""
    mine, _ = cuda_pipelines
    art = mine.unets["64x64"].module.path.parents[1]
    code = (
        "import sys, torch; torch.cuda.set_per_process_memory_fraction(1e-6); "
        "from fastdiff.runtime.cli import run_main; sys.argv[0] = 'fastdiff-run'; run_main()"
    )
    out = tmp_path / "a.png"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(art), "-p", "a cat", "--steps", "1", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "out of memory on the device" in proc.stderr and not out.exists()
