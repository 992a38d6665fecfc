"""preset -> transform passes -> torch.export + AOTInductor per resolution -> weights, stock parts, manifest."""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from fastdiff.runtime.format import (
    PENULTIMATE_CLIP_FAMILIES,
    TEXT_PARTS,
    CompiledComponent,
    FastDiffError,
    Manifest,
    ModelFacts,
    Resolution,
    device_record,
    dtype_name,
    micro_conditioning,
    package_path,
    torch_dtype,
    weights_path,
)

from .artifact import ArtifactWriter
from .attention import attention_backend, choose_backend
from .compile import check_int8_rows, export_program, package_constant_names, plain_constants
from .jobs import PackageCompiler, package_of
from .options import ExportOptions, check_options
from .passes import QUANTIZATION_PASSES, apply_passes
from .progress import log, phase
from .source import Source, compiled_architecture, load_source
from .wrappers import (
    T5_ENCODER_INPUTS,
    TEXT_ENCODER_INPUTS,
    VAE_DECODER_INPUTS,
    CLIPTextEncode,
    PixArtMicroConditionedStep,
    PixArtStep,
    SDXLUNetStep,
    T5TextEncode,
    UNetStep,
    VAEDecode,
)

SDXL_TIME_IDS = [
    "original_height",
    "original_width",
    "crop_top",
    "crop_left",
    "target_height",
    "target_width",
]


def export_artifact(options: ExportOptions) -> Path:
    """Export a model to an artifact folder; returns its path. Raises FastDiffError on bad input."""
    check_options(options)
    out = options.out or options.default_out()
    with ArtifactWriter(out, options.overwrite) as writer:  # checks the target before the slow work
        with phase(f"loading {options.model}"):
            source = load_source(
                options.model, torch_dtype(options.dtype), options.revision, options.vae, options.variant
            )
        pipe = source.pipe
        facts = model_facts(source)
        compiled = {"unet", "vae_decoder", *(e for _, e in TEXT_PARTS[source.family] if options.compile_text_encoders)}
        if unused := sorted(set(options.component_inductor_overrides) - compiled):
            raise FastDiffError(
                f"--inductor-config {unused[0]}:...: {options.model} has no {unused[0]} to compile",
                f"its components are {', '.join(sorted(compiled))}",
            )
        for res in options.resolutions:
            _check_divisible(res, facts, getattr(source.denoiser.config, "patch_size", None) or 1)
        vae_dtype, vae_passes = vae_dtype_of(pipe, options.dtype), vae_passes_of(options)
        with phase(f"applying passes {', '.join(options.passes) or '(none)'}"):
            unet, vae = denoiser_and_decoder(source, options)

        n, dev = options.batch_size, options.device
        unet_cases = {res.key: _unet_inputs(source, facts, res, options) for res in options.resolutions}
        vae_cases = {
            res.key: (torch.randn(n, *facts.latent_shape(res), device=dev, dtype=vae_dtype),)
            for res in options.resolutions
        }
        attention: dict[str, str] = {}  # package -> the SDPA backend compiled into it
        # Each package compiles as soon as its program is exported (inline, or in a worker with --jobs > 1); the
        # weights are written once a component's packages are done, which says which constants they bind.
        with PackageCompiler(options.jobs, writer.root / "programs.tmp") as compiler:
            submit = functools.partial(_export_component, compiler, writer, options=options, attention=attention)
            pending = [
                submit("unet", unet, unet_cases, unet.inputs, 2 * n),
                submit("vae_decoder", vae, vae_cases, VAE_DECODER_INPUTS, n, dtype=vae_dtype),
            ]
            if options.compile_text_encoders:
                ids = torch.zeros(n, facts.text_max_length, dtype=torch.long, device=dev)
                for _, name in TEXT_PARTS[source.family]:
                    encoder = text_encoder(source, name, options)
                    if source.family == "pixart":
                        inputs, example = T5_ENCODER_INPUTS, (ids, torch.ones_like(ids))
                    else:
                        inputs, example = TEXT_ENCODER_INPUTS, (ids,)
                    pending.append(submit(name, encoder, {str(facts.text_max_length): example}, inputs, n))
            unet_component, vae_component, *text_encoders = (
                _finish_component(writer, component, options.device) for component in pending
            )

        with phase("writing tokenizers, scheduler" + ("" if text_encoders else " and stock text encoders")):
            stock = save_stock(writer, pipe, facts, with_text_encoders=not text_encoders)

        manifest = Manifest(
            source=source.record,
            dtype=options.dtype,
            batch_size=options.batch_size,
            options={
                "passes": options.passes,
                "vae_passes": vae_passes,
                "quantize_linears": options.quantize_linears,
                **_inductor_record(options),
                "text_encoders": "compiled" if text_encoders else "stock",
                "attention": attention,
                "architecture": compiled_architecture(source, bool(text_encoders)),
            },
            device=device_record(options.device),
            versions=export_versions(options),
            model=facts,
            unet=unet_component,
            vae_decoder=vae_component,
            text_encoders=text_encoders,
            stock=stock,
        )
        with phase("hashing files and writing the manifest"):
            path = writer.commit(manifest)
    log(f"artifact written to {path}")
    return path


def _inductor_record(options: ExportOptions) -> dict[str, Any]:
    """The manifest's record of the Inductor settings: every package's, and each component's where it has its own."""
    record: dict[str, Any] = {"inductor": options.inductor_configs()}
    if options.component_inductor_overrides:
        record["inductor_by_component"] = {c: options.inductor_configs(c) for c in options.component_inductor_overrides}
    return record


def vae_passes_of(options: ExportOptions) -> list[str]:
    """The VAE decoder's passes: as asked, else the denoiser's without quantization."""
    if options.vae_passes is not None:
        return options.vae_passes
    return [p for p in options.passes if p not in QUANTIZATION_PASSES]


def denoiser_and_decoder(source: Source, options: ExportOptions) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The denoiser step and the VAE decoder as the export compiles them: after the passes, on the export device."""
    pipe = source.pipe
    unet = step_wrapper(source)(
        apply_passes(source.denoiser.to(options.device), options.passes, options.quantize_linears)
    ).eval()
    vae_dtype = vae_dtype_of(pipe, options.dtype)
    vae = pipe.vae.to(options.device)
    if {p.dtype for p in vae.parameters()} != {vae_dtype}:  # diffusers warns at any .to(dtype), even a no-op
        vae = vae.to(vae_dtype)
    return unet, VAEDecode(apply_passes(vae, vae_passes_of(options))).eval()


def text_encoder(source: Source, name: str, options: ExportOptions) -> torch.nn.Module:
    """The text encoder `name` (a TEXT_PARTS encoder) as the export compiles it."""
    model = getattr(source.pipe, name).to(options.device, torch_dtype(options.dtype))
    if source.family == "pixart":
        return T5TextEncode(model)
    return CLIPTextEncode(model, penultimate=source.family in PENULTIMATE_CLIP_FAMILIES)


@dataclass
class PendingComponent:
    """A component whose packages are compiling, and what its weights and manifest entry need once they are done."""

    name: str
    packages: dict[str, tuple[str, torch.export.ExportedProgram, Future[Path]]]  # case -> (package, program, compile)
    inputs: list[str]
    max_batch: int
    dtype: torch.dtype
    input_shapes: dict[str, list[list[int | None]]]  # case -> each input's shape, None for the dynamic batch
    input_dtypes: list[str]


def _export_component(
    compiler: PackageCompiler,
    writer: ArtifactWriter,
    name: str,
    module: torch.nn.Module,
    cases: dict[str, tuple[torch.Tensor, ...]],
    input_names: list[str],
    max_batch: int,
    options: ExportOptions,
    attention: dict[str, str],
    dtype: torch.dtype | None = None,
) -> PendingComponent:
    """Export `module` once per case (a resolution or a sequence length, examples at the largest batch), with a
    dynamic batch dimension up to `max_batch`, and hand each program to the compiler. Records in `attention` the SDPA
    backend each package is compiled with."""
    packages, shapes = {}, {}
    dynamic = _batch_dims(input_names, max_batch, skip={"timestep"})
    for key, inputs in cases.items():
        shapes[key] = [
            [None if dynamic and dynamic[name] and dim == 0 else size for dim, size in enumerate(t.shape)]
            for name, t in zip(input_names, inputs, strict=True)
        ]
        rel = package_path(name, key)
        backend, seconds, note = choose_backend(options.attention, module, inputs, options.device)
        if seconds:
            timings = ", ".join(f"{b} {s * 1e3:.2f} ms" for b, s in sorted(seconds.items(), key=lambda kv: kv[1]))
            log(f"attention for {rel}: {backend} ({timings} per call of the module)")
        if note:
            log(f"attention for {rel}: {note}")
        attention[rel] = backend
        with phase(f"torch.export {rel}"), attention_backend(backend):
            program = export_program(module, inputs, dynamic)
        check_int8_rows(program, options.device, rel)
        configs = options.inductor_configs(name)
        compiling = compiler.compile(program, writer.path(rel), configs, options.device, backend, rel, dynamic)
        packages[key] = (rel, program, compiling)
    dtypes = [str(t.dtype).removeprefix("torch.") for t in next(iter(cases.values()))]
    return PendingComponent(name, packages, input_names, max_batch, dtype or torch_dtype(options.dtype), shapes, dtypes)


def _finish_component(writer: ArtifactWriter, component: PendingComponent, device: torch.device) -> CompiledComponent:
    """Once its packages are compiled: the weights they all bind, written to one safetensors file."""
    weights = {}
    for rel, program, compiling in component.packages.values():
        weights |= plain_constants(program, package_constant_names(package_of(compiling, rel), device))
    weights_rel = weights_path(component.name)
    nhwc = writer.save_weights(weights_rel, weights)
    return CompiledComponent(
        dtype=dtype_name(component.dtype),
        weights=weights_rel,
        inputs=component.inputs,
        max_batch=component.max_batch,
        packages={key: rel for key, (rel, _, _) in component.packages.items()},
        channels_last=nhwc,
        input_shapes=component.input_shapes,
        input_dtypes=component.input_dtypes,
    )


def _batch_dims(names: list[str], max_batch: int, skip: set[str] = frozenset()) -> dict | None:
    if max_batch == 1:
        return None
    batch = Dim("batch", min=1, max=max_batch)
    return {name: None if name in skip else {0: batch} for name in names}


def step_wrapper(source: Source) -> type[torch.nn.Module]:
    if source.family == "pixart":
        # As diffusers' pipeline decides: the 1024² models (sample size 128) take the micro-conditioning.
        return PixArtMicroConditionedStep if source.denoiser.config.sample_size == 128 else PixArtStep
    return SDXLUNetStep if source.family == "sdxl" else UNetStep


def _unet_inputs(
    source: Source, facts: ModelFacts, res: Resolution, options: ExportOptions
) -> tuple[torch.Tensor, ...]:
    """Example inputs of the denoiser step at the largest batch (2 x batch size, for CFG)."""
    n, dev, dtype = 2 * options.batch_size, options.device, torch_dtype(options.dtype)
    config = source.denoiser.config
    text_dim = config.caption_channels if facts.family == "pixart" else config.cross_attention_dim
    inputs = (
        torch.randn(n, *facts.latent_shape(res), device=dev, dtype=dtype),
        torch.tensor(999.0, device=dev),
        torch.randn(n, facts.text_max_length, text_dim, device=dev, dtype=dtype),
    )
    micro = {name: t.to(dev) for name, t in micro_conditioning(res, n, dtype).items()}  # as the runtime makes it
    if facts.family == "sdxl":
        return (*inputs, torch.randn(n, facts.pooled_dim, device=dev, dtype=dtype), micro["time_ids"])
    if facts.family == "pixart":
        mask = torch.ones(n, facts.text_max_length, dtype=torch.long, device=dev)
        if step_wrapper(source) is PixArtStep:
            return (*inputs, mask)
        return (*inputs, mask, micro["resolution"], micro["aspect_ratio"])
    return inputs


def _check_divisible(res: Resolution, facts: ModelFacts, patch_size: int) -> None:
    """Sides must be whole latents, and for a transformer denoiser whole patches of latents (PixArt-α: 2x2)."""
    f = facts.vae_scale_factor
    if res.width % f or res.height % f:
        raise FastDiffError(
            f"resolution {res} is not a multiple of the VAE scale factor {f}",
            f"give width and height as multiples of {f}",
        )
    if res.width % (f * patch_size) or res.height % (f * patch_size):
        raise FastDiffError(
            f"resolution {res} is not a multiple of {f * patch_size}: the transformer takes {patch_size}x{patch_size}"
            f" patches of the latents, which are 1/{f} of the image's size",
            f"use sides that are multiples of {f * patch_size}",
        )


def vae_dtype_of(pipe, dtype: str) -> torch.dtype:
    """The VAE decoder's precision for an export in `dtype`: as diffusers does, a VAE that overflows in fp16
    (force_upcast) decodes in fp32."""
    dtype = torch_dtype(dtype)
    return torch.float32 if dtype == torch.float16 and pipe.vae.config.force_upcast else dtype


# PixArtAlphaPipeline's max_sequence_length: T5 prompts are padded or truncated to this many tokens.
PIXART_TEXT_LENGTH = 120


def model_facts(source: Source) -> ModelFacts:
    pipe = source.pipe
    vae_config = pipe.vae.config
    scale = 2 ** (len(vae_config.block_out_channels) - 1)
    side = (source.preset and int(source.preset.resolution)) or source.denoiser.config.sample_size * scale
    sdxl = source.family == "sdxl"
    pixart = source.family == "pixart"
    return ModelFacts(
        family=source.family,
        latent_channels=source.denoiser.config.in_channels,
        vae_scale_factor=scale,
        scaling_factor=float(vae_config.scaling_factor),
        text_max_length=PIXART_TEXT_LENGTH if pixart else pipe.tokenizer.model_max_length,
        pooled_dim=pipe.text_encoder_2.config.projection_dim if sdxl else None,
        time_ids=SDXL_TIME_IDS if sdxl else None,
        force_zeros_for_empty_prompt=bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)),
        default_resolution=[side, side],
        default_guidance_scale=inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default,
        latents_mean=getattr(vae_config, "latents_mean", None),
        latents_std=getattr(vae_config, "latents_std", None),
        # diffusers' PixArt-α pipeline without caption cleaning (which needs bs4 and ftfy): lowercase and strip.
        lowercase_prompts=pixart,
    )


def save_stock(writer: ArtifactWriter, pipe, facts: ModelFacts, with_text_encoders: bool) -> dict[str, str]:
    """Tokenizers (as tokenizer.json with the padding and truncation built in, so the runtime needs only the
    `tokenizers` library), the scheduler config, and, unless they were compiled, the stock text encoders."""
    names = ["scheduler"]
    pipe.scheduler.save_pretrained(writer.path("scheduler"))
    for name, encoder in TEXT_PARTS[facts.family]:
        tokenizer = getattr(pipe, name)
        tokenizer.save_pretrained(writer.path(name))
        _save_padded_tokenizer_json(tokenizer, facts.text_max_length, writer.path(f"{name}/tokenizer.json"))
        names.append(name)
        if with_text_encoders:
            getattr(pipe, encoder).save_pretrained(writer.path(encoder), safe_serialization=True)
            names.append(encoder)
    return {name: name for name in names}


def _save_padded_tokenizer_json(tokenizer, max_length: int, path: Path) -> None:
    from transformers.convert_slow_tokenizer import convert_slow_tokenizer

    backend = tokenizer.backend_tokenizer if getattr(tokenizer, "is_fast", False) else convert_slow_tokenizer(tokenizer)
    backend = backend.__class__.from_str(backend.to_str())  # a copy: the pipeline's tokenizer stays as it was
    backend.enable_truncation(max_length)
    backend.enable_padding(length=max_length, pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    backend.save(str(path))


def export_versions(options: ExportOptions) -> dict[str, str | None]:
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
        "torchao": version("torchao") if set(QUANTIZATION_PASSES) & set(options.passes) else None,
        "fastdiff": version("fastdiff"),
    }
