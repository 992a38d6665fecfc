"""Export passes: each one a function from module to module, switched on by name and testable alone.

They are the optimizations of "Diffusion, Fast" (reduced precision, SDPA, fused QKV projections, channels_last,
1x1 conv -> linear, torchao dynamic quantization), applied before torch.export so the compiled code inherits them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fastdiff.runtime.format import FastDiffError


def sdpa(model: nn.Module) -> nn.Module:
    """Attention through torch's scaled_dot_product_attention (flash / memory-efficient kernels)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    model.set_attn_processor(AttnProcessor2_0())
    return model


def fuse_qkv(model: nn.Module) -> nn.Module:
    """One matmul for q, k and v in self-attention (k and v in cross-attention), with SDPA."""
    model.fuse_qkv_projections()
    return model


def channels_last(model: nn.Module) -> nn.Module:
    """NHWC memory layout for convolution weights, so Inductor picks channels_last convolution kernels."""
    return model.to(memory_format=torch.channels_last)


class Conv1x1AsLinear(nn.Module):
    """A 1x1 convolution computed as a linear layer over the channel dimension (so it can be quantized)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
        self.linear.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.reshape(conv.out_channels, conv.in_channels))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _is_pointwise(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


def conv1x1_to_linear(model: nn.Module) -> nn.Module:
    """Replace every pointwise nn.Conv2d by an equivalent linear layer."""
    for name, child in list(model.named_children()):
        if _is_pointwise(child):
            setattr(model, name, Conv1x1AsLinear(child))
        else:
            conv1x1_to_linear(child)
    return model


# The seed's SDXL filter ("Diffusion, Fast", utils/pipeline_utils.py): linears of these (in, out) shapes lost time
# to int8 dynamic quantization on an A100 and stay in the compute dtype.
SEED_INT8_SKIP_SHAPES = frozenset(
    {
        (1280, 640), (1920, 1280), (1920, 640), (2048, 1280), (2048, 2560), (2560, 1280), (256, 128),
        (2816, 1280), (320, 640), (512, 1536), (512, 256), (512, 512), (640, 1280), (640, 1920),
        (640, 320), (640, 5120), (640, 640), (960, 320), (960, 640),
    }
)  # fmt: skip


# Linears that take one row per image (the timestep and micro-conditioning embeddings and their projections into
# each resnet): an int8 matmul on CUDA (cuBLAS, through aten._int_mm) needs more than 16 rows, and they are a
# negligible share of the step anyway.
PER_IMAGE_LINEARS = frozenset({"time_embedding", "add_embedding", "class_embedding", "time_emb_proj", "adaln_single"})


def named(fqn: str, names: Sequence[str]) -> bool:
    """`fqn` is one of `names` or ends with one at a module boundary (attn1.to_qkv: every block's fused projection)."""
    return any(fqn == name or fqn.endswith("." + name) for name in names)


def int8_filter(module: nn.Module, fqn: str, linears: Sequence[str] | None = None) -> bool:
    """The seed's shape filter, or the linears named (`linears`: name suffixes); never the per-image ones."""
    return (
        isinstance(module, nn.Linear)
        and module.in_features > 16
        and (
            named(fqn, linears)
            if linears is not None
            else (module.in_features, module.out_features) not in SEED_INT8_SKIP_SHAPES
        )
        and PER_IMAGE_LINEARS.isdisjoint(fqn.split("."))
    )


# Dynamic fp8 pays only where a matmul is large and its input cheap to quantize: measured per linear of the SDXL
# UNet (bench/probe_fp8.py, docs/benchmarks.md), only the feed-forward input projections gain; elsewhere the per-row
# quantization of the input costs more than the faster matmul saves.
FP8_CAPABILITY = (8, 9)  # float8 matmuls: Ada, Hopper and newer
FP8_LINEARS = ("ff.net.0.proj",)  # diffusers' FeedForward input projection (GEGLU / GELU), in SDXL, SD and PixArt
FP8_ACTIVATION_AMAX_MIN = 1e-12  # a row of zeros (SDXL's negative prompt when empty) would get scale 0: 0 / 0 = NaN


def fp8_filter(module: nn.Module, fqn: str, linears: Sequence[str] | None = None) -> bool:
    """The feed-forward input projections, or the linears named (`linears`: name suffixes), where fp8 can run them."""
    return (
        isinstance(module, nn.Linear)
        and named(fqn, FP8_LINEARS if linears is None else linears)
        and module.in_features % 16 == 0  # float8 matmuls need both dimensions divisible by 16
        and module.out_features % 16 == 0
        and bool(module.weight.detach().abs().amax(dim=1).gt(0).all())  # a zero row's scale would be 0 (NaN), as above
    )


# The quantization passes keep torchao from setting its recommended Inductor flags (set_inductor_config=False): those
# are process-wide and turned coordinate-descent tuning on for every later compile (the VAE's too: minutes more). The
# compile flags of an export are ExportOptions.inductor_configs, recorded in the manifest.


def int8_dynamic(model: nn.Module, linears: Sequence[str] | None = None) -> nn.Module:
    """torchao dynamic int8 activation x int8 weight quantization of the linears the filter keeps (`linears`: name
    suffixes of the ones to quantize instead of the seed's shape filter)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    keep = functools.partial(int8_filter, linears=linears)
    _check_named(model, linears, keep, "int8 leaves linears that see one row per image or 16 inputs or fewer")
    config = Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    quantize_(model, config, filter_fn=keep)
    return model


def fp8_dynamic(model: nn.Module, linears: Sequence[str] | None = None) -> nn.Module:
    """torchao dynamic float8 (e4m3, per-row scales) quantization of the linears the filter keeps (`linears`: name
    suffixes of the ones to quantize instead of the feed-forward input projections); needs compute capability >= 8.9."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    keep = functools.partial(fp8_filter, linears=linears)
    _check_named(model, linears, keep, "fp8 needs dimensions divisible by 16 and no all-zero weight row")
    config = Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow(), activation_value_lb=FP8_ACTIVATION_AMAX_MIN, set_inductor_config=False
    )
    quantize_(model, config, filter_fn=keep)
    return model


def _check_named(
    model: nn.Module, linears: Sequence[str] | None, keep: Callable[[nn.Module, str], bool], rule: str
) -> None:
    """Each name must match a linear the model still calls, and the quantization filter (`keep`) must take at least
    one of them: else the option would quantize nothing for that name, silently."""
    if linears is None:
        return
    if not linears:
        raise FastDiffError("--quantize-linears names no linear", "give name suffixes, e.g. ff.net.0.proj,attn1.to_qkv")
    unused = fused_away(model)
    live = {fqn: m for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and fqn not in unused}
    for name in linears:
        matches = [fqn for fqn in live if named(fqn, [name])]
        if not matches:
            fused = " (the fuse_qkv pass replaced it)" if any(named(fqn, [name]) for fqn in unused) else ""
            raise FastDiffError(
                f"--quantize-linears: no linear the {type(model).__name__} runs is named {name!r}{fused}",
                "give suffixes of its linears' names, e.g. ff.net.0.proj, ff.net.2 or attn1.to_qkv (the fused "
                "projection the fuse_qkv pass makes)",
            )
        if not any(keep(live[fqn], fqn) for fqn in matches):
            raise FastDiffError(
                f"--quantize-linears: none of the linears named {name!r} can be quantized: {rule}",
                "name other linears, or drop this one",
            )


def fused_away(model: nn.Module) -> set[str]:
    """Linears that diffusers' fuse_projections replaced (to_q, to_k, to_v by to_qkv; to_k, to_v by to_kv; the added
    projections by to_added_qkv) and keeps as unused modules."""
    replaced = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v")}
    replaced["to_added_qkv"] = ("add_q_proj", "add_k_proj", "add_v_proj")
    unused = set()
    for fqn, module in model.named_modules():
        if getattr(module, "fused_projections", False):
            for fused, originals in replaced.items():
                if isinstance(getattr(module, fused, None), nn.Linear):
                    unused |= {f"{fqn}.{name}" if fqn else name for name in originals}
    return unused


def have_torchao() -> bool:
    try:
        import torchao  # noqa: F401
    except ImportError:
        return False
    return True


# Families whose bf16 export fp8 made faster, measured beside bf16 in one process (docs/benchmarks.md). Not SD 1.5:
# its matmuls are a quarter of its step, and fp8 gained nothing there.
FP8_FAMILIES = {"sdxl", "pixart"}


def default_quantization(family: str | None, dtype: str, capability: tuple[int, int] | None) -> str:
    """What measured fastest at an acceptable error for a model family in `dtype` on a CUDA GPU of this compute
    capability (None: not a CUDA GPU): fp8 where fp8 matmuls exist, for the families it made faster in bf16
    (FP8_FAMILIES); no quantization elsewhere, where it was slower or is unmeasured, nor for an fp32 export, which
    asks for precision. int8 is never the default: on Hopper it made the SDXL step slower than bf16 (cuBLAS's int8
    matmuls run Ampere kernels there), and it is unmeasured on GPUs without fp8 matmuls."""
    fp8_matmuls = capability is not None and capability >= FP8_CAPABILITY
    return "fp8" if family in FP8_FAMILIES and dtype == "bf16" and fp8_matmuls else "none"


def quantization_advice(choice: str, capability: tuple[int, int] | None) -> str | None:
    """A note for an explicit quantization choice that measured slower than another on a GPU like this one."""
    if choice == "int8" and capability is not None and capability >= FP8_CAPABILITY:
        return (
            "int8 made the SDXL UNet step 24 % slower than bf16 on an H200 (cuBLAS runs its int8 matmuls with Ampere "
            "kernels there); on GPUs with fp8 matmuls --quantize fp8 (auto's choice for SDXL) is the faster one"
        )
    return None


# channels_last: with NCHW weights, cuDNN converts every convolution's input and output to NHWC and back (9% of an
# SDXL UNet step); with NHWC weights there are none.
DEFAULT_PASSES = ["sdpa", "fuse_qkv", "channels_last"]

PASSES: dict[str, Callable[..., nn.Module]] = {
    "sdpa": sdpa,
    "fuse_qkv": fuse_qkv,
    "conv1x1_to_linear": conv1x1_to_linear,
    "channels_last": channels_last,
    "int8": int8_dynamic,
    "fp8": fp8_dynamic,
}


QUANTIZATION_PASSES = ("int8", "fp8")


def check_quantization(names: list[str]) -> None:
    """At most one quantization pass (named once) among `names`."""
    quantization = [n for n in names if n in QUANTIZATION_PASSES]
    if len(quantization) > 1:
        raise FastDiffError(f"passes {', '.join(quantization)}: one quantization at a time", "keep one of them")


def apply_passes(model: nn.Module, names: list[str], quantize_linears: Sequence[str] | None = None) -> nn.Module:
    """Apply the named passes in the canonical order (quantization last, after the layout passes); a quantization
    pass takes `quantize_linears` (name suffixes of the linears to quantize; None: its own filter)."""
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise FastDiffError(f"unknown pass {unknown[0]!r}", f"choose from {', '.join(PASSES)}")
    check_quantization(names)
    for name in PASSES:
        if name in QUANTIZATION_PASSES and name in names:
            model = PASSES[name](model, quantize_linears)
        elif name in names:
            model = PASSES[name](model)
    return model
