"""preset -> transform passes -> torch.export + AOTInductor per resolution -> weights, stock parts, manifest."""

from __future__ import annotations

import importlib.metadata
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.export import Dim

from fastdiff.runtime.compat import device_record
from fastdiff.runtime.errors import FastDiffError
from fastdiff.runtime.manifest import CompiledComponent, Manifest, ModelFacts, dtype_name, torch_dtype
from fastdiff.runtime.resolution import Resolution

from .artifact import ArtifactWriter
from .compile import (
    SEED_INDUCTOR_FLAGS,
    compile_package,
    export_program,
    package_constant_names,
    plain_constants,
)
from .passes import apply_passes
from .source import Source, load_source
from .wrappers import UNET_INPUTS, VAE_DECODER_INPUTS, UNetStep, VAEDecode

SDXL_TIME_IDS = [
    "original_height",
    "original_width",
    "crop_top",
    "crop_left",
    "target_height",
    "target_width",
]


@dataclass
class ExportOptions:
    model: str
    resolutions: list[Resolution]
    device: torch.device
    dtype: str = "fp32"
    batch_size: int = 1
    passes: list[str] = field(default_factory=lambda: ["sdpa", "fuse_qkv"])
    vae_passes: list[str] | None = None  # default: the UNet's passes without quantization
    seed_inductor_flags: bool = False
    max_autotune: bool = False
    revision: str | None = None
    vae: str | None = None
    out: Path | None = None
    overwrite: bool = False

    def inductor_configs(self) -> dict:
        configs = dict(SEED_INDUCTOR_FLAGS) if self.seed_inductor_flags else {}
        if self.max_autotune:
            configs["max_autotune"] = True
        return configs

    def default_out(self) -> Path:
        name = self.model.rstrip("/").split("/")[-1] if "/" in self.model else self.model
        res = "_".join(r.key for r in self.resolutions)
        return Path("artifacts") / f"{name}-{res}-{self.dtype}-{self.device.type}"


def log(message: str) -> None:
    print(f"[fastdiff-export] {message}", file=sys.stderr, flush=True)


@contextmanager
def phase(message: str) -> Iterator[None]:
    log(f"{message} ...")
    start = time.perf_counter()
    yield
    log(f"{message}: done in {time.perf_counter() - start:.1f} s")


def export_artifact(options: ExportOptions) -> Path:
    """Export a model to an artifact folder; returns its path. Raises FastDiffError on bad input."""
    if options.batch_size < 1:
        raise FastDiffError(f"--batch-size must be at least 1, got {options.batch_size}")
    if not options.resolutions:
        raise FastDiffError("no resolution given", "pass --res, e.g. --res 1024")
    out = options.out or options.default_out()
    with ArtifactWriter(out, options.overwrite) as writer:  # checks the target before the slow work
        with phase(f"loading {options.model}"):
            source = load_source(options.model, torch_dtype(options.dtype), options.revision, options.vae)
        pipe = source.pipe
        vae_dtype = _vae_dtype(pipe, torch_dtype(options.dtype))
        vae_passes = options.vae_passes
        if vae_passes is None:
            vae_passes = [p for p in options.passes if p not in ("int8", "fp8")]
        with phase(f"applying passes {', '.join(options.passes) or '(none)'}"):
            unet = UNetStep(apply_passes(pipe.unet.to(options.device), options.passes)).eval()
            vae = VAEDecode(apply_passes(pipe.vae.to(options.device, vae_dtype), vae_passes)).eval()

        facts = _model_facts(source)
        unet_packages, unet_weights = {}, {}
        vae_packages, vae_weights = {}, {}
        for res in options.resolutions:
            _check_divisible(res, facts)
            rel = f"unet/{res.key}.pt2"
            unet_weights |= _compile(
                writer,
                rel,
                unet,
                _unet_inputs(pipe, facts, res, options),
                _batch_dims(UNET_INPUTS, 2 * options.batch_size, skip={"timestep"}),
                options,
            )
            unet_packages[res.key] = rel
            rel = f"vae_decoder/{res.key}.pt2"
            latents = torch.randn(
                options.batch_size, *_latent_shape(facts, res), device=options.device, dtype=vae_dtype
            )
            vae_weights |= _compile(
                writer, rel, vae, (latents,), _batch_dims(VAE_DECODER_INPUTS, options.batch_size), options
            )
            vae_packages[res.key] = rel

        with phase("writing weights, text encoders, tokenizers and scheduler"):
            unet_nhwc = writer.save_weights("unet/weights.safetensors", unet_weights)
            vae_nhwc = writer.save_weights("vae_decoder/weights.safetensors", vae_weights)
            stock = _save_stock(writer, pipe)

        manifest = Manifest(
            source=source.record,
            dtype=options.dtype,
            batch_size=options.batch_size,
            options={
                "passes": options.passes,
                "vae_passes": vae_passes,
                "inductor": options.inductor_configs(),
            },
            device=device_record(options.device),
            versions=_versions(options),
            model=facts,
            unet=CompiledComponent(
                dtype=options.dtype,
                weights="unet/weights.safetensors",
                inputs=UNET_INPUTS,
                max_batch=2 * options.batch_size,
                packages=unet_packages,
                channels_last=unet_nhwc,
            ),
            vae_decoder=CompiledComponent(
                dtype=dtype_name(vae_dtype),
                weights="vae_decoder/weights.safetensors",
                inputs=VAE_DECODER_INPUTS,
                max_batch=options.batch_size,
                packages=vae_packages,
                channels_last=vae_nhwc,
            ),
            stock=stock,
        )
        with phase("hashing files and writing the manifest"):
            path = writer.commit(manifest)
    log(f"artifact written to {path}")
    return path


def _compile(writer, rel, module, inputs, dynamic_shapes, options) -> dict[str, torch.Tensor]:
    """Export and compile one package; returns the named tensors it binds at load time."""
    with phase(f"torch.export {rel}"):
        program = export_program(module, inputs, dynamic_shapes)
    with phase(f"AOTInductor compile {rel}"):
        path = compile_package(program, writer.path(rel), options.inductor_configs())
    return plain_constants(program, package_constant_names(path, options.device))


def _batch_dims(names: list[str], max_batch: int, skip: set[str] = frozenset()) -> dict | None:
    if max_batch == 1:
        return None
    batch = Dim("batch", min=1, max=max_batch)
    return {name: None if name in skip else {0: batch} for name in names}


def _latent_shape(facts: ModelFacts, res: Resolution) -> tuple[int, int, int]:
    f = facts.vae_scale_factor
    return facts.latent_channels, res.height // f, res.width // f


def _unet_inputs(pipe, facts: ModelFacts, res: Resolution, options: ExportOptions) -> tuple[torch.Tensor, ...]:
    n, dev, dtype = 2 * options.batch_size, options.device, torch_dtype(options.dtype)
    cross_dim = pipe.unet.config.cross_attention_dim
    return (
        torch.randn(n, *_latent_shape(facts, res), device=dev, dtype=dtype),
        torch.tensor(999.0, device=dev),
        torch.randn(n, facts.text_max_length, cross_dim, device=dev, dtype=dtype),
        torch.randn(n, facts.pooled_dim, device=dev, dtype=dtype),
        torch.tensor([[res.height, res.width, 0, 0, res.height, res.width]] * n, device=dev, dtype=dtype),
    )


def _check_divisible(res: Resolution, facts: ModelFacts) -> None:
    f = facts.vae_scale_factor
    if res.width % f or res.height % f:
        raise FastDiffError(f"resolution {res} is not a multiple of the VAE scale factor {f}")


def _vae_dtype(pipe, dtype: torch.dtype) -> torch.dtype:
    # As diffusers does: a VAE that overflows in fp16 (force_upcast) decodes in fp32.
    return torch.float32 if dtype == torch.float16 and pipe.vae.config.force_upcast else dtype


def _model_facts(source: Source) -> ModelFacts:
    pipe = source.pipe
    vae_config = pipe.vae.config
    scale = 2 ** (len(vae_config.block_out_channels) - 1)
    side = (source.preset and int(source.preset.resolution)) or pipe.unet.config.sample_size * scale
    return ModelFacts(
        family="sdxl",
        latent_channels=pipe.unet.config.in_channels,
        vae_scale_factor=scale,
        scaling_factor=float(vae_config.scaling_factor),
        text_max_length=pipe.tokenizer.model_max_length,
        pooled_dim=pipe.text_encoder_2.config.projection_dim,
        time_ids=SDXL_TIME_IDS,
        force_zeros_for_empty_prompt=bool(pipe.config.force_zeros_for_empty_prompt),
        default_resolution=[side, side],
        default_guidance_scale=5.0,
        latents_mean=getattr(vae_config, "latents_mean", None),
        latents_std=getattr(vae_config, "latents_std", None),
    )


def _save_stock(writer: ArtifactWriter, pipe) -> dict[str, str]:
    for name in ("text_encoder", "text_encoder_2"):
        getattr(pipe, name).save_pretrained(writer.path(name), safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2", "scheduler"):
        getattr(pipe, name).save_pretrained(writer.path(name))
    return {name: name for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")}


def _versions(options: ExportOptions) -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if options.device.type == "cuda" else None,
        "triton": version("triton") if options.device.type == "cuda" else None,
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
        "torchao": version("torchao") if {"int8", "fp8"} & set(options.passes) else None,
        "fastdiff": version("fastdiff"),
    }
