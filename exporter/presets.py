"""Named models: what `fastdiff-export NAME` means besides a hub id or a local checkpoint folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fastdiff.runtime.format import FastDiffError


@dataclass(frozen=True)
class Preset:
    name: str
    model: str  # hub id, or "" for a checkpoint fastdiff builds itself
    vae: str | None  # a VAE that replaces the checkpoint's own
    resolution: str
    family: str  # as in source.FAMILIES
    about: str
    builder: str | None = None  # the random_models function that builds the checkpoint offline

    def build(self) -> Path:
        """Build the checkpoint offline (or find it built) and return its folder. random_models is imported here:
        it imports diffusers' and transformers' model classes (seconds), which listing the presets does not need."""
        from . import random_models

        if self.builder is None:
            raise ValueError(f"preset {self.name} is a hub checkpoint ({self.model}), not built offline")
        return getattr(random_models, self.builder)()


PRESETS = {
    p.name: p
    for p in (
        Preset(
            "sdxl",
            "stabilityai/stable-diffusion-xl-base-1.0",
            "madebyollin/sdxl-vae-fp16-fix",
            "1024",
            "sdxl",
            "SDXL base 1.0 with the fp16-fix VAE, as in 'Diffusion, Fast'",
        ),
        Preset(
            "tiny-sdxl",
            "",
            None,
            "128",
            "sdxl",
            "a tiny random-weight SDXL-architecture model built offline (demo and tests)",
            builder="tiny_sdxl",
        ),
        Preset(
            "sdxl-random",
            "",
            None,
            "1024",
            "sdxl",
            "SDXL base 1.0's architecture with random weights, built offline (benchmarks)",
            builder="random_sdxl_base",
        ),
        Preset(
            "ssd-1b",
            "segmind/SSD-1B",
            "madebyollin/sdxl-vae-fp16-fix",
            "1024",
            "sdxl",
            "Segmind's SSD-1B (SDXL pipeline, distilled UNet) with the fp16-fix VAE, as in 'Diffusion, Fast'",
        ),
        Preset(
            "ssd-1b-random",
            "",
            None,
            "1024",
            "sdxl",
            "SSD-1B's architecture with random weights, built offline (benchmarks)",
            builder="random_ssd_1b",
        ),
        Preset(
            "sd15",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            None,
            "512",
            "sd",
            "Stable Diffusion 1.5 (one CLIP text encoder, 512x512; exported without its safety checker)",
        ),
        Preset(
            "sd15-random",
            "",
            None,
            "512",
            "sd",
            "Stable Diffusion 1.5's architecture with random weights, built offline (benchmarks)",
            builder="random_sd15",
        ),
        Preset(
            "tiny-sd",
            "",
            None,
            "64",
            "sd",
            "a tiny random-weight Stable Diffusion 1.x-architecture model built offline (tests)",
            builder="tiny_sd",
        ),
        Preset(
            "pixart",
            "PixArt-alpha/PixArt-XL-2-1024-MS",
            None,
            "1024",
            "pixart",
            "PixArt-α XL-2 1024 (a DiT transformer with a T5-XXL text encoder)",
        ),
        Preset(
            "pixart-random",
            "",
            None,
            "1024",
            "pixart",
            "PixArt-XL-2-1024-MS's architecture with random weights, built offline (benchmarks)",
            builder="random_pixart_xl",
        ),
        Preset(
            "tiny-pixart",
            "",
            None,
            "64",
            "pixart",
            "a tiny random-weight PixArt-α-architecture model built offline (tests)",
            builder="tiny_pixart",
        ),
    )
}


def check_model(model: str) -> None:
    """MODEL must name a preset, a local diffusers checkpoint folder or (by its form) a hub id."""
    if model in PRESETS:
        return
    if Path(model).is_file():
        raise FastDiffError(
            f"{model} is a single file, not a diffusers checkpoint folder",
            "save it as one first: StableDiffusionXLPipeline.from_single_file(file).save_pretrained(folder) "
            "(StableDiffusionPipeline for SD 1.x), then pass the folder",
        )
    if Path(model).exists():
        if not (Path(model) / "model_index.json").is_file():
            raise FastDiffError(
                f"{model} is not a diffusers checkpoint folder (no model_index.json)",
                "pass the folder that holds model_index.json, a hub id, or one of: " + ", ".join(PRESETS),
            )
        return
    if model.count("/") != 1 or model.startswith(("/", ".")):
        raise FastDiffError(
            f"unknown model {model!r}: not a preset, a local folder or a hub id",
            f"use a preset ({', '.join(PRESETS)}), a hub id like org/name, or a checkpoint folder",
        )


def check_vae(vae: str) -> None:
    """--vae must name a diffusers VAE folder (one that holds config.json) or, by its form, a hub id."""
    path = Path(vae)
    if path.is_file():
        raise FastDiffError(
            f"--vae {vae} is a file, not a diffusers VAE folder",
            "save it as one first: AutoencoderKL.from_single_file(file).save_pretrained(folder), then pass the folder",
        )
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
            vae_class = str(config.get("_class_name", "")) if isinstance(config, dict) else ""
        except FileNotFoundError:
            vae_class = None
        except (OSError, ValueError):  # unreadable: diffusers could not load it either
            vae_class = ""
        if vae_class is None or not vae_class.startswith("AutoencoderKL"):
            inside = (path / "vae" / "config.json").is_file()
            found = f"its config.json is a {vae_class}'s" if vae_class else "its config.json names no model class"
            raise FastDiffError(
                f"--vae {vae} is not a diffusers VAE folder ({'no config.json' if vae_class is None else found})",
                f"pass {path / 'vae'}" if inside else "pass the folder that holds the VAE's config.json",
            )
        return
    if vae.count("/") != 1 or vae.startswith(("/", ".")):
        raise FastDiffError(
            f"--vae {vae}: there is no such folder, and it is not a hub id (org/name)",
            "pass a VAE folder or a hub id, e.g. madebyollin/sdxl-vae-fp16-fix",
        )
