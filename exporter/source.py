"""Loading the model to export: a preset, a hub id or a local diffusers checkpoint folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionXLPipeline

from fastdiff.runtime.errors import FastDiffError

from .presets import PRESETS, Preset


@dataclass
class Source:
    pipe: StableDiffusionXLPipeline
    record: dict  # what the manifest says of the source: model, revision, vae, preset
    preset: Preset | None


def load_source(model: str, dtype: torch.dtype, revision: str | None = None, vae: str | None = None) -> Source:
    """Load the diffusers pipeline to export, in `dtype`, on the CPU."""
    preset = PRESETS.get(model)
    if preset is not None:
        location = preset.model or str(preset.build())
        vae = vae or preset.vae
    elif Path(model).exists():
        location = model
        if not (Path(model) / "model_index.json").is_file():
            raise FastDiffError(
                f"{model} is not a diffusers checkpoint folder (no model_index.json)",
                "pass the folder that holds model_index.json, a hub id, or one of: " + ", ".join(PRESETS),
            )
    elif model.count("/") == 1 and not model.startswith(("/", ".")):
        location = model
    else:
        raise FastDiffError(
            f"unknown model {model!r}: not a preset, a local folder or a hub id",
            f"use a preset ({', '.join(PRESETS)}), a hub id like org/name, or a checkpoint folder",
        )
    pipe_kwargs = {"torch_dtype": dtype, "revision": revision}
    if vae is not None:
        pipe_kwargs["vae"] = _load(AutoencoderKL, vae, torch_dtype=dtype)
    pipe = _load(DiffusionPipeline, location, **pipe_kwargs)
    if not isinstance(pipe, StableDiffusionXLPipeline):
        raise FastDiffError(
            f"{model} is a {type(pipe).__name__}; this version exports StableDiffusionXLPipeline models",
            "export an SDXL-architecture checkpoint",
        )
    _check_supported(pipe, model)
    record = {"model": preset.model or preset.name if preset else model, "revision": revision, "vae": vae}
    if preset:
        record["preset"] = preset.name
    return Source(pipe=pipe, record=record, preset=preset)


def _load(cls, location: str, **kwargs):
    # diffusers logs download retries and missing-file warnings itself; the one-line error below says it all.
    level = diffusers.logging.get_verbosity()
    diffusers.logging.set_verbosity(logging.ERROR)
    try:
        return cls.from_pretrained(location, **kwargs)
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


def _check_supported(pipe: StableDiffusionXLPipeline, model: str) -> None:
    unet = pipe.unet.config
    if pipe.text_encoder is None or pipe.text_encoder_2 is None:
        raise FastDiffError(f"{model} lacks one of SDXL's two text encoders (a refiner?)", "export a base model")
    if unet.addition_embed_type != "text_time" or unet.time_cond_proj_dim is not None:
        raise FastDiffError(
            f"{model}'s UNet uses conditioning this version does not export "
            f"(addition_embed_type={unet.addition_embed_type}, time_cond_proj_dim={unet.time_cond_proj_dim})",
            "export a standard SDXL checkpoint",
        )
