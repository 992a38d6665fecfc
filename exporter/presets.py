"""Named models: what `fastdiff-export NAME` means besides a hub id or a local checkpoint folder."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    model: str  # hub id, or "" for a checkpoint fastdiff builds itself
    vae: str | None  # a VAE that replaces the checkpoint's own
    resolution: str
    about: str


PRESETS = {
    p.name: p
    for p in (
        Preset(
            "sdxl",
            "stabilityai/stable-diffusion-xl-base-1.0",
            "madebyollin/sdxl-vae-fp16-fix",
            "1024",
            "SDXL base 1.0 with the fp16-fix VAE, as in 'Diffusion, Fast'",
        ),
        Preset(
            "tiny-sdxl",
            "",
            None,
            "128",
            "a tiny random-weight SDXL-architecture model built offline (demo and tests)",
        ),
    )
}
