"""Export passes (exporter/passes.py), each switched on alone and checked numerically in eager mode on the tiny model.

Measured on the tiny UNet and VAE decoder (fp32, CPU), against the untouched model:
  sdpa (vs the classic attention processor), fuse_qkv: max abs difference < 1e-6 (often exactly 0)
  channels_last, conv1x1_to_linear: max abs difference ~1.8e-6 (outputs up to ~1.3)
  int8 (torchao dynamic int8): relative L2 error ~1.0e-2 on one UNet evaluation; ~1.2e-2 on the latents of a
  3-step, CFG 5.0 generation from the exported int8 artifact, against the fp32 artifact.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0
from safetensors import safe_open
from torch import nn
from torch.export import Dim

from fastdiff.exporter import passes as passes_module
from fastdiff.exporter.compile import check_int8_rows, export_program, parse_inductor_config
from fastdiff.exporter.export import export_artifact
from fastdiff.exporter.options import ExportOptions, check_options, default_component_configs
from fastdiff.exporter.passes import (
    FP8_ACTIVATION_AMAX_MIN,
    SEED_INT8_SKIP_SHAPES,
    Conv1x1AsLinear,
    _is_pointwise,
    apply_passes,
    default_quantization,
    fp8_filter,
    int8_filter,
    named,
    quantization_advice,
)
from fastdiff.exporter.presets import PRESETS
from fastdiff.exporter.source import FAMILIES, model_family
from fastdiff.exporter.wrappers import SDXLUNetStep, VAEDecode
from fastdiff.runtime import FastDiffError
from fastdiff.runtime.format import Resolution

LAYOUT_TOL = {"rtol": 1e-5, "atol": 1e-5}  # fp32 rounding of a reordered computation, ~5x the measured difference
INT8_MAX_REL_L2 = 0.03  # one UNet evaluation, ~3x the measured 1.0e-2
INT8_ARTIFACT_MAX_REL_L2 = 0.05  # latents of a 3-step generation, ~4x the measured 1.2e-2
FP8_MAX_REL_L2 = 0.1  # e4m3 has a 3-bit mantissa: ~6% per-element rounding before averaging


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def load_unet(checkpoint: Path) -> nn.Module:
    return UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet").eval().requires_grad_(False)


def load_vae(checkpoint: Path) -> nn.Module:
    return AutoencoderKL.from_pretrained(checkpoint, subfolder="vae").eval().requires_grad_(False)


def unet_inputs(unet: nn.Module, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Two CFG-sized rows at 96x64 (non-square, so a swapped permute in a pass cannot go unnoticed)."""
    g = torch.Generator().manual_seed(0)
    n, h, w = 2, 8, 12
    config = unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    inputs = (
        torch.randn(n, config.in_channels, h, w, generator=g),
        torch.tensor(500.0),
        torch.randn(n, 77, config.cross_attention_dim, generator=g),
        torch.randn(n, pooled, generator=g),
        torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]] * n, dtype=torch.float32),
    )
    return tuple(t.to(device, dtype if t.dim() else torch.float32) for t in inputs)


def vae_inputs(device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor]:
    return (torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(1)).to(device, dtype),)


@torch.no_grad()
def run_unet(unet: nn.Module, inputs) -> torch.Tensor:
    return SDXLUNetStep(unet)(*inputs)


@torch.no_grad()
def run_vae(vae: nn.Module, inputs) -> torch.Tensor:
    return VAEDecode(vae)(*inputs)


COMPONENTS = {
    "unet": (load_unet, lambda model: unet_inputs(model), run_unet),
    "vae": (load_vae, lambda model: vae_inputs(), run_vae),
}


def _processor_types(model: nn.Module) -> set[type]:
    return {type(p) for p in model.attn_processors.values()}


@pytest.fixture(params=list(COMPONENTS))
def component(request, tiny_checkpoint: Path):
    """(untouched model, a fresh copy to transform, inputs, forward function) for the UNet and the VAE decoder."""
    load, make_inputs, forward = COMPONENTS[request.param]
    model = load(tiny_checkpoint)
    return model, copy.deepcopy(model), make_inputs(model), forward


def test_sdpa(component) -> None:
    reference, model, inputs, forward = component
    for m in (reference, model):
        m.set_attn_processor(AttnProcessor())  # the classic (explicit softmax) attention as the baseline
    expected = forward(reference, inputs)
    out = forward(apply_passes(model, ["sdpa"]), inputs)
    assert _processor_types(model) == {AttnProcessor2_0}
    torch.testing.assert_close(out, expected, **LAYOUT_TOL)


def test_fuse_qkv(component) -> None:
    reference, model, inputs, forward = component
    expected = forward(reference, inputs)
    out = forward(apply_passes(model, ["fuse_qkv"]), inputs)
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert attentions
    for attn in attentions:
        assert attn.fused_projections
        assert hasattr(attn, "to_kv" if attn.is_cross_attention else "to_qkv")
    assert _processor_types(model) == {FusedAttnProcessor2_0}
    torch.testing.assert_close(out, expected, **LAYOUT_TOL)


def test_channels_last(component) -> None:
    reference, model, inputs, forward = component
    expected = forward(reference, inputs)
    out = forward(apply_passes(model, ["channels_last"]), inputs)
    spatial = [p for p in model.parameters() if p.dim() == 4 and p.shape[-1] * p.shape[-2] > 1 and p.shape[1] > 1]
    assert spatial
    for p in spatial:
        assert p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    torch.testing.assert_close(out, expected, **LAYOUT_TOL)


def _count(model: nn.Module) -> dict[str, int]:
    modules = list(model.modules())
    return {
        "pointwise": sum(_is_pointwise(m) for m in modules),
        "wrapped": sum(isinstance(m, Conv1x1AsLinear) for m in modules),
        "other_convs": sum(isinstance(m, nn.Conv2d) and not _is_pointwise(m) for m in modules),
    }


def test_conv1x1_to_linear(component) -> None:
    reference, model, inputs, forward = component
    before = _count(model)
    assert before["pointwise"] > 0 and before["wrapped"] == 0
    expected = forward(reference, inputs)
    out = forward(apply_passes(model, ["conv1x1_to_linear"]), inputs)
    after = _count(model)
    assert after == {"pointwise": 0, "wrapped": before["pointwise"], "other_convs": before["other_convs"]}
    torch.testing.assert_close(out, expected, **LAYOUT_TOL)


def test_tiny_model_pointwise_counts(tiny_checkpoint: Path) -> None:
    """The tiny UNet's five conv shortcuts and the VAE's four 1x1 convs (quant, post-quant, two shortcuts)."""
    assert _count(load_unet(tiny_checkpoint))["pointwise"] == 5
    assert _count(load_vae(tiny_checkpoint))["pointwise"] == 4


def _is_quantized(weight: torch.Tensor) -> bool:
    return type(weight) is not torch.Tensor and type(weight) is not nn.Parameter


def test_int8_unet(tiny_checkpoint: Path) -> None:
    pytest.importorskip("torchao")
    reference = load_unet(tiny_checkpoint)
    model = copy.deepcopy(reference)
    selected = {name for name, m in model.named_modules() if int8_filter(m, name)}
    inputs = unet_inputs(reference)
    expected = run_unet(reference, inputs)
    out = run_unet(apply_passes(model, ["int8"]), inputs)
    quantized = {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and _is_quantized(m.weight)}
    assert selected and quantized == selected
    assert torch.isfinite(out).all()
    error = rel_l2(out, expected)
    assert 1e-5 < error < INT8_MAX_REL_L2  # quantization changed something, and not much


@pytest.mark.slow  # torch.export of the UNet, twice
@pytest.mark.parametrize("per_image_unquantized", [True, False], ids=["filtered", "per-image-quantized"])
def test_int8_rows_checked_before_a_gpu_compile(
    per_image_unquantized: bool, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An int8 matmul that a call can give 16 rows or fewer fails at run time on a GPU: the export refuses it before
    the compile, over every batch size the package accepts. The tiny SDXL UNet passes once the linears that see one
    row per image stay unquantized."""
    pytest.importorskip("torchao")
    if not per_image_unquantized:
        monkeypatch.setattr(passes_module, "PER_IMAGE_LINEARS", frozenset())
    step = SDXLUNetStep(apply_passes(load_unet(tiny_checkpoint), ["int8"]))
    batch = Dim("batch", min=1, max=4)
    dynamic = {name: None if name == "timestep" else {0: batch} for name in SDXLUNetStep.inputs}
    program = export_program(step, unet_inputs(step.unet), dynamic)
    check_int8_rows(program, torch.device("cpu"), "unet/96x64.pt2")  # no such limit on the CPU
    if per_image_unquantized:
        check_int8_rows(program, torch.device("cuda"), "unet/96x64.pt2")
    else:
        message = r"int8 cannot quantize linear 'unet\.\w+_embedding\.linear_\d' of unet/96x64.pt2: .* 1 row, "
        with pytest.raises(FastDiffError, match=message):
            check_int8_rows(program, torch.device("cuda"), "unet/96x64.pt2")


def test_int8_filter() -> None:
    def linear(i: int, o: int) -> nn.Linear:
        return nn.Linear(i, o, device="meta")

    assert not int8_filter(linear(16, 64), "x")  # in_features <= 16 stays in the compute dtype
    assert not int8_filter(linear(8, 1280), "x")
    assert int8_filter(linear(17, 64), "x")
    assert int8_filter(linear(64, 16), "x")
    assert int8_filter(linear(1280, 1280), "x")
    assert int8_filter(linear(320, 1280), "x")
    for per_image in (
        "time_embedding.linear_1",
        "add_embedding.linear_2",
        "down_blocks.1.resnets.0.time_emb_proj",
        "adaln_single.emb.timestep_embedder.linear_1",
        "adaln_single.linear",
    ):
        assert not int8_filter(linear(320, 1280), per_image)  # one row per image: too few for an int8 matmul on CUDA
    for shape in SEED_INT8_SKIP_SHAPES:
        assert not int8_filter(linear(*shape), "x"), shape
        if shape[::-1] not in SEED_INT8_SKIP_SHAPES:
            assert int8_filter(linear(*shape[::-1]), "x"), shape[::-1]  # (in, out), not (out, in)
    assert not int8_filter(nn.Conv2d(64, 64, 1, device="meta"), "x")
    assert not int8_filter(nn.Embedding(100, 64, device="meta"), "x")
    qkv = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_qkv"
    assert int8_filter(linear(1920, 1280), qkv, ["attn1.to_qkv"])  # named: the seed's shape filter no longer decides
    assert not int8_filter(linear(320, 1280), qkv.replace("attn1.to_qkv", "ff.net.2"), ["attn1.to_qkv"])
    assert not int8_filter(linear(320, 1280), "time_embedding.linear_1", ["linear_1"])  # one row per image: never
    assert not int8_filter(linear(16, 64), qkv, ["attn1.to_qkv"])


def test_named_linears() -> None:
    block = "down_blocks.1.attentions.0.transformer_blocks.0"
    assert named(f"{block}.attn1.to_qkv", ["ff.net.2", "attn1.to_qkv"])
    assert named("ff.net.2", ["ff.net.2"])
    assert not named(f"{block}.attn1.to_qkv", ["to_q"])  # whole module names only
    assert not named(f"{block}.ff.net.2", ["net.0.proj"])
    assert not named(f"{block}.xff.net.2", ["ff.net.2"])
    assert not named(f"{block}.ff.net.2", [])


def test_int8_pass_follows_filter() -> None:
    pytest.importorskip("torchao")
    model = nn.Sequential(
        OrderedDict(
            small=nn.Linear(16, 64),
            kept=nn.Linear(64, 48),
            seed_skip=nn.Linear(1920, 1280),
            transposed=nn.Linear(1280, 1920),  # (1920, 1280) is skipped, not this
            conv=nn.Conv2d(64, 64, 1),
        )
    )
    apply_passes(model, ["int8"])
    quantized = {name for name, m in model.named_children() if _is_quantized(m.weight)}
    assert quantized == {"kept", "transposed"}


def test_int8_pass_quantizes_the_named_linears() -> None:
    """--quantize-linears replaces the pass's own choice and keeps its limits; each name must name a linear the model
    runs, and one the pass can quantize (else the option would quietly do nothing for it)."""
    pytest.importorskip("torchao")

    def model() -> nn.Sequential:
        small, seed_skip = nn.Sequential(OrderedDict(proj=nn.Linear(16, 64))), nn.Linear(1920, 1280)
        return nn.Sequential(OrderedDict(a=small, b=nn.Sequential(OrderedDict(proj=seed_skip)), kept=nn.Linear(64, 48)))

    quantized = apply_passes(model(), ["int8"], quantize_linears=["proj"])
    linears = {fqn: m for fqn, m in quantized.named_modules() if isinstance(m, nn.Linear)}
    assert {fqn for fqn, m in linears.items() if _is_quantized(m.weight)} == {"b.proj"}
    for names, message in (
        ([], "names no linear"),
        (["kept", "nope"], "no linear the Sequential runs is named 'nope'"),
        (["a.proj"], "none of the linears named 'a.proj' can be quantized: int8 leaves"),
    ):
        with pytest.raises(FastDiffError, match=message):
            apply_passes(model(), ["int8"], quantize_linears=names)


def test_named_linears_replaced_by_fused_projections_are_refused() -> None:
    """After fuse_qkv, diffusers keeps to_q/to_k/to_v as modules it no longer calls: naming them would quantize
    nothing that runs."""
    pytest.importorskip("torchao")
    from diffusers.models.attention_processor import Attention

    def model() -> nn.Sequential:
        attn = nn.Sequential(OrderedDict(attn1=Attention(query_dim=64, heads=2, dim_head=32)))
        attn.attn1.fuse_projections()
        return attn

    with pytest.raises(FastDiffError, match=r"named 'attn1.to_q' \(the fuse_qkv pass replaced it\)"):
        apply_passes(model(), ["int8"], quantize_linears=["attn1.to_q"])
    quantized = apply_passes(model(), ["int8"], quantize_linears=["to_qkv"])
    assert _is_quantized(quantized.attn1.to_qkv.weight) and not _is_quantized(quantized.attn1.to_q.weight)


def test_quantization_leaves_the_compile_flags_alone() -> None:
    """torchao's configs would switch on coordinate-descent tuning for every later compile in the process."""
    pytest.importorskip("torchao")
    flags = {"coordinate_descent_tuning": False, "coordinate_descent_check_all_directions": False}
    with torch._inductor.config.patch(**flags, force_fuse_int_mm_with_mul=False):
        before = torch._inductor.config.get_config_copy()
        apply_passes(nn.Sequential(nn.Linear(64, 48)), ["int8"])
        assert torch._inductor.config.get_config_copy() == before


def test_int8_compiles_with_fused_scales() -> None:
    options = ExportOptions("m", [Resolution(64, 64)], torch.device("cpu"), passes=["sdpa", "int8"])
    assert options.inductor_configs() == {"force_fuse_int_mm_with_mul": True}
    options.max_autotune = True
    options.passes = ["sdpa"]
    assert options.inductor_configs() == {"max_autotune": True}


@pytest.mark.slow  # AOTInductor compiles
@pytest.mark.parametrize("passes", [["channels_last"], []], ids=["channels-last", "nchw"])
def test_channels_last_keeps_activations_nhwc_with_a_dynamic_batch(
    passes: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inductor never lays activations out NHWC in a graph with a dynamic dimension (the UNet's batch) by itself;
    with the channels_last pass it is made to, as torch.compile does for the same model with a static batch.
    On the CPU, oneDNN makes Inductor pick NHWC for every convolution, so it is off here to take the GPU's path."""
    from torch._inductor.graph import GraphLowering

    from fastdiff.exporter.compile import compile_package

    decisions = []
    decide = GraphLowering.decide_layout_opt

    def spy(gm: torch.fx.GraphModule, *, is_inference: bool) -> bool:
        decisions.append(decide(gm, is_inference=is_inference))
        return decisions[-1]

    monkeypatch.setattr(GraphLowering, "decide_layout_opt", staticmethod(spy))
    block = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(), nn.Conv2d(64, 64, 3))
    options = ExportOptions("m", [Resolution(16, 16)], torch.device("cpu"), passes=passes)
    program = export_program(
        apply_passes(block.eval(), passes), (torch.randn(2, 32, 16, 16),), {"input": {0: Dim("b", max=4)}}
    )
    with torch.backends.mkldnn.flags(enabled=False):
        compile_package(program, tmp_path / "block.pt2", options.inductor_configs(), options.device)
    assert decisions == ["channels_last" in passes]


@pytest.mark.slow  # AOTInductor compiles, one autotuned
def test_autotuning_reports_stay_off_the_console(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With max-autotune Inductor writes a benchmark table per GEMM to stderr; the export keeps them off its console
    unless asked, and keeps its log quiet about autotuning choices Inductor skips for lack of shared memory."""
    from fastdiff.exporter import compile as compile_module

    program = export_program(nn.Linear(64, 128).eval(), (torch.randn(32, 64),), None)
    # force_disable_caches: the GEMM is autotuned again whatever an earlier run left in Inductor's caches
    cpu = torch.device("cpu")
    configs = {"max_autotune": True, "force_disable_caches": True}
    compile_module.compile_package(program, tmp_path / "mm.pt2", configs, cpu)
    err = capfd.readouterr().err
    assert "AUTOTUNE" not in err and "Autotune Choices Stats" not in err, err[-2000:]

    compiled = []
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda *a, **k: compiled.append(k))
    compile_module.compile_package(program, tmp_path / "mm.pt2", {"autotune_num_choices_displayed": 10}, cpu)
    assert compiled[0]["inductor_configs"]["autotune_num_choices_displayed"] == 10  # the user's setting wins

    log = logging.getLogger("torch._inductor.select_algorithm")
    shown = []
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda *a, **k: shown.extend(_logged(log)))
    compile_module.compile_package(program, tmp_path / "mm.pt2", {}, cpu)
    assert shown == [
        "Runtime error during autotuning: \nNo valid triton configs. RuntimeError: bad. \nIgnoring this choice."
    ]
    assert len(_logged(log)) == 2  # the filter is gone after the compile


@pytest.mark.slow  # an AOTInductor compile
def test_cpu_packages_target_the_isa_level_not_this_processor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU package is compiled for the x86-64 level of the ISA the manifest records (what the runtime checks), not
    for the export machine's own processor, whose other instructions a CPU of the same level may lack."""
    from torch._inductor import cpp_builder

    from fastdiff.exporter.compile import X86_LEVELS, compile_package

    level = X86_LEVELS.get(torch.backends.cpu.get_cpu_capability())
    if level is None:
        pytest.skip("not an x86 CPU")
    flags = []
    arch_flags = cpp_builder._get_cpu_arch_cflags
    monkeypatch.setattr(cpp_builder, "_get_cpu_arch_cflags", lambda *a: flags.append(arch_flags(*a)) or flags[-1])
    program = export_program(nn.Linear(16, 8).eval(), (torch.randn(4, 16),), None)
    compile_package(program, tmp_path / "linear.pt2", {"force_disable_caches": True}, torch.device("cpu"))
    assert flags and all(f == [f"march={level}"] for f in flags), flags


def _logged(log: logging.Logger) -> list[str]:
    """The messages `log` passes on of two autotuning errors: a Triton config out of shared memory, another one."""
    passed = []
    handler = logging.Handler()
    handler.emit = lambda record: passed.append(record.getMessage())
    log.addHandler(handler)
    try:
        for error in ("OutOfResources: out of resource: shared memory", "RuntimeError: bad"):
            log.error(
                "Runtime error during autotuning: \n%s. \nIgnoring this choice.", f"No valid triton configs. {error}"
            )
    finally:
        log.removeHandler(handler)
    return passed


def test_inductor_config_from_the_command_line() -> None:
    configs = parse_inductor_config(
        [
            "max_autotune=true",
            "max_autotune_conv_backends=ATEN",
            "unroll_reductions_threshold = 20",
            "epilogue_fusion=0",
        ]
    )
    assert configs == {
        "": {
            "max_autotune": True,
            "max_autotune_conv_backends": "ATEN",
            "unroll_reductions_threshold": 20,
            "epilogue_fusion": False,
        }
    }
    options = ExportOptions("m", [Resolution(64, 64)], torch.device("cpu"), seed_inductor_flags=True)
    options.inductor_overrides = {"epilogue_fusion": True}  # the user's settings come last
    assert options.inductor_configs()["epilogue_fusion"] is True
    with torch._inductor.config.patch(options.inductor_configs()):  # every key is one Inductor knows
        pass


def test_inductor_config_for_one_component() -> None:
    """COMPONENT:KEY=VALUE applies to that component's packages only, after the settings for all of them."""
    configs = parse_inductor_config(
        ["epilogue_fusion=false", "vae_decoder:max_autotune=true", "vae_decoder:epilogue_fusion=true"]
    )
    assert configs == {"": {"epilogue_fusion": False}, "vae_decoder": {"max_autotune": True, "epilogue_fusion": True}}
    options = ExportOptions(
        "m",
        [Resolution(64, 64)],
        torch.device("cpu"),
        passes=["channels_last"],
        inductor_overrides=configs.pop(""),
        component_inductor_overrides=configs,
    )
    layout = {"force_layout_optimization": True}  # the channels_last pass's own setting
    assert options.inductor_configs() == options.inductor_configs("unet") == {**layout, "epilogue_fusion": False}
    assert options.inductor_configs("vae_decoder") == {**layout, "epilogue_fusion": True, "max_autotune": True}
    check_options(options)
    options.component_inductor_overrides = parse_inductor_config(["vae:max_autotune=true"])
    with pytest.raises(FastDiffError, match=re.escape("unknown component 'vae'")):
        check_options(options)
    options.compile_text_encoders = False
    options.component_inductor_overrides = {"text_encoder": {"max_autotune": True}}
    with pytest.raises(FastDiffError, match="the text encoders are not compiled"):
        check_options(options)


def test_component_defaults_per_gpu_give_way_to_the_users_settings() -> None:
    """The VAE decoder compiles with max-autotune by default on compute capability 9.0 (measured faster on the H200)
    and nowhere else; any max_autotune the user sets, for every component or for the VAE decoder, wins."""
    hopper = (9, 0)
    assert default_component_configs(hopper, {}, {}) == {"vae_decoder": {"max_autotune": True}}
    assert default_component_configs(hopper, {}, {"unet": {"max_autotune": True}}) == {
        "vae_decoder": {"max_autotune": True}
    }
    for other in (None, (8, 0), (8, 9), (10, 0)):
        assert default_component_configs(other, {}, {}) == {}
    assert default_component_configs(hopper, {"max_autotune": False}, {}) == {}
    assert default_component_configs(hopper, {"epilogue_fusion": False}, {}) == {"vae_decoder": {"max_autotune": True}}
    assert default_component_configs(hopper, {}, {"vae_decoder": {"max_autotune": False}}) == {}


@pytest.mark.parametrize(
    ("flags", "vae_decoder", "everywhere"),
    [([], {"max_autotune": True}, False), (["--no-max-autotune"], None, False), (["--max-autotune"], None, True)],
    ids=["default", "no-max-autotune", "max-autotune"],
)
def test_max_autotune_flag_sets_the_component_defaults_aside(
    flags: list[str], vae_decoder: dict | None, everywhere: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What fastdiff-export asks of the compiles on a compute capability 9.0 GPU: the VAE decoder's max-autotune
    default unless --max-autotune or --no-max-autotune says otherwise for every component."""
    from conftest import invoke_cli

    from fastdiff.exporter import cli, options

    asked = []

    def stop(export_options: ExportOptions) -> None:
        asked.append(export_options)
        raise FastDiffError("stopped before the export")

    monkeypatch.setattr(cli, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(options, "check_options", stop)
    args = ["tiny-sd", "--res", "64", "--quantize", "none", *flags]
    assert "error: stopped before the export" in invoke_cli("fastdiff-export", *args).stderr
    assert asked[0].component_inductor_overrides.get("vae_decoder") == vae_decoder
    assert asked[0].max_autotune is everywhere


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("max_autotune", "is not KEY=VALUE"),
        ("=true", "is not KEY=VALUE"),
        ("max_autotun=true", "did you mean max_autotune?"),
        ("no_such_setting_at_all=1", "unknown inductor config 'no_such_setting_at_all'"),
        ("max_autotune=yes", "takes true or false"),
        ("unroll_reductions_threshold=many", "takes a number"),
        ("aot_inductor.package_constants_in_so=true", "is fixed by the artifact format"),
        ("unet:max_autotun=true", "did you mean max_autotune?"),
    ],
)
def test_inductor_config_errors(item: str, message: str) -> None:
    with pytest.raises(FastDiffError, match=re.escape(message)):
        parse_inductor_config([item])


def test_fp8_filter() -> None:
    def linear(i: int, o: int) -> nn.Linear:
        return nn.Linear(i, o)

    ff_in = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"
    assert fp8_filter(linear(320, 1280), ff_in)
    assert fp8_filter(linear(16, 16), "ff.net.0.proj")
    assert not fp8_filter(linear(64, 40), ff_in)  # float8 matmuls need dimensions divisible by 16
    assert not fp8_filter(linear(40, 64), ff_in)
    for other in ("ff.net.2", "attn1.to_qkv", "attn2.to_kv", "attn1.to_out.0", "proj_in", "time_embedding.linear_1"):
        assert not fp8_filter(linear(64, 64), f"down_blocks.1.attentions.0.transformer_blocks.0.{other}")
    assert not fp8_filter(nn.Conv2d(64, 64, 1), ff_in)
    pruned = linear(64, 64)
    with torch.no_grad():
        pruned.weight[3] = 0  # its per-row scale would be 0, and 0 / 0 NaN
    assert not fp8_filter(pruned, ff_in)
    qkv = ff_in.replace("ff.net.0.proj", "attn1.to_qkv")
    assert fp8_filter(linear(64, 64), qkv, ["attn1.to_qkv", "ff.net.2"])
    assert not fp8_filter(linear(64, 64), ff_in, ["attn1.to_qkv"])  # the names replace the default
    assert not fp8_filter(linear(64, 40), qkv, ["attn1.to_qkv"])  # and its limits stay


def test_auto_quantization(tmp_path: Path) -> None:
    """fp8 only where it measured faster: SDXL and PixArt-α in bf16 on GPUs with fp8 matmuls."""
    assert default_quantization("sdxl", "bf16", (9, 0)) == "fp8"
    assert default_quantization("sdxl", "bf16", (8, 9)) == "fp8"
    assert default_quantization("sdxl", "bf16", (8, 0)) == "none"  # A100: no fp8 matmuls
    assert default_quantization("sdxl", "fp32", (9, 0)) == "none"
    assert default_quantization("sdxl", "bf16", None) == "none"
    assert default_quantization("sd", "bf16", (9, 0)) == "none"
    assert default_quantization("pixart", "bf16", (9, 0)) == "fp8"
    assert default_quantization("pixart", "bf16", (8, 0)) == "none"
    assert default_quantization(None, "bf16", (9, 0)) == "none"
    for name in ("tiny-sdxl", "tiny-sd", "tiny-pixart"):  # a preset's family is what its checkpoint says
        assert model_family(name) == model_family(str(PRESETS[name].build())) == PRESETS[name].family
    assert {p.family for p in PRESETS.values()} == set(FAMILIES)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1"}))
    assert model_family(str(other)) is None


def test_int8_on_a_gpu_with_fp8_matmuls_gets_a_note() -> None:
    assert "fp8" in quantization_advice("int8", (9, 0))
    assert quantization_advice("int8", (8, 0)) is None  # A100: int8 is the only quantization there
    assert quantization_advice("int8", None) is None
    assert quantization_advice("fp8", (9, 0)) is None
    assert quantization_advice("none", (9, 0)) is None


def test_auto_quantization_on_an_fp8_gpu(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from fastdiff.exporter.cli import auto_quantization

    hopper = (9, 0)
    assert auto_quantization("tiny-sdxl", None, "bf16", hopper) == "fp8"
    assert auto_quantization("tiny-sd", None, "bf16", hopper) == "none"
    assert auto_quantization("tiny-sdxl", None, "bf16", None) == "none"  # not a CUDA GPU
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now fails, as where it is not installed
    assert auto_quantization("tiny-sdxl", None, "bf16", hopper) == "none"
    assert "fp8 would be faster here: pip install 'fastdiff[quant]'" in capsys.readouterr().err


def test_quantization_without_torchao_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)
    options = ExportOptions("tiny-sdxl", [Resolution(64, 64)], torch.device("cpu"), out=tmp_path / "a")
    options.passes = ["sdpa", "int8"]
    with pytest.raises(FastDiffError, match=re.escape("--quantize int8 needs torchao, which is not installed")):
        export_artifact(options)
    assert list(tmp_path.iterdir()) == []


def _feed_forward(dim: int) -> nn.Module:
    holder = nn.Module()
    holder.ff = FeedForward(dim, activation_fn="geglu")
    return holder


def test_fp8_bounds_the_activation_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """A row of zeros (the empty negative prompt of SDXL is all zeros) must not get a zero scale: 0 / 0 = NaN."""
    torchao_quantization = pytest.importorskip("torchao.quantization")
    configs = []
    monkeypatch.setattr(torchao_quantization, "quantize_", lambda model, config, filter_fn: configs.append(config))
    apply_passes(_feed_forward(64), ["fp8"])
    assert [c.activation_value_lb for c in configs] == [FP8_ACTIVATION_AMAX_MIN]
    assert 0 < FP8_ACTIVATION_AMAX_MIN < torch.finfo(torch.bfloat16).max


def _fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not _fp8_capable(), reason="fp8 needs a CUDA GPU of compute capability >= 8.9")
def test_fp8_unet(tiny_checkpoint: Path) -> None:
    pytest.importorskip("torchao")
    reference = load_unet(tiny_checkpoint).to("cuda", torch.bfloat16)
    model = copy.deepcopy(reference)
    selected = {name for name, m in model.named_modules() if fp8_filter(m, name)}
    inputs = unet_inputs(reference, "cuda", torch.bfloat16)
    expected = run_unet(reference, inputs)
    before = torch._inductor.config.get_config_copy()
    out = run_unet(apply_passes(model, ["fp8"]), inputs)
    assert torch._inductor.config.get_config_copy() == before
    quantized = {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and _is_quantized(m.weight)}
    assert selected and quantized == selected
    assert torch.isfinite(out).all()
    assert 1e-5 < rel_l2(out, expected) < FP8_MAX_REL_L2


@pytest.mark.skipif(not _fp8_capable(), reason="fp8 needs a CUDA GPU of compute capability >= 8.9")
def test_fp8_rows_of_zeros_stay_finite() -> None:
    pytest.importorskip("torchao")
    model = _feed_forward(64).to("cuda", torch.bfloat16)
    apply_passes(model, ["fp8"])
    assert _is_quantized(model.ff.net[0].proj.weight)
    x = torch.randn(2, 77, 64, device="cuda", dtype=torch.bfloat16)
    x[1] = 0
    with torch.no_grad():
        out = model.ff(x)
    assert torch.isfinite(out).all()


def test_apply_passes_rejects_unknown(tiny_checkpoint: Path) -> None:
    model = load_vae(tiny_checkpoint)
    model.set_attn_processor(AttnProcessor())
    with pytest.raises(FastDiffError, match="unknown pass 'bogus'"):
        apply_passes(model, ["sdpa", "bogus"])
    assert _processor_types(model) == {AttnProcessor}  # rejected before any pass ran
    with pytest.raises(FastDiffError, match="passes int8, fp8: one quantization at a time"):
        apply_passes(model, ["int8", "fp8"])
    with pytest.raises(FastDiffError, match="passes int8, int8: one quantization at a time"):
        apply_passes(model, ["int8", "int8"])


def test_apply_no_passes_is_identity(tiny_checkpoint: Path) -> None:
    model = load_vae(tiny_checkpoint)
    assert apply_passes(model, []) is model
    assert _processor_types(model) == {AttnProcessor2_0}


# ---- an int8 export, loaded by the runtime in a process where torchao cannot be imported ----


GENERATE = {"prompt": "a photo of a cat", "num_inference_steps": 3, "guidance_scale": 5.0, "height": 64, "width": 64}

NO_TORCHAO_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["torchao"] = None  # `import torchao` now raises ImportError
    import torch
    from fastdiff.runtime import load_pipeline

    artifact, out, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    pipe = load_pipeline(artifact, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent").images
    torch.save(latents, out)
    loaded = sorted(m for m, v in sys.modules.items() if m.split(".")[0] == "torchao" and v is not None)
    print(json.dumps({"torchao_modules": loaded}))
    """
)


def test_int8_artifact_runs_without_torchao(int8_artifact: Path, tiny_pipeline, tmp_path: Path) -> None:
    manifest = json.loads((int8_artifact / "manifest.json").read_text())
    assert "int8" in manifest["options"]["passes"]
    assert "int8" not in manifest["options"]["vae_passes"]
    assert manifest["text_encoders"] == [] and {"text_encoder", "text_encoder_2"} <= set(manifest["stock"])
    assert "preset" not in manifest["source"] and Path(manifest["source"]["model"]).name == "tiny-sdxl"
    out = tmp_path / "latents.pt"
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCHAO_SCRIPT, str(int8_artifact), str(out), json.dumps(GENERATE)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"torchao_modules": []}
    latents = torch.load(out)
    fp32 = tiny_pipeline(**GENERATE, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert latents.shape == fp32.shape == (1, 4, 8, 8)
    assert torch.isfinite(latents).all()
    assert 1e-5 < rel_l2(latents, fp32) < INT8_ARTIFACT_MAX_REL_L2


def test_int8_weights_are_plain_int8(int8_artifact: Path, tiny_checkpoint: Path) -> None:
    # The linears the int8 pass quantizes and the forward pass uses, after the default passes (sdpa, fuse_qkv):
    # fusing keeps the separate q/k/v linears as unused modules, which the exported program drops.
    unet = apply_passes(load_unet(tiny_checkpoint), ["sdpa", "fuse_qkv"])
    used: set[str] = set()
    for name, m in unet.named_modules():
        if int8_filter(m, name):
            m.register_forward_hook(lambda m, args, out, name=name: used.add(name))
    run_unet(unet, unet_inputs(unet))
    expected = {f"unet.{name}": m for name, m in unet.named_modules() if name in used}
    # 60 linears, less 2 per fused self-attention (4), 1 per cross-attention (4) and the 12 that see one row per
    # image (time and micro-conditioning embeddings, the resnets' time projections)
    assert len(expected) == 36
    with safe_open(int8_artifact / "unet" / "weights.safetensors", framework="pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    int8 = {name for name, dtype in dtypes.items() if "parametrizations" in name and dtype == "I8"}
    assert int8 == {f"{owner}.parametrizations.weight.original0" for owner in expected}
    for owner, linear in expected.items():
        assert shapes[f"{owner}.parametrizations.weight.original0"] == list(linear.weight.shape)
        assert dtypes[f"{owner}.parametrizations.weight.original1"] == "F32"  # the per-row scales
        assert f"{owner}.weight" not in dtypes
    assert {d for name, d in dtypes.items() if "parametrizations" not in name} == {"F32"}
    with safe_open(int8_artifact / "vae_decoder" / "weights.safetensors", framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F32"}
