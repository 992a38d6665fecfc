"""SDXL UNets reshaped by distillation, as in SSD-1B: per-layer transformer depths that differ between the down and
the up path (diffusers' `reverse_transformer_layers_per_block`) and a mid block of one resnet (`UNetMidBlock2D`). The
SDXL path exports them from a local folder like any SDXL checkpoint and matches StableDiffusionXLPipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_matches_diffusers, run_cli

from fastdiff.runtime import load_pipeline

DISTILLED_UNET = {
    # one resnet per down block, two per up block: a depth per layer, deeper on the way up
    "transformer_layers_per_block": [[1], [2]],
    "reverse_transformer_layers_per_block": [[3, 1], [1, 1]],
    "mid_block_type": "UNetMidBlock2D",
}


@pytest.fixture(scope="module")
def distilled_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fastdiff.exporter.random_models import TINY_ARCH, build_random_checkpoint

    arch = {**TINY_ARCH, "unet": {**TINY_ARCH["unet"], **DISTILLED_UNET}}
    return build_random_checkpoint(tmp_path_factory.mktemp("distilled") / "checkpoint", arch, seed=5)


@pytest.fixture(scope="module")
def pipelines(distilled_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path_factory.mktemp("distilled") / "artifact"
    proc = run_cli(
        "fastdiff-export",
        str(distilled_checkpoint),
        *("--res", "64", "--device", "cpu", "--text-encoders", "stock", "--out", str(out)),
    )
    assert proc.returncode == 0, proc.stderr
    mine = load_pipeline(out, device="cpu")
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
