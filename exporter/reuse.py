"""`fastdiff-export MODEL --packages-from ART`: an artifact for another checkpoint of ART's architecture (a fine-tune)
that reuses ART's compiled packages and compiles nothing.

The packages hold code only; the weights they bind are the artifact's safetensors files. So MODEL is loaded, given the
passes ART's export applied (the same options, the same quantization), and only its weights, tokenizers, scheduler
and manifest are written; the packages are hard-linked from ART (copied across filesystems), byte for byte. Every
weight must have the name, shape, dtype and storage layout that ART's packages bind (ART's weight files, which its
manifest hashes); the first that differs is named, and a full export is needed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fastdiff.runtime.format import (
    FORMAT_VERSION,
    SAFETENSORS_DTYPES,
    TEXT_PARTS,
    CompiledComponent,
    FastDiffError,
    Manifest,
    ModelFacts,
    check_files,
    read_manifest,
    resolve_device,
    sha256_file,
    torch_dtype,
    weights_path,
)

from .artifact import ArtifactWriter
from .compile import named_constants, parametrized_owner
from .export import denoiser_and_decoder, export_versions, model_facts, save_stock, text_encoder
from .options import ExportOptions, check_options
from .passes import fused_away
from .progress import log, phase
from .source import compiled_architecture, load_source, model_family

# Model facts the packages have compiled in (the VAE decoder's unscaling, the denoiser's input shapes): a checkpoint
# whose facts differ cannot use them, whatever its weights.
COMPILED_FACTS = (
    "latent_channels",
    "vae_scale_factor",
    "scaling_factor",
    "text_max_length",
    "pooled_dim",
    "time_ids",
    "latents_mean",
    "latents_std",
)
FULL_EXPORT = "a full export is needed: fastdiff-export MODEL without --packages-from"


def source_artifact(art: str | os.PathLike) -> Manifest:
    """ART's manifest, once ART is known to be an intact artifact of this format."""
    root = Path(art)
    manifest = read_manifest(root)
    if manifest.format_version != FORMAT_VERSION:
        raise FastDiffError(
            f"--packages-from {root} is an artifact of format v{manifest.format_version}; this fastdiff writes "
            f"v{FORMAT_VERSION}",
            "export the source model again with this fastdiff, then reuse that artifact",
        )
    if problems := check_files(root, manifest):
        raise FastDiffError(f"--packages-from {root} is damaged: {problems[0]}", "export the source model again")
    return manifest


def reuse_options(
    model: str,
    art: str | os.PathLike,
    manifest: Manifest,
    device: str | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    revision: str | None = None,
    vae: str | None = None,
    variant: str | None = None,
) -> ExportOptions:
    """The options ART was exported with, for MODEL, checked (before any model loads) as an export's are."""
    dev = resolve_device(device, manifest)  # the passes run where ART's ran: quantization may need its GPU
    if dev.type != manifest.device["type"]:
        raise FastDiffError(
            f"--device {dev.type}: {art}'s packages were compiled for {manifest.device['type']}",
            f"leave --device out, or pass --device {manifest.device['type']}",
        )
    family = model_family(model, revision)
    if family != manifest.model.family:
        raise FastDiffError(
            f"{model} is {f'of family {family}' if family else 'no SDXL, SD 1.x or PixArt-α model'}; {art} is an "
            f"artifact of family {manifest.model.family}",
            f"reuse the packages of an artifact of {model}'s architecture, or {FULL_EXPORT}",
        )
    options = ExportOptions(
        model=model,
        resolutions=manifest.resolutions,
        device=dev,
        dtype=manifest.dtype,
        batch_size=manifest.batch_size,
        passes=list(manifest.options["passes"]),
        vae_passes=list(manifest.options["vae_passes"]),
        quantize_linears=manifest.options.get("quantize_linears"),
        revision=revision,
        vae=vae,
        variant=variant,
        out=out,
        overwrite=overwrite,
        compile_text_encoders=bool(manifest.text_encoders),
    )
    check_options(options)
    return options


def export_reusing(options: ExportOptions, art: str | os.PathLike, manifest: Manifest) -> Path:
    """Write MODEL's artifact with ART's packages; its path. Raises FastDiffError if MODEL does not fit them."""
    art = Path(art).absolute()
    out = options.out or options.default_out()
    with ArtifactWriter(out, options.overwrite) as writer:
        with phase(f"loading {options.model}"):
            source = load_source(
                options.model, torch_dtype(options.dtype), options.revision, options.vae, options.variant
            )
        facts = model_facts(source)
        _check_facts(facts, manifest.model, options.model, art)
        _check_architecture(compiled_architecture(source, bool(manifest.text_encoders)), manifest, options.model, art)
        with phase(f"applying passes {', '.join(options.passes) or '(none)'}"):
            unet, vae = denoiser_and_decoder(source, options)
        if unet.inputs != manifest.unet.inputs:  # PixArt-α's micro-conditioning is taken by the 1024² models only
            raise FastDiffError(
                f"{options.model}'s denoiser takes {', '.join(unet.inputs)}; {art}'s packages take "
                f"{', '.join(manifest.unet.inputs)}",
                FULL_EXPORT,
            )
        modules = {"unet": (unet, manifest.unet), "vae_decoder": (vae, manifest.vae_decoder)}
        names = [encoder for _, encoder in TEXT_PARTS[source.family]]
        if manifest.text_encoders:  # compiled ones; stock ones are saved with the tokenizers
            for name, component in zip(names, manifest.text_encoders, strict=True):
                modules[name] = (text_encoder(source, name, options), component)
        components = {}
        with phase(f"writing weights, linking {art.name}'s packages"):
            for name, (module, component) in modules.items():
                components[name] = _write_component(writer, name, module, component, art, options.model)
        with phase("writing tokenizers, scheduler" + ("" if manifest.text_encoders else " and stock text encoders")):
            stock = save_stock(writer, source.pipe, facts, with_text_encoders=not manifest.text_encoders)
        packages_from = {"artifact": str(art), "source": manifest.source, "created": manifest.created}
        compiled_with = {k: manifest.versions.get(k) for k in ("torch", "cuda", "triton")}  # the packages' build
        new = Manifest(
            source={**source.record, "packages_from": packages_from},
            dtype=manifest.dtype,
            batch_size=manifest.batch_size,
            options=manifest.options,
            device=manifest.device,  # what the packages were compiled for
            versions={**export_versions(options), **compiled_with},
            model=facts,
            unet=components["unet"],
            vae_decoder=components["vae_decoder"],
            text_encoders=[components[name] for name in names if name in components],
            stock=stock,
        )
        with phase("hashing files and writing the manifest"):
            for component in (new.unet, new.vae_decoder, *new.text_encoders):
                for rel in component.packages.values():  # the bytes ART's manifest vouches for, nothing changed since
                    if sha256_file(writer.path(rel)) != manifest.files[rel]["sha256"]:
                        raise FastDiffError(f"{art}/{rel} does not match the sha256 in its manifest", FULL_EXPORT)
            path = writer.commit(new)
    log(f"artifact written to {path} (packages from {art})")
    return path


def _check_facts(facts: ModelFacts, compiled: ModelFacts, model: str, art: Path) -> None:
    for name in COMPILED_FACTS:
        if getattr(facts, name) != getattr(compiled, name):
            raise FastDiffError(
                f"{model}'s {name} is {getattr(facts, name)}; {art}'s packages have {getattr(compiled, name)} "
                "compiled in",
                FULL_EXPORT,
            )


def _check_architecture(configs: dict[str, dict[str, Any]], manifest: Manifest, model: str, art: Path) -> None:
    """MODEL's compiled components configured as ART's packages were compiled: the keys both configs have agree (a
    key one diffusers or transformers version has and another lacks cannot be compared)."""
    compiled = manifest.options.get("architecture")
    if compiled is None:
        raise FastDiffError(
            f"{art} does not record the configuration its packages were compiled for (an earlier fastdiff exported "
            "it), so a checkpoint cannot be checked against it",
            "export the source model again with this fastdiff, then reuse that artifact",
        )
    for name, recorded in compiled.items():
        config = configs.get(name, {})
        for key in sorted(recorded.keys() & config.keys()):
            if config[key] != recorded[key]:
                raise FastDiffError(
                    f"{model}'s {name} has {key} {config[key]!r}; {art}'s packages were compiled for {recorded[key]!r}",
                    FULL_EXPORT,
                )


def _write_component(
    writer: ArtifactWriter, name: str, module: torch.nn.Module, component: CompiledComponent, art: Path, model: str
) -> CompiledComponent:
    """The component's weights, as its packages bind them, checked against ART's; its packages linked from ART."""
    with safe_open(art / component.weights, framework="pt") as f:
        expected = {
            key: (_logical(f.get_slice(key).get_shape(), key, component), f.get_slice(key).get_dtype())
            for key in f.keys()
        }
    sources = {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers())}
    try:
        weights = named_constants(sources, sorted(expected))
    except FastDiffError as e:
        raise FastDiffError(f"{model} does not fit {art}'s packages: {e.problem}", FULL_EXPORT) from None
    for key in sorted(expected):
        shape, dtype = expected[key]
        got = (tuple(weights[key].shape), STORED_DTYPE_NAMES.get(weights[key].dtype, str(weights[key].dtype)))
        if got != (shape, dtype):
            raise FastDiffError(
                f"{model}'s {name} weight {key} is {list(got[0])} {got[1]}; {art}'s packages bind "
                f"{list(shape)} {dtype}",
                FULL_EXPORT,
            )
    unused = _unbound(module, sources, expected)
    if larger := [key for key in unused if not _inlined(sources[key])]:
        raise FastDiffError(
            f"{model}'s {name} has weight {larger[0]}, which {art}'s packages do not use (a larger architecture?)",
            FULL_EXPORT,
        )
    if unused:
        raise FastDiffError(
            f"{art}'s packages have their {name} weight {unused[0]} compiled into their code, where {model}'s cannot "
            "reach (an export by an older fastdiff, which bound only weights of more than 8 values)",
            "export the source model of ART again with this fastdiff, and reuse that artifact",
        )
    nhwc = writer.save_weights(weights_path(name), weights)
    if nhwc != sorted(component.channels_last):
        differs = sorted(set(nhwc) ^ set(component.channels_last))[0]
        raise FastDiffError(
            f"{model}'s {name} weight {differs} has another memory layout than {art}'s packages expect", FULL_EXPORT
        )
    for rel in component.packages.values():
        _link(art / rel, writer.path(rel))
    return dataclasses.replace(component, weights=weights_path(name), channels_last=nhwc)


def _unbound(module: torch.nn.Module, sources: dict[str, torch.Tensor], bound: dict) -> list[str]:
    """The module's tensors that no bound name holds (directly, as an alias, or flattened from a quantized weight),
    except those of projections that fuse_qkv replaced, which the compiled code does not use either."""
    held = {id(sources[key]) for key in bound if key in sources}
    held |= {id(sources[owner]) for key in bound if (owner := parametrized_owner(key)) in sources}
    dead = tuple(f"{fqn}." for fqn in fused_away(module))
    return sorted(key for key, t in sources.items() if id(t) not in held and not key.startswith(dead))


def _inlined(tensor: torch.Tensor) -> bool:
    """Whether Inductor compiles the tensor into the code unless told not to (a scalar, or a vector of up to 8)."""
    return tensor.dim() <= 1 and tensor.numel() <= 8


def _logical(stored_shape: list[int], key: str, component: CompiledComponent) -> tuple[int, ...]:
    """A weight's shape as the module holds it: a channels_last one is stored NHWC."""
    if key in component.channels_last and len(stored_shape) == 4:
        n, h, w, c = stored_shape
        return (n, c, h, w)
    return tuple(stored_shape)


STORED_DTYPE_NAMES = {getattr(torch, torch_name): name for name, torch_name in SAFETENSORS_DTYPES.items()}


def _link(source: Path, target: Path) -> None:
    """Hard-link a package (the same bytes, no copy), or copy it where a link cannot be made (another filesystem)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
