"""`fastdiff-export`: compile a diffusion checkpoint into an artifact folder."""

from __future__ import annotations

import click

from fastdiff.runtime.format import FastDiffError, clean_errors, exit_interrupted, import_torch, parse_resolution

INTERRUPTED = "interrupted: nothing was written"

try:  # torch and its friends take seconds to import, before any command runs: a Ctrl-C there ends it as one later does
    import_torch()
    import torch

    from fastdiff.runtime.format import resolve_device

    from .attention import CHOICES as ATTENTION_CHOICES
    from .passes import (
        DEFAULT_PASSES,
        PASSES,
        QUANTIZATION_PASSES,
        default_quantization,
        have_torchao,
        quantization_advice,
    )
    from .presets import PRESETS, check_model, check_vae
    from .progress import log
except KeyboardInterrupt:
    exit_interrupted(INTERRUPTED)

LAYOUT_PASSES = [p for p in PASSES if p not in QUANTIZATION_PASSES]


def _presets_help() -> str:
    return "; ".join(f"{p.name}: {p.about}" for p in PRESETS.values())


def _names(option: str | None) -> list[str] | None:
    return None if option is None else [name.strip() for name in option.split(",") if name.strip()]


def auto_quantization(model: str, revision: str | None, dtype: str, capability: tuple[int, int] | None) -> str:
    """--quantize auto: passes.default_quantization for this model and GPU (None: not a CUDA GPU), if torchao is there
    to do it."""
    family = None
    if capability:
        from .source import model_family  # imports diffusers' pipelines (seconds)

        family = model_family(model, revision)  # reads the model's config only
    choice = default_quantization(family, dtype, capability)
    if choice != "none" and not have_torchao():
        log(f"--quantize auto: none ({choice} would be faster here: pip install 'fastdiff[quant]')")
        return "none"
    log(f"--quantize auto: {choice}")
    return choice


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    epilog=f"Presets: {_presets_help()}.",
)
@click.argument("model")
@click.option(
    "--res",
    "resolutions",
    multiple=True,
    metavar="SIZE|WxH",
    help="Resolution to compile, width x height (repeatable). Default: the model's (e.g. 1024 SDXL, 512 SD 1.5).",
)
@click.option("--out", type=click.Path(), help="Artifact folder. Default: artifacts/<model>-<res>-<dtype>-<device>.")
@click.option("--device", help="cuda or cpu; the artifact runs only on this kind. Default: cuda if present.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), help="Default: bf16 on cuda, fp32 on cpu.")
@click.option("--batch-size", default=1, show_default=True, type=int, help="Most images per UNet call.")
@click.option(
    "--passes",
    default=",".join(DEFAULT_PASSES),
    show_default=True,
    help=f"Comma-separated export passes, from: {', '.join(LAYOUT_PASSES)}; 'none' for none.",
)
@click.option(
    "--quantize",
    type=click.Choice(["auto", "none", *QUANTIZATION_PASSES]),
    default="auto",
    show_default=True,
    help="torchao dynamic quantization of the denoiser's linears (fp8: its feed-forward input projections; needs "
    "compute capability >= 8.9). auto: what measured fastest for the model on the export GPU: fp8 for SDXL and "
    "PixArt-α in bf16 on such GPUs, else none.",
)
@click.option(
    "--quantize-linears",
    metavar="NAMES",
    help="Comma-separated name suffixes of the denoiser's linears to quantize (e.g. ff.net.0.proj,attn1.to_qkv) "
    "instead of --quantize's own choice; linears that see one row per image stay unquantized for int8.",
)
@click.option(
    "--max-autotune/--no-max-autotune",
    default=None,
    help="Inductor max-autotune for every component. Default: off, but for the VAE decoder on GPUs of compute "
    "capability 9.0 (measured faster there); --no-max-autotune turns that off too.",
)
@click.option(
    "--inductor-config",
    "inductor_config",
    multiple=True,
    metavar="[COMPONENT:]KEY=VALUE",
    help="Any torch._inductor.config setting for the compiles, applied last (repeatable), e.g. "
    "max_autotune_conv_backends=ATEN to autotune only the matmuls; with a component (unet, vae_decoder, "
    "text_encoder, text_encoder_2) for its packages only, e.g. vae_decoder:max_autotune=false (on GPUs of compute "
    "capability 9.0 the VAE decoder compiles with max-autotune by default: measured faster there).",
)
@click.option(
    "--seed-flags/--no-seed-flags",
    default=False,
    show_default=True,
    help="The seed's Inductor flags (conv_1x1_as_mm, coordinate descent tuning, no epilogue fusion).",
)
@click.option(
    "--text-encoders",
    type=click.Choice(["compiled", "stock"]),
    default="compiled",
    show_default=True,
    help="Compile the text encoders (CLIP, or PixArt-α's T5) too, or ship the stock ones (the runtime then needs "
    "transformers).",
)
@click.option(
    "--attention",
    type=click.Choice(ATTENTION_CHOICES),
    default="default",
    show_default=True,
    help="SDPA kernel compiled in. default: torch's own choice; auto: the fastest on the export GPU for the model's "
    "attention shapes (torch's choice on cpu); or one backend by name, used wherever it can run the attention (not "
    "flash or cudnn at the VAE's head size of 512: torch's choice there, noted in the log).",
)
@click.option(
    "--jobs",
    default="1",
    show_default=True,
    metavar="N|auto",
    help="Packages to compile at once, each in a worker process when N > 1: a compile is mostly single-threaded, so "
    "several resolutions and components compile in about the time of the slowest. Each worker holds its program's "
    "weights (on the export device too). auto: one per four cores, at most four.",
)
@click.option("--revision", help="Hub revision (branch, tag or commit) of MODEL.")
@click.option("--vae", help="A VAE (hub id or folder) that replaces the checkpoint's own.")
@click.option(
    "--variant", help="Load MODEL's weight files of this variant, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing artifact at --out once the new one is complete.")
@click.option(
    "--packages-from",
    metavar="ART",
    help="Reuse the compiled packages of the artifact ART (of a checkpoint of MODEL's architecture) instead of "
    "compiling: MODEL's weights go through ART's passes and quantization, and only they, the tokenizers, the "
    "scheduler and the manifest are written (a fine-tune in seconds to a minute). ART fixes the options that shape "
    "the packages (--res, --dtype, --passes, --quantize, ...).",
)
@clean_errors(interrupted=INTERRUPTED)
def main(
    model: str,
    resolutions: tuple[str, ...],
    out: str | None,
    device: str | None,
    dtype: str | None,
    batch_size: int,
    passes: str,
    quantize: str,
    quantize_linears: str | None,
    max_autotune: bool | None,
    inductor_config: tuple[str, ...],
    seed_flags: bool,
    text_encoders: str,
    attention: str,
    jobs: str,
    revision: str | None,
    vae: str | None,
    variant: str | None,
    overwrite: bool,
    packages_from: str | None,
) -> None:
    """Export MODEL (a preset, a hub id or a local diffusers folder: SDXL, SD 1.x or PixArt-α) to compiled denoiser
    (UNet or PixArt transformer), VAE-decoder and text-encoder packages.

    One AOTInductor package is written per component and resolution; the weights sit beside them in one
    safetensors file per component, with the tokenizers, the scheduler config and a manifest.
    """
    if packages_from is not None:
        _export_reusing(model, packages_from, out, device, overwrite, revision, vae, variant)
        return
    from .compile import parse_inductor_config  # torch's Inductor: not needed for --help
    from .options import ExportOptions, check_options, default_component_configs

    dev = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    capability = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
    pass_list = [] if passes.strip() in ("", "none") else [p.strip() for p in passes.split(",")]
    if quantizing := [p for p in pass_list if p in QUANTIZATION_PASSES]:
        raise FastDiffError(
            f"--passes {quantizing[0]}: quantization is chosen with --quantize", f"use --quantize {quantizing[0]}"
        )
    check_model(model)
    if vae is not None:
        check_vae(vae)
    parsed = list(dict.fromkeys(map(parse_resolution, resolutions)))
    dtype = dtype or ("bf16" if dev.type == "cuda" else "fp32")
    if quantize == "auto":
        quantize = auto_quantization(model, revision, dtype, capability)
    elif capability and (advice := quantization_advice(quantize, capability)):
        log(f"note: {advice}")
    if quantize != "none":
        pass_list.append(quantize)
    if not parsed:
        from .source import default_resolution  # imports diffusers' pipelines (seconds)

        parsed = [default_resolution(model, revision, vae, variant)]
    inductor = parse_inductor_config(list(inductor_config))
    overrides = inductor.pop("", {})
    everywhere = {**overrides, **({} if max_autotune is None else {"max_autotune": max_autotune})}
    defaults = default_component_configs(capability, everywhere, inductor)
    if defaults:
        settings = ", ".join(f"{c}:{k}={v}" for c, configs in defaults.items() for k, v in configs.items())
        log(f"defaults for this GPU: {settings} (--inductor-config with another value overrides them)")
    by_component = {c: {**defaults.get(c, {}), **inductor.get(c, {})} for c in {**defaults, **inductor}}
    options = ExportOptions(
        model=model,
        resolutions=parsed,
        device=dev,
        dtype=dtype,
        batch_size=batch_size,
        passes=pass_list,
        quantize_linears=_names(quantize_linears),
        seed_inductor_flags=seed_flags,
        max_autotune=bool(max_autotune),
        inductor_overrides=overrides,
        component_inductor_overrides=by_component,
        revision=revision,
        vae=vae,
        variant=variant,
        out=out,
        overwrite=overwrite,
        compile_text_encoders=text_encoders == "compiled",
        attention=attention,
        jobs=_jobs(jobs),
    )
    check_options(options)  # bad options refused in a second or two, before the export machinery is imported
    from .export import export_artifact  # imports diffusers' and transformers' models (seconds)

    export_artifact(options)


def _jobs(option: str) -> int:
    """--jobs N or auto."""
    if option.strip() == "auto":
        from .jobs import default_jobs

        return default_jobs()
    try:
        return int(option)
    except ValueError:
        raise FastDiffError(f"--jobs must be a number or auto, got {option!r}", "e.g. --jobs 4") from None


# The options that shape the compiled packages: --packages-from takes them from the artifact whose packages it reuses.
PACKAGE_OPTIONS = (
    "resolutions",
    "dtype",
    "batch_size",
    "passes",
    "quantize",
    "quantize_linears",
    "max_autotune",
    "inductor_config",
    "seed_flags",
    "text_encoders",
    "attention",
)


def _export_reusing(
    model: str,
    art: str,
    out: str | None,
    device: str | None,
    overwrite: bool,
    revision: str | None,
    vae: str | None,
    variant: str | None,
) -> None:
    """fastdiff-export MODEL --packages-from ART (exporter/reuse.py)."""
    context = click.get_current_context()
    for name in PACKAGE_OPTIONS:
        if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
            flag = next(o for p in context.command.params if p.name == name for o in p.opts)
            raise FastDiffError(
                f"{flag} cannot be combined with --packages-from: {art}'s packages fix it", f"leave {flag} out"
            )
    check_model(model)
    if vae is not None:
        check_vae(vae)
    from .reuse import export_reusing, reuse_options, source_artifact  # imports diffusers' models (seconds)

    manifest = source_artifact(art)
    options = reuse_options(model, art, manifest, device, out, overwrite, revision, vae, variant)
    export_reusing(options, art, manifest)
