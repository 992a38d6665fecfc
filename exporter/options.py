"""What an export is asked to do, and the checks that need neither the model nor the export machinery."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastdiff.runtime.format import TEXT_PARTS, FastDiffError, Resolution

from .artifact import check_target
from .attention import check_backend_device
from .compile import SEED_INDUCTOR_FLAGS
from .passes import DEFAULT_PASSES, FP8_CAPABILITY, PASSES, QUANTIZATION_PASSES, check_quantization, have_torchao
from .presets import PRESETS

# What an artifact compiles, by the manifest's names: the denoiser (named unet for every family), the VAE decoder
# and the text encoders of any family (TEXT_PARTS).
COMPONENTS = ("unet", "vae_decoder", *sorted({encoder for parts in TEXT_PARTS.values() for _, encoder in parts}))

# Inductor settings that components compile with by default on CUDA GPUs of a compute capability where they measured
# faster (docs/benchmarks.md): on Hopper the VAE decoder with max-autotune; the denoiser keeps the defaults, which
# max-autotune made slower. fastdiff-export applies these, as it resolves --quantize auto; ExportOptions compiles
# with the settings it is given.
COMPONENT_DEFAULTS: dict[tuple[int, int], dict[str, dict[str, Any]]] = {(9, 0): {"vae_decoder": {"max_autotune": True}}}


def default_component_configs(
    capability: tuple[int, int] | None, everywhere: dict[str, Any], component_overrides: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The per-component settings measured faster on a GPU of `capability` (COMPONENT_DEFAULTS; None: not a CUDA
    GPU), less the keys the user set for every component (`everywhere`) or for that component."""
    defaults = {}
    for component, configs in COMPONENT_DEFAULTS.get(capability, {}).items():
        own = component_overrides.get(component, {})
        if kept := {key: value for key, value in configs.items() if key not in everywhere and key not in own}:
            defaults[component] = kept
    return defaults


@dataclass
class ExportOptions:
    model: str  # a preset, a hub id or a checkpoint folder (a Path too)
    resolutions: list[Resolution]
    device: torch.device
    dtype: str = "fp32"
    batch_size: int = 1
    passes: list[str] = field(default_factory=lambda: list(DEFAULT_PASSES))
    vae_passes: list[str] | None = None  # default: the UNet's passes without quantization
    quantize_linears: list[str] | None = None  # name suffixes of the linears to quantize; None: the pass's own filter
    seed_inductor_flags: bool = False
    max_autotune: bool = False
    inductor_overrides: dict[str, Any] = field(default_factory=dict)  # any torch._inductor.config keys, applied last
    # and for one component's packages only (a COMPONENTS name -> settings), after those
    component_inductor_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    revision: str | None = None
    vae: str | None = None
    variant: str | None = None  # weight files to load, e.g. fp16 for *.fp16.safetensors (diffusers' variant)
    out: Path | None = None
    overwrite: bool = False
    compile_text_encoders: bool = True  # False: ship the stock transformers encoders instead
    attention: str = "default"  # SDPA backend compiled in: torch's choice, auto (fastest on the export GPU), or a name
    jobs: int = 1  # packages compiled at once, in worker processes when more than one (exporter/jobs.py)

    def __post_init__(self) -> None:  # paths may be given as Path objects (the CLI passes strings)
        self.model = os.fspath(self.model)
        self.vae = None if self.vae is None else os.fspath(self.vae)
        self.out = None if self.out is None else Path(self.out)

    def inductor_configs(self, component: str | None = None) -> dict:
        """The Inductor settings every package of the export compiles with (recorded in the manifest), or those of
        one component's packages."""
        configs = dict(SEED_INDUCTOR_FLAGS) if self.seed_inductor_flags else {}
        if self.max_autotune:
            configs["max_autotune"] = True
        if "int8" in self.passes:
            configs["force_fuse_int_mm_with_mul"] = True  # int8 matmul and its scales in one kernel (the seed's flag)
        if "channels_last" in self.passes:
            # NHWC activations as well as weights: Inductor never decides that by itself for a graph with a dynamic
            # dimension (the UNet's batch), and its group-norm kernels then read across channels.
            configs["force_layout_optimization"] = True
        own = self.component_inductor_overrides.get(component, {}) if component else {}
        return {**configs, **self.inductor_overrides, **own}

    def default_out(self) -> Path:
        local = self.model not in PRESETS and Path(self.model).is_dir()
        name = os.path.basename(os.path.abspath(self.model)) if local else self.model.rstrip("/").split("/")[-1]
        res = "_".join(r.key for r in self.resolutions)
        return Path("artifacts") / f"{name}-{res}-{self.dtype}-{self.device.type}"


def check_options(options: ExportOptions) -> None:
    """What can be checked before the model is loaded (which can mean a long download) and before the export
    machinery is imported (seconds): batch size, resolutions given, pass names, quantization's needs, the attention
    backend's device, the --out target."""
    if options.batch_size < 1:
        raise FastDiffError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.jobs < 1:
        raise FastDiffError(f"--jobs must be at least 1, got {options.jobs}", "e.g. --jobs 4, or --jobs auto")
    if not options.resolutions:
        raise FastDiffError("no resolution given", "pass --res, e.g. --res 1024")
    check_backend_device(options.attention, options.device)
    for component in options.component_inductor_overrides:
        if component not in COMPONENTS:
            raise FastDiffError(
                f"--inductor-config {component}:...: unknown component {component!r}",
                f"prefix a setting with one of {', '.join(COMPONENTS)} (e.g. vae_decoder:max_autotune=true), or with "
                "nothing for every component",
            )
        if component.startswith("text_encoder") and not options.compile_text_encoders:
            raise FastDiffError(
                f"--inductor-config {component}:...: the text encoders are not compiled (--text-encoders stock)",
                "drop the setting, or compile the text encoders",
            )
    for names in (options.passes, options.vae_passes or []):
        unknown = [n for n in names if n not in PASSES]
        if unknown:
            raise FastDiffError(f"unknown pass {unknown[0]!r}", f"choose from {', '.join(PASSES)}")
    dev = torch.device(options.device)
    capability = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
    check_quantization(options.passes)  # as apply_passes will, but before the model loads
    quantization = [p for p in options.passes if p in QUANTIZATION_PASSES]
    if options.quantize_linears is not None and not quantization:
        raise FastDiffError(
            "--quantize-linears names linears to quantize, but no quantization is on",
            "add --quantize int8 or fp8 (--quantize auto picks none for most models and devices)",
        )
    if quantization and not have_torchao():
        raise FastDiffError(
            f"--quantize {quantization[0]} needs torchao, which is not installed",
            "pip install 'fastdiff[quant]' (or torchao), or export with --quantize none",
        )
    if "fp8" in options.passes and (capability is None or capability < FP8_CAPABILITY):
        have = f"compute capability {capability[0]}.{capability[1]}" if capability else dev.type
        raise FastDiffError(
            f"--quantize fp8 needs a CUDA GPU of compute capability 8.9 or newer, not {have}",
            "use --quantize int8 or none, or export on such a GPU",
        )
    check_target(Path(options.out or options.default_out()).absolute(), options.overwrite)
