"""Loading the model to export: a preset, a hub id or a local diffusers checkpoint folder."""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from fastdiff.runtime.format import TEXT_PARTS, FastDiffError, Resolution, parse_resolution

from .presets import PRESETS, Preset, check_model, check_vae

# The pipeline classes fastdiff exports, by family name (the manifest's model.family).
FAMILIES = {"sdxl": StableDiffusionXLPipeline, "sd": StableDiffusionPipeline, "pixart": PixArtAlphaPipeline}
# Components a checkpoint may list that no artifact uses (SD 1.x's safety checker and its image processor, IP-Adapter
# image encoders): not loaded, so that a checkpoint folder without them (often deleted: 1.2 GB) exports too.
UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
# Config keys that do not shape a component's compiled code: metadata, dtype hints, training-only settings, the
# default sample size (the artifact's resolutions are its own), the VAE's upcast hint (its dtype is checked apart).
UNCOMPILED_CONFIG_KEYS = {
    "architectures",
    "attention_dropout",
    "dropout",
    "dropout_rate",
    "dtype",
    "force_upcast",
    "id2label",
    "initializer_factor",
    "initializer_range",
    "label2id",
    "output_attentions",
    "output_hidden_states",
    "problem_type",
    "return_dict",
    "sample_size",
    "torch_dtype",
    "transformers_version",
    "use_cache",
}
# A denoiser's weight files: diffusion_pytorch_model.safetensors (or .bin); of a variant,
# diffusion_pytorch_model.fp16.safetensors; sharded, diffusion_pytorch_model.fp16-00001-of-00002.safetensors (older
# diffusers: diffusion_pytorch_model-00001-of-00002.fp16.safetensors).
WEIGHT_FILE = re.compile(r"^diffusion_pytorch_model(\.\w+?)?(?:-\d+-of-\d+)?(\.\w+?)?\.(?:safetensors|bin)$")


@dataclass
class Source:
    pipe: StableDiffusionXLPipeline | StableDiffusionPipeline | PixArtAlphaPipeline
    family: str
    record: dict  # what the manifest says of the source: model, revision, vae, preset
    preset: Preset | None

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet, or PixArt-α's transformer."""
        return self.pipe.transformer if self.family == "pixart" else self.pipe.unet


def compiled_architecture(source: Source, with_text_encoders: bool) -> dict[str, dict[str, Any]]:
    """The configs of the components an export compiles (their code is compiled for them), as JSON: what
    --packages-from holds a fine-tune's against."""
    configs = {"unet": source.denoiser.config, "vae_decoder": source.pipe.vae.config}
    if with_text_encoders:
        configs |= {name: getattr(source.pipe, name).config for _, name in TEXT_PARTS[source.family]}
    records = {}
    for name, config in configs.items():
        items = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers' or diffusers'
        kept = {k: v for k, v in items.items() if not k.startswith("_") and k not in UNCOMPILED_CONFIG_KEYS}
        records[name] = json.loads(json.dumps(kept, default=str))
    return records


def load_source(
    model: str, dtype: torch.dtype, revision: str | None = None, vae: str | None = None, variant: str | None = None
) -> Source:
    """Load the diffusers pipeline to export, in `dtype`, on the CPU; `variant` names the weight files to load (e.g.
    fp16 for diffusion_pytorch_model.fp16.safetensors), as in diffusers' from_pretrained."""
    preset = PRESETS.get(model)
    location = _location(model)
    if vae is not None:
        check_vae(vae)
    elif preset is not None:
        vae = preset.vae
    index = _load(DiffusionPipeline.load_config, location, revision=revision)
    _check_folder(location, index, variant, vae)
    pipe_kwargs = {"torch_dtype": dtype, "revision": revision, "variant": variant}
    pipe_kwargs.update({name: None for name in UNUSED_COMPONENTS if (index.get(name) or [None])[0] is not None})
    if vae is not None:
        pipe_kwargs["vae"] = _load(AutoencoderKL.from_pretrained, vae, torch_dtype=dtype)
    pipe = _load(DiffusionPipeline.from_pretrained, location, **pipe_kwargs)
    family = next((name for name, cls in FAMILIES.items() if type(pipe) is cls), None)
    if family is None:
        raise FastDiffError(
            f"{model} is a {type(pipe).__name__}; this version exports "
            + " and ".join(cls.__name__ for cls in FAMILIES.values())
            + " models",
            "export an SDXL, Stable Diffusion 1.x or PixArt-α architecture checkpoint",
        )
    _check_supported(pipe, family, model, vae)
    local = preset is None and Path(model).is_dir()
    record = {
        "model": preset.model or preset.name if preset else os.path.abspath(model) if local else model,
        "revision": revision,
        "vae": os.path.abspath(vae) if vae and Path(vae).is_dir() else vae,
    }
    if variant:
        record["variant"] = variant
    if preset:
        record["preset"] = preset.name
    return Source(pipe=pipe, family=family, record=record, preset=preset)


def default_resolution(
    model: str, revision: str | None = None, vae: str | None = None, variant: str | None = None
) -> Resolution:
    """What the model was trained for: the preset's resolution, else the denoiser's sample size times the VAE's
    (`vae`'s, if given) scale factor, read from the configs alone, without loading weights."""
    preset = PRESETS.get(model)
    if preset is not None:
        return parse_resolution(preset.resolution)
    location = _location(model)
    index = _load(DiffusionPipeline.load_config, location, revision=revision)
    _check_folder(location, index, variant, vae)
    model_class, folder = (
        (PixArtTransformer2DModel, "transformer") if "transformer" in index else (UNet2DConditionModel, "unet")
    )
    denoiser = _load(model_class.load_config, location, subfolder=folder, revision=revision)
    vae_config = (
        _load(AutoencoderKL.load_config, vae)
        if vae
        else _load(AutoencoderKL.load_config, location, subfolder="vae", revision=revision)
    )
    return parse_resolution(denoiser["sample_size"] * 2 ** (len(vae_config["block_out_channels"]) - 1))


def model_family(model: str, revision: str | None = None) -> str | None:
    """MODEL's family (a FAMILIES key) from its pipeline config alone, without loading weights; None if unsupported."""
    preset = PRESETS.get(model)
    if preset is not None:
        return preset.family
    index = _load(DiffusionPipeline.load_config, _location(model), revision=revision)
    return next((name for name, cls in FAMILIES.items() if cls.__name__ == index.get("_class_name")), None)


def _location(model: str) -> str:
    """Where diffusers loads MODEL from: a preset's hub id or built folder, a local folder, or a hub id."""
    preset = PRESETS.get(model)
    if preset is not None:
        return preset.model or str(preset.build())
    check_model(model)
    return model


def _load(load, location: str, **kwargs):
    # diffusers logs download retries and missing-file warnings itself; the one-line error below says it all.
    level = diffusers.logging.get_verbosity()
    diffusers.logging.set_verbosity(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # diffusers 0.42 renamed torch_dtype to dtype; older versions, which the requirement allows, know only
            # torch_dtype (and would ignore dtype), so the export passes it and hides the rename's FutureWarning.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            return load(location, **kwargs)
    except Exception as e:
        local = Path(location).exists()
        if _not_cached_offline(e) and not local:
            # "models/my-sdxl" mistyped reads as a hub id: say that no such folder exists either.
            folder = Path(location).parent.is_dir() and Path(location).parent != Path()
            raise FastDiffError(
                f"cannot load {location}: "
                + (f"there is no folder {location}, and as a hub id it is" if folder else "it is")
                + " not in the Hugging Face cache, and the hub cannot be reached",
                "check the path, or connect to the network (with HF_HUB_OFFLINE unset) once to download it",
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FastDiffError(
            f"cannot load {location}: {first}",
            "check that the folder is a diffusers checkpoint as save_pretrained writes it"
            if local
            else "check the id; without network the model must already be in the Hugging Face cache",
        ) from None
    finally:
        diffusers.logging.set_verbosity(level)


def _not_cached_offline(error: BaseException) -> bool:
    """Whether loading failed because the files are not cached locally and the hub was offline or unreachable."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _check_folder(location: str, index: dict, variant: str | None, vae: str | None) -> None:
    """A local checkpoint folder holds what its model_index.json lists, and denoiser weights of the variant asked for
    or plain ones (diffusers' own errors name the folder, not what is missing in it)."""
    folder = Path(location)
    if not folder.is_dir():
        return  # a hub id: its files are the hub's
    for name, entry in index.items():
        listed = not name.startswith("_") and isinstance(entry, list | tuple) and entry and entry[0] is not None
        if listed and name not in UNUSED_COMPONENTS and not (vae and name == "vae") and not (folder / name).is_dir():
            raise FastDiffError(
                f"{folder / name} is missing: model_index.json lists {name}",
                "copy the whole checkpoint folder, as diffusers' save_pretrained writes it",
            )
    denoiser = folder / ("transformer" if "transformer" in index else "unet")
    found = [m for p in (denoiser.iterdir() if denoiser.is_dir() else []) if (m := WEIGHT_FILE.match(p.name))]
    variants = sorted({(m[1] or m[2])[1:] for m in found if m[1] or m[2]})
    plain = any(not (m[1] or m[2]) for m in found)
    if variants and not plain and variant not in variants:
        raise FastDiffError(
            f"{denoiser} holds only {' and '.join(variants)} weights (diffusion_pytorch_model.{variants[0]}.*)"
            + (f", no {variant} ones" if variant else ""),
            f"pass --variant {variants[0]}",
        )


def _check_supported(pipe, family: str, model: str, vae: str | None = None) -> None:
    if pipe.text_encoder is None or pipe.tokenizer is None:
        raise FastDiffError(f"{model} has no text encoder or tokenizer", "export a checkpoint that includes them")
    denoiser = pipe.transformer if family == "pixart" else pipe.unet
    latent, taken = pipe.vae.config.latent_channels, denoiser.config.in_channels
    if latent != taken:
        raise FastDiffError(
            f"the VAE {vae or 'of ' + model} makes latents of {latent} channels; {model}'s denoiser takes {taken}",
            "use a VAE made for this model's architecture" if vae else "export a checkpoint whose parts match",
        )
    if family == "pixart":
        return
    pairs = [
        (pipe.tokenizer, pipe.text_encoder),
        (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None)),
    ]
    for tokenizer, encoder in pairs:
        if tokenizer is not None and encoder is not None:
            positions = encoder.config.max_position_embeddings
            if (length := tokenizer.model_max_length) > positions:
                # transformers takes a tokenizer_config.json without model_max_length as a length of 1e30
                shown = "of any length" if length >= 1e9 else f"of up to {length} tokens"
                raise FastDiffError(
                    f"{model}'s tokenizer takes prompts {shown}, its text encoder {positions} tokens",
                    f'set "model_max_length": {positions} in the tokenizer\'s tokenizer_config.json',
                )
    unet = pipe.unet.config
    if family == "sdxl" and (pipe.text_encoder is None or pipe.text_encoder_2 is None):
        raise FastDiffError(f"{model} lacks one of SDXL's two text encoders (a refiner?)", "export a base model")
    expected = "text_time" if family == "sdxl" else None
    if unet.addition_embed_type != expected or unet.time_cond_proj_dim is not None or unet.class_embed_type:
        raise FastDiffError(
            f"{model}'s UNet uses conditioning this version does not export (addition_embed_type="
            f"{unet.addition_embed_type}, class_embed_type={unet.class_embed_type}, "
            f"time_cond_proj_dim={unet.time_cond_proj_dim})",
            "export a standard SDXL or Stable Diffusion 1.x checkpoint",
        )
    if getattr(pipe.text_encoder.config, "use_attention_mask", False):
        raise FastDiffError(
            f"{model}'s text encoder needs an attention mask, which this version does not export",
            "export a checkpoint whose text encoder runs without one (as SDXL's and Stable Diffusion 1.x's do)",
        )
