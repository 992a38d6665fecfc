"""Loading the model to export: a preset, a hub id or a local diffusers checkpoint folder."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

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

from fastdiff.runtime.errors import FastDiffError
from fastdiff.runtime.resolution import Resolution, parse_resolution

from .presets import PRESETS, Preset, check_model

# The pipeline classes fastdiff exports, by family name (the manifest's model.family).
FAMILIES = {"sdxl": StableDiffusionXLPipeline, "sd": StableDiffusionPipeline, "pixart": PixArtAlphaPipeline}


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


def load_source(model: str, dtype: torch.dtype, revision: str | None = None, vae: str | None = None) -> Source:
    """Load the diffusers pipeline to export, in `dtype`, on the CPU."""
    preset = PRESETS.get(model)
    location = _location(model)
    if preset is not None:
        vae = vae or preset.vae
    pipe_kwargs = {"torch_dtype": dtype, "revision": revision}
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
    _check_supported(pipe, family, model)
    record = {"model": preset.model or preset.name if preset else model, "revision": revision, "vae": vae}
    if preset:
        record["preset"] = preset.name
    return Source(pipe=pipe, family=family, record=record, preset=preset)


def default_resolution(model: str, revision: str | None = None) -> Resolution:
    """What the model was trained for: the preset's resolution, else the denoiser's sample size times the VAE's
    scale factor (read from the configs alone, without loading weights)."""
    preset = PRESETS.get(model)
    if preset is not None:
        return parse_resolution(preset.resolution)
    location = _location(model)
    index = _load(DiffusionPipeline.load_config, location, revision=revision)
    model_class, folder = (
        (PixArtTransformer2DModel, "transformer") if "transformer" in index else (UNet2DConditionModel, "unet")
    )
    denoiser = _load(model_class.load_config, location, subfolder=folder, revision=revision)
    vae = _load(AutoencoderKL.load_config, location, subfolder="vae", revision=revision)
    return parse_resolution(denoiser["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1))


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
        if _not_cached_offline(e):
            raise FastDiffError(
                f"cannot load {location}: it is not in the Hugging Face cache, and the hub cannot be reached",
                "connect to the network (with HF_HUB_OFFLINE unset) once to download it, or pass a local folder",
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FastDiffError(
            f"cannot load {location}: {first}",
            "check the id or path; without network the model must already be in the Hugging Face cache",
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


def _check_supported(pipe, family: str, model: str) -> None:
    if pipe.text_encoder is None or pipe.tokenizer is None:
        raise FastDiffError(f"{model} has no text encoder or tokenizer", "export a checkpoint that includes them")
    if family == "pixart":
        return
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
        raise FastDiffError(f"{model}'s text encoder needs an attention mask, which this version does not export")
