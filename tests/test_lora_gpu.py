"""LoRAs on a GPU: merged into weights that CUDA graphs captured before the merge replay (the graphs see the merged
weights, nothing is captured again), restored from page-locked host copies, matching diffusers; and an fp8 linear
quantized again as torchao quantizes it. Skipped without a GPU; the GPU machine runs this file
(bench/gpu_session.sh, step gpu-tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli
from lora_helpers import UNET_TARGETS, make_lora
from test_lora import assert_unchanged, latents, relative, snapshot

from fastdiff.runtime import load_pipeline
from fastdiff.runtime.lora import bound_weights
from fastdiff.runtime.packages import CUDAGraphModule
from fastdiff.runtime.requantize import dequantize

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"), pytest.mark.slow]
pytest.importorskip("peft")


def _export(out: Path, *args: str) -> Path:
    proc = run_cli("fastdiff-export", "tiny-sdxl", "--res", "64", "--device", "cuda", "--out", str(out), *args)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    from diffusers import StableDiffusionXLPipeline

    root = tmp_path_factory.mktemp("gpu-lora")
    return make_lora(StableDiffusionXLPipeline, tiny_checkpoint, root, 1, UNET_TARGETS, r=4, lora_alpha=4)


def _reference(checkpoint: Path, dtype: torch.dtype):
    from diffusers import StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline.from_pretrained(checkpoint, torch_dtype=dtype).to("cuda")
    reference.set_progress_bar_config(disable=True)
    return reference


def test_cuda_graphs_replay_the_merged_weights(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, lora: Path, exact_float32
) -> None:
    pipe = load_pipeline(_export(tmp_path_factory.mktemp("cuda") / "fp32", "--dtype", "fp32"), device="cuda")
    pipe.set_progress_bar_config(disable=True)
    reference = _reference(tiny_checkpoint, torch.float32)
    unet = pipe.unets["64x64"]
    assert isinstance(unet, CUDAGraphModule) and len(unet.graphs) == 1
    graphs = dict(unet.graphs)
    before, base = snapshot(pipe), latents(pipe)
    pipe.load_lora_weights(lora, adapter_name="a")
    reference.load_lora_weights(lora, adapter_name="a")
    assert relative(latents(pipe), latents(reference)) < 1e-4
    assert relative(latents(pipe), base) > 0.05
    assert unet.graphs.keys() >= graphs.keys() and all(unet.graphs[k] is graphs[k] for k in graphs)  # none recaptured
    adapters = pipe._lora_adapters()
    assert adapters._base._buffers and all(buffer.is_pinned() for buffer in adapters._base._buffers)
    pipe.unload_lora_weights()
    assert_unchanged(pipe, before)
    assert torch.equal(latents(pipe), base)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="fp8 needs compute 8.9+"
)
def test_fp8_linears_quantized_again_as_torchao(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, lora: Path
) -> None:
    from safetensors.torch import load_file
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    art = _export(tmp_path_factory.mktemp("cuda") / "fp8", "--dtype", "bf16", "--quantize", "fp8")
    pipe = load_pipeline(art, device="cuda")
    pipe.set_progress_bar_config(disable=True)
    reference = _reference(tiny_checkpoint, torch.bfloat16)
    base_error = relative(latents(pipe), latents(reference))
    before = snapshot(pipe)
    pipe.load_lora_weights(lora, adapter_name="a")
    reference.load_lora_weights(lora, adapter_name="a")
    assert relative(latents(pipe), latents(reference)) < 2 * base_error + 0.01
    module = "unet.down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"
    qdata, scale = (f"{module}.parametrizations.weight.original{i}" for i in (0, 1))
    stored, factors = load_file(art / "unet" / "weights.safetensors"), load_file(lora)
    hp = dequantize(stored[qdata], stored[scale])
    hp += factors[f"{module}.lora_B.weight"] @ factors[f"{module}.lora_A.weight"]  # scaling 1: alpha = rank
    expected = Float8Tensor.from_hp(hp.to(torch.bfloat16).cuda(), granularity=PerRow())
    weights = bound_weights(pipe.unets["64x64"])
    assert torch.equal(weights[qdata].view(torch.uint8), expected.qdata.view(torch.uint8))
    assert torch.equal(weights[scale], expected.scale)
    pipe.unload_lora_weights()
    assert_unchanged(pipe, before)
