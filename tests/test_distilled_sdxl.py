"""SDXL UNets reshaped by distillation, as in SSD-1B: per-layer transformer depths that differ between the down and
the up path (diffusers' `reverse_transformer_layers_per_block`) and a mid block of one resnet (`UNetMidBlock2D`). The
SDXL path exports them from a local folder like any SDXL checkpoint and matches StableDiffusionXLPipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_matches_diffusers

from fastdiff.runtime import load_pipeline


@pytest.fixture(scope="module")
def pipelines(distilled_artifact: Path, distilled_checkpoint: Path):
    from diffusers import StableDiffusionXLPipeline

    mine = load_pipeline(distilled_artifact, device="cpu")
    reference = StableDiffusionXLPipeline.from_pretrained(distilled_checkpoint)
    for pipe in (mine, reference):
        pipe.set_progress_bar_config(disable=True)
    return mine, reference


def test_the_unet_is_distilled(pipelines) -> None:
    _, reference = pipelines
    unet = reference.unet
    assert len(unet.mid_block.resnets) == 1 and not unet.mid_block.attentions
    down = [len(a.transformer_blocks) for a in unet.down_blocks[1].attentions]
    up = [len(a.transformer_blocks) for a in unet.up_blocks[0].attentions]
    assert (down, up) == ([2], [3, 1])


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="defaults"),
        pytest.param({"prompt": ["a cat", "a dog"], "negative_prompt": ["blurry", "dark"]}, id="negative-list"),
    ],
)
def test_matches_diffusers(pipelines, kwargs: dict) -> None:
    assert_matches_diffusers(*pipelines, **kwargs)
