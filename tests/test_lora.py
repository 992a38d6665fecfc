"""LoRAs at run time (runtime/lora.py): the same images as diffusers' own load_lora_weights, exact switching and
unloading, the export passes' layouts (fused QKV, 1x1 conv as linear, channels_last, int8 re-quantized), refusals that
change nothing, and a load path that does not import the LoRA machinery.

The LoRAs are made with peft and saved with diffusers' save_lora_weights, as diffusers' own LoRA tests make them.
Pipelines of one process over the same artifact share its weights: every test unloads what it loaded.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import copy_artifact
from lora_helpers import UNET_TARGETS, make_lora
from safetensors.torch import load_file, save_file

from fastdiff.runtime import FastDiffError, load_pipeline
from fastdiff.runtime.lora import LoraAdapters, Part, bound_weights, locate
from fastdiff.runtime.lora_files import fetch, normalise
from fastdiff.runtime.requantize import dequantize, quantize_fp8, quantize_int8

peft = pytest.importorskip("peft")

# SD 1.x: the resnets' convolutions too (3x3 and 1x1, stored channels_last in the artifact)
SD_UNET_TARGETS = [*UNET_TARGETS, "conv1", "conv2", "conv_shortcut"]
REQUEST = {"prompt": "a photo of a cat", "num_inference_steps": 3, "height": 64, "width": 64}


def latents(pipe, **kwargs) -> torch.Tensor:
    return pipe(**REQUEST, **kwargs, output_type="latent", generator=torch.Generator().manual_seed(3)).images


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def bound(pipe) -> dict[str, torch.Tensor]:
    """Every tensor the pipeline's denoiser and compiled text encoders bind, by part and name."""
    modules = {"unet": next(iter(pipe.unets.values()))}
    modules |= {f"text_encoder_{i}": e for i, e in enumerate(pipe.conditioner.encoders) if hasattr(e, "module")}
    return {f"{part}/{name}": t for part, m in modules.items() for name, t in bound_weights(m).items()}


def snapshot(pipe) -> dict[str, tuple[int, torch.Tensor]]:
    return {name: (t.data_ptr(), t.clone()) for name, t in bound(pipe).items()}


def assert_unchanged(pipe, before: dict[str, tuple[int, torch.Tensor]]) -> None:
    """The same buffers (what the compiled code and CUDA graphs hold), with the same bytes."""
    now = bound(pipe)
    assert now.keys() == before.keys()
    for name, (pointer, value) in before.items():
        assert now[name].data_ptr() == pointer, name
        assert torch.equal(_bytes(now[name]), _bytes(value)), name


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


@pytest.fixture(scope="module")
def sdxl_loras(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> dict[str, Path]:
    """a: rank 4, alpha 8, with a rank and an alpha pattern, saved with its metadata; b: rank 2 without metadata
    (scaling 1, as diffusers reads it); kohya: b in kohya/A1111 keys, with a different alpha for each layer; unet: a
    UNet-only LoRA."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    root = tmp_path_factory.mktemp("loras")
    patterns = {"rank_pattern": {"ff.net.2": 2}, "alpha_pattern": {"to_out.0": 3}}
    a = make_lora(
        StableDiffusionXLPipeline, tiny_checkpoint, root / "a", 1, UNET_TARGETS, r=4, lora_alpha=8, patterns=patterns
    )
    b = make_lora(StableDiffusionXLPipeline, tiny_checkpoint, root / "b", 2, UNET_TARGETS[:6], metadata=False, r=2)
    kohya = convert_state_dict_to_kohya(load_file(b))
    for i, key in enumerate(sorted(k for k in kohya if k.endswith(".alpha"))):
        kohya[key] = torch.tensor(float(1 + i % 5))
    save_file(kohya, root / "kohya.safetensors")
    unet = make_lora(
        StableDiffusionXLPipeline, tiny_checkpoint, root / "unet", 4, UNET_TARGETS, text=False, r=4, lora_alpha=4
    )
    return {"a": a, "b": b, "kohya": root / "kohya.safetensors", "unet": unet}


@pytest.fixture(scope="module")
def pipe(tiny_pipeline):
    """The session's tiny pipeline (any pipeline of the artifact shares its weights, and so its adapters)."""
    return tiny_pipeline


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path):
    """diffusers' own pipeline, which the LoRAs load into the diffusers way (PEFT layers beside the base ones)."""
    from diffusers import StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline.from_pretrained(tiny_checkpoint)
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.fixture(autouse=True)
def unload(request: pytest.FixtureRequest):
    """Every test leaves its pipelines' weights as the artifact has them (other tests' pipelines share them)."""
    yield
    for name in ("pipe", "reference"):
        if name in request.fixturenames:
            request.getfixturevalue(name).unload_lora_weights()


@pytest.mark.parametrize("lora", ["a", "kohya"])
def test_matches_diffusers(pipe, reference, sdxl_loras: dict[str, Path], lora: str) -> None:
    base = latents(pipe)
    assert pipe.load_lora_weights(sdxl_loras[lora], adapter_name="x") == "x"
    reference.load_lora_weights(sdxl_loras[lora], adapter_name="x")
    mine = latents(pipe)
    assert relative(mine, latents(reference)) < 1e-4
    assert relative(mine, base) > 0.05  # the LoRA changes the image: the comparison above means something
    assert pipe.get_active_adapters() == ["x"]


def test_a_hub_loras_file_is_guessed_as_diffusers_guesses(sdxl_loras: dict[str, Path], monkeypatch) -> None:
    """Without weight_name: pytorch_lora_weights.safetensors, else the repository's one .safetensors file; several
    others are refused; a repository that cannot be listed (offline) is asked for the former."""
    asked = []

    def download(repo_id, filename, subfolder=None, revision=None):
        asked.append(filename)
        return str(sdxl_loras["a"])

    def listing(files):
        def list_repo_files(repo_id, revision=None):
            if files is None:
                raise OSError("offline")
            return files

        return list_repo_files

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    for files, expected in [
        (["README.md", "pixel-art-xl.safetensors", "images/a.png"], "pixel-art-xl.safetensors"),
        (["pytorch_lora_weights.safetensors", "other.safetensors"], "pytorch_lora_weights.safetensors"),
        (["README.md"], "pytorch_lora_weights.safetensors"),
        (None, "pytorch_lora_weights.safetensors"),
    ]:
        monkeypatch.setattr("huggingface_hub.list_repo_files", listing(files))
        fetch("org/lora")
        assert asked[-1] == expected
    monkeypatch.setattr("huggingface_hub.list_repo_files", listing(["a.safetensors", "b.safetensors"]))
    with pytest.raises(FastDiffError, match="holds 2 .safetensors files"):
        fetch("org/lora")


def test_normalised_as_diffusers_lora_state_dict(reference, sdxl_loras: dict[str, Path]) -> None:
    """The lines of lora_state_dict that fastdiff mirrors (instead of importing its module) give what it gives."""
    for lora in ("a", "kohya"):
        expected, expected_alphas = reference.lora_state_dict(sdxl_loras[lora], unet_config=reference.unet.config)
        state_dict, alphas = normalise(fetch(sdxl_loras[lora])[0], "sdxl", reference.unet.config.layers_per_block)
        assert state_dict.keys() == expected.keys() and alphas == expected_alphas
        assert all(torch.equal(state_dict[k], expected[k]) for k in expected)


def test_scales_and_two_adapters_match_diffusers(pipe, reference, sdxl_loras: dict[str, Path]) -> None:
    pipe.load_lora_weights(sdxl_loras["a"], adapter_name="a", scale=0.7)
    reference.load_lora_weights(sdxl_loras["a"], adapter_name="a")
    reference.set_adapters("a", 0.7)
    assert relative(latents(pipe), latents(reference)) < 1e-4
    pipe.load_lora_weights(sdxl_loras["b"], adapter_name="b")
    reference.load_lora_weights(sdxl_loras["b"], adapter_name="b")
    assert pipe.get_active_adapters() == reference.get_active_adapters() == ["b"]  # the new one alone, as diffusers
    for weights in ([0.5, 1.5], [{"unet": 0.0}, {"text_encoder": 0.3, "text_encoder_2": 2.0}]):
        pipe.set_adapters(["a", "b"], weights)
        reference.set_adapters(["a", "b"], weights)
        assert relative(latents(pipe), latents(reference)) < 1e-4, weights
    assert pipe.get_active_adapters() == ["a", "b"]


def test_a_calls_lora_scale_matches_diffusers(pipe, reference, sdxl_loras: dict[str, Path]) -> None:
    """cross_attention_kwargs={"scale": s} scales the active adapters by s for that call (the UNet's layers and the
    text encoders'), as in diffusers; the next call without it is at full weight again, exactly."""
    for p in (pipe, reference):
        p.load_lora_weights(sdxl_loras["a"], adapter_name="a")
        p.load_lora_weights(sdxl_loras["b"], adapter_name="b")
        p.set_adapters(["a", "b"], [0.5, {"unet": 1.5, "text_encoder": 0.0}])
    full = latents(pipe)
    for scale in (0.3, -1.0, 0.0):  # 0 last: diffusers' unscaling after it resets the adapters' weights to 1
        call = {"cross_attention_kwargs": {"scale": scale}}
        assert relative(latents(pipe, **call), latents(reference, **call)) < 1e-4, scale
    assert torch.equal(latents(pipe), full)
    assert torch.equal(latents(pipe, cross_attention_kwargs={}), full)


def _load(name: str, **kwargs):
    return lambda p, loras: p.load_lora_weights(loras[name], adapter_name=name, **kwargs)


# What users do with diffusers' fuse_lora, done the same to diffusers' pipeline and fastdiff's: the images then, and
# with a call's LoRA scale (which fused adapters ignore), match diffusers'.
FUSINGS = {
    "fused at a scale": [_load("a"), lambda p, _: p.fuse_lora(lora_scale=0.5)],
    "unfused, keeping the scale": [_load("a"), lambda p, _: p.fuse_lora(lora_scale=0.5), lambda p, _: p.unfuse_lora()],
    "unloaded: the LoRA stays fused": [
        _load("a"),
        lambda p, _: p.fuse_lora(lora_scale=0.5),
        lambda p, _: p.unload_lora_weights(),
        _load("b"),  # over the fused weights
    ],
    "deleted: the LoRA stays fused": [
        _load("a"),
        _load("b"),
        lambda p, _: p.set_adapters(["a", "b"], [0.7, 1.0]),
        lambda p, _: p.fuse_lora(),
        lambda p, _: p.delete_adapters("a"),
    ],
    "the UNet alone": [_load("a"), lambda p, _: p.fuse_lora(components=["unet"]), lambda p, _: p.unload_lora_weights()],
    "a new LoRA unfuses": [_load("a"), lambda p, _: p.fuse_lora(lora_scale=0.5), _load("b")],
}


@pytest.mark.parametrize("case", FUSINGS)
def test_fuse_lora_as_diffusers(tiny_artifact: Path, tiny_checkpoint: Path, sdxl_loras, tmp_path: Path, case) -> None:
    from diffusers import StableDiffusionXLPipeline

    mine = load_pipeline(copy_artifact(tiny_artifact, tmp_path), device="cpu")  # weights of its own: fusing stays
    theirs = StableDiffusionXLPipeline.from_pretrained(tiny_checkpoint)
    theirs.set_progress_bar_config(disable=True)
    base = latents(mine)
    for step in FUSINGS[case]:
        step(mine, sdxl_loras)
        step(theirs, sdxl_loras)
    assert mine.get_active_adapters() == theirs.get_active_adapters()
    for call in ({}, {"cross_attention_kwargs": {"scale": 2.0}}):
        assert relative(latents(mine, **call), latents(theirs, **call)) < 1e-4, call
    assert relative(latents(mine), base) > 0.05


def test_fused_adapters_refuse_new_weights(pipe, sdxl_loras: dict[str, Path]) -> None:
    """While an adapter is fused, set_adapters is refused (diffusers ignores it, and drifts when it unfuses); fusing
    an adapter that is not active, or parts the model lacks, too; each refusal changes nothing."""
    pipe.load_lora_weights(sdxl_loras["a"], adapter_name="a")
    pipe.load_lora_weights(sdxl_loras["b"], adapter_name="b")
    with pytest.raises(FastDiffError, match="adapter 'a' is not active"):
        pipe.fuse_lora(adapter_names=["a"])
    with pytest.raises(FastDiffError, match="components names 'vae', which is no part of a sdxl model"):
        pipe.fuse_lora(components=["unet", "vae"])
    with pytest.raises(FastDiffError, match="lora_scale must be a finite number"):
        pipe.fuse_lora(lora_scale=float("nan"))
    pipe.fuse_lora(lora_scale=0.5)
    before = snapshot(pipe)
    with pytest.raises(FastDiffError, match=r"adapters 'b' are fused \(fuse_lora\).*\n.*unfuse_lora\(\) first"):
        pipe.set_adapters(["a", "b"])
    assert_unchanged(pipe, before)
    fused = latents(pipe)
    pipe.unfuse_lora()
    assert torch.equal(latents(pipe), fused)  # unfused at the weight it was fused with
    pipe.unload_lora_weights()


def test_safe_fusing_refuses_weights_that_are_not_finite(pipe, sdxl_loras: dict[str, Path]) -> None:
    lora = load_file(sdxl_loras["b"])
    key = next(k for k in sorted(lora) if k.startswith("unet.") and "lora_B" in k)
    lora[key][0, 0] = float("nan")
    pipe.load_lora_weights(lora, adapter_name="nan")
    before = snapshot(pipe)
    with pytest.raises(FastDiffError, match="fusing gives NaN or infinite weights in unet unet.down_blocks"):
        pipe.fuse_lora(safe_fusing=True)
    assert_unchanged(pipe, before)
    pipe.set_adapters("nan", 0.5)  # still unfused


def test_switching_and_unloading_are_exact(pipe, sdxl_loras: dict[str, Path]) -> None:
    before = snapshot(pipe)
    base = latents(pipe)
    pipe.load_lora_weights(sdxl_loras["a"], adapter_name="a")
    with_a = latents(pipe)
    pipe.load_lora_weights(sdxl_loras["b"], adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.3, 0.9])
    pipe.set_adapters("a")
    assert torch.equal(latents(pipe), with_a)  # back to a alone: no drift from the switches between
    pipe.set_adapters([])
    assert torch.equal(latents(pipe), base)
    pipe.set_adapters(["a", "b"], [1.0, 0.7])
    pipe.delete_adapters("b")  # a merged one goes: a stays as it was
    assert pipe.get_active_adapters() == ["a"]
    assert torch.equal(latents(pipe), with_a)
    pipe.set_adapters("a")
    assert torch.equal(latents(pipe), with_a)
    pipe.unload_lora_weights()
    assert pipe.get_active_adapters() == []
    assert_unchanged(pipe, before)
    assert torch.equal(latents(pipe), base)


def test_pipelines_of_one_artifact_share_adapters(pipe, tiny_artifact: Path, sdxl_loras: dict[str, Path]) -> None:
    other = load_pipeline(tiny_artifact, device="cpu", resolutions=["96x64"])
    pipe.load_lora_weights(sdxl_loras["a"], adapter_name="a")
    assert other.get_active_adapters() == ["a"]
    other.unload_lora_weights()
    assert pipe.get_active_adapters() == []


def _renamed(path: Path, old: str, new: str) -> dict[str, torch.Tensor]:
    tensors = load_file(path)
    return {k.replace(old, new): v for k, v in tensors.items()}


def _reshaped(path: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(path)
    key = next(k for k in tensors if k.startswith("unet.") and "attn2.to_k.lora_A" in k)
    tensors[key] = torch.randn(tensors[key].shape[0], 48)  # as if made for a model of another width
    return tensors


def _one_dimensional(path: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(path)
    key = next(k for k in tensors if k.startswith("unet.") and "lora_B" in k)
    tensors[key] = tensors[key].flatten()
    return tensors


def _with_metadata(path: Path, tmp: Path, metadata: dict | list) -> Path:
    from safetensors.torch import save_file

    from fastdiff.runtime.lora_files import METADATA_KEY

    out = tmp / "metadata.safetensors"
    save_file(load_file(path), out, metadata={METADATA_KEY: json.dumps(metadata)})
    return out


BAD_LORAS = {
    "missing file": (lambda loras, tmp: tmp / "nowhere" / "lora.safetensors", "does not exist"),
    "damaged file": (lambda loras, tmp: _write(tmp / "bad.safetensors", b"\0" * 64), "cannot read LoRA file"),
    "not a LoRA": (lambda loras, tmp: {"unet.conv_in.weight": torch.zeros(1)}, "not a LoRA"),
    "hub id offline": (lambda loras, tmp: "nobody/no-such-lora", "cannot fetch LoRA nobody/no-such-lora"),
    "another architecture": (
        lambda loras, tmp: _renamed(loras["unet"], "unet.", "transformer."),
        "belongs to no part of a sdxl model",
    ),
    "a layer the artifact lacks": (
        lambda loras, tmp: _renamed(loras["a"], "attn1.to_q", "attn1.to_z"),
        "LoRA layer unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_z: this artifact's unet has no",
    ),
    "another shape": (lambda loras, tmp: _reshaped(loras["a"]), "attn2.to_k updates a weight of shape [64, 48]"),
    "a one-dimensional factor": (lambda loras, tmp: _one_dimensional(loras["a"]), "shapes or ranks do not fit"),
    "a pattern that is no regular expression": (
        lambda loras, tmp: _with_metadata(loras["unet"], tmp, {"unet.alpha_pattern": {"(": 8}, "unet.r": 4}),
        "the LoRA's metadata for unet is malformed",
    ),
    "an alpha that is no number": (
        lambda loras, tmp: _with_metadata(loras["unet"], tmp, {"unet.lora_alpha": "eight", "unet.r": 4}),
        "the LoRA's metadata for unet gives alpha 'eight'",
    ),
    "a conv factor of another kernel": (  # a conv's up factor is a 1x1 conv: a 3x3 one fits no merge
        lambda loras, tmp: {
            "unet.down_blocks.0.resnets.0.conv1.lora_A.weight": torch.randn(2, 32, 3, 3),
            "unet.down_blocks.0.resnets.0.conv1.lora_B.weight": torch.randn(32, 2, 3, 3),
        },
        "shapes or ranks do not fit",
    ),
    "adapter metadata that is no object": (
        lambda loras, tmp: _with_metadata(loras["unet"], tmp, [1, 2]),
        "the LoRA's adapter metadata is a list",
    ),
    "DoRA": (
        lambda loras, tmp: (
            load_file(loras["unet"]) | {"unet.mid_block.attentions.0.proj_in.lora_magnitude_vector": torch.ones(64)}
        ),
        "is a DoRA magnitude, which fastdiff does not merge",
    ),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", BAD_LORAS)
def test_a_refused_lora_changes_nothing(pipe, sdxl_loras: dict[str, Path], tmp_path: Path, case: str) -> None:
    make, phrase = BAD_LORAS[case]
    pipe.load_lora_weights(sdxl_loras["b"], adapter_name="b")
    before = snapshot(pipe)
    with pytest.raises(FastDiffError, match=phrase.replace("[", r"\[")):
        pipe.load_lora_weights(make(sdxl_loras, tmp_path), adapter_name="x")
    assert_unchanged(pipe, before)
    assert pipe.get_active_adapters() == ["b"]


def test_a_dropped_pipeline_with_a_lora_frees_its_weights(
    tiny_artifact: Path, sdxl_loras: dict[str, Path], tmp_path: Path
) -> None:
    """The weights hold their adapters and nothing holds the weights back: they (and the LoRA's pristine copies) go
    with the last pipeline, without waiting for the cyclic garbage collector."""
    pipe = load_pipeline(copy_artifact(tiny_artifact, tmp_path), device="cpu")  # weights of its own
    pipe.load_lora_weights(sdxl_loras["a"], scale=np.float32(0.5))  # a numpy number, as a call's guidance may be
    gone = weakref.ref(bound_weights(next(iter(pipe.unets.values()))))
    gc.collect()
    gc.disable()
    try:
        del pipe
        assert gone() is None
    finally:
        gc.enable()


BAD_CALLS = {
    "adapter name taken": (lambda p, loras: p.load_lora_weights(loras["a"], adapter_name="b"), "named 'b' is loaded"),
    "scale not a number": (lambda p, loras: p.load_lora_weights(loras["a"], scale=float("nan")), "finite number"),
    "unknown adapter": (lambda p, loras: p.set_adapters(["b", "c"]), "no adapter named 'c' is loaded"),
    "weights per adapter": (lambda p, loras: p.set_adapters(["b"], [1.0, 2.0]), "2 adapter weights for 1 adapters"),
    "unknown part": (lambda p, loras: p.set_adapters("b", {"vae": 1.0}), "name 'vae', which is no part"),
    "delete an unknown adapter": (lambda p, loras: p.delete_adapters(["b", "c"]), "no adapter named 'c' is loaded"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_a_refused_call_changes_nothing(pipe, sdxl_loras: dict[str, Path], case: str) -> None:
    call, phrase = BAD_CALLS[case]
    pipe.load_lora_weights(sdxl_loras["b"], adapter_name="b", scale=0.5)
    before = snapshot(pipe)
    with pytest.raises(FastDiffError, match=phrase):
        call(pipe, sdxl_loras)
    assert_unchanged(pipe, before)
    assert pipe.get_active_adapters() == ["b"]


def test_int8_artifact_requantizes_as_the_export(int8_artifact: Path, reference, sdxl_loras: dict[str, Path]) -> None:
    """The int8 artifact (stock text encoders): a UNet LoRA lands in the quantized linears, each touched row
    quantized again from its dequantized base plus the update as torchao quantizes; its error against diffusers with
    the same LoRA is the base's; a LoRA with text-encoder layers is refused, as those are not bound."""
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    pipe = load_pipeline(int8_artifact, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    weights = bound_weights(next(iter(pipe.unets.values())))
    stored = load_file(int8_artifact / "unet" / "weights.safetensors")
    before = snapshot(pipe)
    base_error = relative(latents(pipe), latents(reference))
    with pytest.raises(FastDiffError, match="text encoders as transformers models"):
        pipe.load_lora_weights(sdxl_loras["a"])
    try:
        pipe.load_lora_weights(sdxl_loras["unet"], adapter_name="u")
        reference.load_lora_weights(sdxl_loras["unet"], adapter_name="u")
        assert relative(latents(pipe), latents(reference)) < 2 * base_error
        lora = load_file(sdxl_loras["unet"])
        prefix = "unet.down_blocks.1.attentions.0.transformer_blocks.0"
        qkv, qkv_scale = (f"{prefix}.attn1.to_qkv.parametrizations.weight.original{i}" for i in (0, 1))
        hp = dequantize(stored[qkv], stored[qkv_scale])
        for i, name in enumerate(("to_q", "to_k", "to_v")):
            up, down = (lora[f"{prefix}.attn1.{name}.lora_{f}.weight"] for f in "BA")
            hp[64 * i : 64 * (i + 1)] += up @ down  # scaling 1: alpha = rank
        expected = Int8Tensor.from_hp(hp, PerRow())
        assert torch.equal(weights[qkv], expected.qdata) and torch.equal(weights[qkv_scale], expected.scale)
    finally:
        pipe.unload_lora_weights()
    assert_unchanged(pipe, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_requantization_is_torchaos(dtype: torch.dtype) -> None:
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    torch.manual_seed(0)
    for magnitude in (1e-4, 1.0, 30.0):
        weight = (torch.randn(48, 32) * magnitude).to(dtype)
        weight[5] = 0  # a zero row: int8's smallest scale
        for quantize, reference in (
            (quantize_int8, Int8Tensor.from_hp(weight, PerRow())),
            (quantize_fp8, Float8Tensor.from_hp(weight, granularity=PerRow())),
        ):
            qdata, scale = quantize(weight)
            assert torch.equal(qdata.view(torch.uint8), reference.qdata.view(torch.uint8))
            assert torch.equal(scale, reference.scale)


def test_placement_through_the_export_passes() -> None:
    """Where a layer's update lands: fused projections by rows, 1x1 convolutions made linear, quantized linears by
    their qdata and scale, a text encoder's layers with or without transformers' text_model."""
    weights = {
        "unet.a.attn1.to_qkv.weight": torch.zeros(96, 8),
        "unet.a.attn2.to_q.weight": torch.zeros(32, 8),
        "unet.a.attn2.to_kv.parametrizations.weight.original0": torch.zeros(64, 8, dtype=torch.int8),
        "unet.a.attn2.to_kv.parametrizations.weight.original1": torch.zeros(64, 1),
        "unet.a.proj_in.linear.weight": torch.zeros(8, 8),
        "encoder.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8),
    }
    assert locate(weights, "unet.", "a.attn1.to_k") == ("unet.a.attn1.to_qkv.weight", None, (32, 64))
    assert locate(weights, "unet.", "a.attn2.to_q") == ("unet.a.attn2.to_q.weight", None, None)
    quantized = "unet.a.attn2.to_kv.parametrizations.weight.original"
    assert locate(weights, "unet.", "a.attn2.to_v") == (f"{quantized}0", f"{quantized}1", (32, 64))
    assert locate(weights, "unet.", "a.proj_in") == ("unet.a.proj_in.linear.weight", None, None)
    q_proj = "text_model.encoder.layers.0.self_attn.q_proj"
    assert (
        locate(weights, "encoder.", q_proj, text_encoder=True)[0] == "encoder.encoder.layers.0.self_attn.q_proj.weight"
    )
    assert locate(weights, "unet.", q_proj) is None
    assert locate(weights, "unet.", "a.attn1.to_out.0") is None


def test_merge_into_a_linear_made_of_a_1x1_conv_and_a_channels_last_conv() -> None:
    """conv1x1_to_linear's linear takes a 1x1 convolution LoRA; a channels_last weight is written through its NHWC
    storage, in place."""
    torch.manual_seed(0)
    linear = torch.randn(8, 6)
    conv = torch.randn(8, 6, 3, 3).contiguous(memory_format=torch.channels_last)
    weights = {"unet.b.proj_in.linear.weight": linear.clone(), "unet.b.conv1.weight": conv.clone()}
    pointers = {name: t.data_ptr() for name, t in weights.items()}
    lora = {
        "unet.b.proj_in.lora_A.weight": torch.randn(2, 6, 1, 1),
        "unet.b.proj_in.lora_B.weight": torch.randn(8, 2, 1, 1),
        "unet.b.conv1.lora_A.weight": torch.randn(2, 6, 3, 3),
        "unet.b.conv1.lora_B.weight": torch.randn(8, 2, 1, 1),
    }
    adapters = LoraAdapters({"unet": Part(weights, torch.float32)}, (), "sd", torch.device("cpu"))
    adapters.load(lora, scale=0.5)
    up, down = lora["unet.b.proj_in.lora_B.weight"].flatten(1), lora["unet.b.proj_in.lora_A.weight"].flatten(1)
    torch.testing.assert_close(weights["unet.b.proj_in.linear.weight"], linear + 0.5 * up @ down)
    up, down = lora["unet.b.conv1.lora_B.weight"].flatten(1), lora["unet.b.conv1.lora_A.weight"].flatten(1)
    torch.testing.assert_close(weights["unet.b.conv1.weight"], conv + 0.5 * (up @ down).view(8, 6, 3, 3))
    assert weights["unet.b.conv1.weight"].is_contiguous(memory_format=torch.channels_last)
    assert {name: t.data_ptr() for name, t in weights.items()} == pointers
    assert adapters.host_bytes >= (linear.numel() + conv.numel()) * 4
    adapters.unload()
    assert torch.equal(weights["unet.b.proj_in.linear.weight"], linear) and torch.equal(
        weights["unet.b.conv1.weight"], conv
    )


def test_quantized_rows_follow_the_active_adapters() -> None:
    """A fused, int8-quantized to_qkv: only the rows of the layers an active adapter updates are quantized again,
    from their dequantized base; switching to an adapter of other rows gives the first rows their base back, bit for
    bit."""
    torch.manual_seed(0)
    qdata, scale = quantize_int8(torch.randn(96, 32))
    name = "unet.a.attn1.to_qkv.parametrizations.weight.original"
    weights = {f"{name}0": qdata.clone(), f"{name}1": scale.clone()}
    adapters = LoraAdapters({"unet": Part(weights, torch.float32)}, (), "sd", torch.device("cpu"))
    loras = {
        proj: {
            f"unet.a.attn1.{proj}.lora_A.weight": torch.randn(2, 32),
            f"unet.a.attn1.{proj}.lora_B.weight": torch.randn(32, 2),
        }
        for proj in ("to_q", "to_k")
    }

    def expected(rows: slice, lora: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        up, down = (v for k, v in sorted(lora.items(), reverse=True))  # lora_B, lora_A
        return quantize_int8(dequantize(qdata[rows], scale[rows]) + up @ down)

    adapters.load(loras["to_q"], adapter_name="q")
    assert torch.equal(weights[f"{name}0"][:32], expected(slice(0, 32), loras["to_q"])[0])
    assert torch.equal(weights[f"{name}0"][32:], qdata[32:]) and torch.equal(weights[f"{name}1"][32:], scale[32:])
    adapters.load(loras["to_k"], adapter_name="k")
    k_qdata, k_scale = expected(slice(32, 64), loras["to_k"])
    assert torch.equal(weights[f"{name}0"][32:64], k_qdata) and torch.equal(weights[f"{name}1"][32:64], k_scale)
    assert torch.equal(weights[f"{name}0"][:32], qdata[:32]) and torch.equal(weights[f"{name}1"][:32], scale[:32])
    adapters.unload()
    assert torch.equal(weights[f"{name}0"], qdata) and torch.equal(weights[f"{name}1"], scale)


@pytest.fixture(scope="module")
def sd_lora(tmp_path_factory: pytest.TempPathFactory, sd_checkpoint: Path) -> Path:
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("sd-lora")
    return make_lora(StableDiffusionPipeline, sd_checkpoint, root, 5, SD_UNET_TARGETS, r=4, lora_alpha=6)


def test_sd_matches_diffusers(sd_artifact: Path, sd_checkpoint: Path, sd_lora: Path) -> None:
    """SD 1.x, with LoRAs on the resnets' convolutions too (stored channels_last)."""
    from diffusers import StableDiffusionPipeline

    pipe = load_pipeline(sd_artifact, device="cpu")
    reference = StableDiffusionPipeline.from_pretrained(sd_checkpoint)
    for p in (pipe, reference):
        p.set_progress_bar_config(disable=True)
    base = latents(pipe)
    try:
        pipe.load_lora_weights(sd_lora, adapter_name="s", scale=0.8)
        reference.load_lora_weights(sd_lora, adapter_name="s")
        reference.set_adapters("s", 0.8)
        mine = latents(pipe)
        assert relative(mine, latents(reference)) < 1e-4
        assert relative(mine, base) > 0.05
    finally:
        pipe.unload_lora_weights()
    assert torch.equal(latents(pipe), base)


def test_pixart_is_refused(pixart_artifact: Path, sdxl_loras: dict[str, Path]) -> None:
    pipe = load_pipeline(pixart_artifact, device="cpu")
    with pytest.raises(FastDiffError, match="diffusers loads no LoRA into a pixart pipeline"):
        pipe.load_lora_weights(sdxl_loras["unet"])


# Loads the artifact, records what the load imported, then loads a LoRA and records what that imported.
IMPORTS_PROBE = textwrap.dedent(
    """
    import json, sys
    from fastdiff.runtime import load_pipeline

    pipe = load_pipeline(sys.argv[1], device="cpu")
    loaded = set(sys.modules)
    pipe.load_lora_weights(sys.argv[2])
    print(json.dumps({"load": sorted(loaded), "lora": sorted(set(sys.modules) - loaded)}))
    """
)


def test_the_load_path_does_not_import_the_lora_machinery(tiny_artifact: Path, sdxl_loras: dict[str, Path]) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", IMPORTS_PROBE, str(tiny_artifact), str(sdxl_loras["a"])], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = json.loads(proc.stdout.splitlines()[-1])
    lora_modules = ("fastdiff.runtime.lora", "diffusers.loaders", "peft")
    assert [m for m in imported["load"] if m.startswith(lora_modules)] == []
    assert "diffusers.loaders.lora_conversion_utils" in imported["lora"]
    heavy = ("peft", "transformers", "torchao", "diffusers.models", "diffusers.pipelines", "fastdiff.exporter")
    assert [m for m in imported["lora"] if m.split(".")[0] in heavy or m.startswith(heavy)] == []
