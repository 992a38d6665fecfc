"""The PixArt-α family: exported, loaded and compared with diffusers' own PixArtAlphaPipeline.

The tiny model has PixArt-XL-2-1024-MS's structure (transformer sample size 128, so the pipeline feeds it the
resolution and aspect-ratio micro-conditioning; learned variance; T5 encoder with attention mask; DPM-Solver++).
Measured (fp32, CPU, 4-6 steps): latents max abs difference ~1.4e-4 to 4e-4 at values up to ~500 (the random
model's latents grow large), images ~7e-7.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from fastdiff.runtime import load_pipeline

# diffusers' defaults that fastdiff does not reproduce: caption cleaning (needs bs4 and ftfy) and resolution binning
# (fastdiff runs the exported resolutions only).
DIFFUSERS_ONLY = {"clean_caption": False, "use_resolution_binning": False}


@pytest.fixture(scope="module")
def reference(pixart_checkpoint: Path):
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(pixart_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_matches(mine, reference, **kwargs) -> None:
    """Latents within 5e-6 of their largest magnitude (fp32 rounding of a reordered computation: ~1e-6 measured,
    relative to values up to ~500), images within 1e-5."""
    args = {"prompt": "a photo of a cat", "num_inference_steps": 4, "height": 64, "width": 64, **kwargs}
    for output_type in ("latent", "np"):
        a = mine(**args, output_type=output_type, generator=torch.Generator().manual_seed(3)).images
        b = reference(**args, **DIFFUSERS_ONLY, output_type=output_type, generator=torch.Generator().manual_seed(3))
        a, b = torch.as_tensor(a), torch.as_tensor(b.images)
        atol = 5e-6 * b.abs().max().item() if output_type == "latent" else 1e-5
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)


def test_manifest_records_the_family(pixart_artifact: Path) -> None:
    manifest = json.loads((pixart_artifact / "manifest.json").read_text())
    model = manifest["model"]
    assert model["family"] == "pixart"
    assert model["text_max_length"] == 120  # PixArtAlphaPipeline's max_sequence_length
    assert model["default_guidance_scale"] == 4.5  # PixArtAlphaPipeline's default
    assert model["pooled_dim"] is None and model["time_ids"] is None
    assert model["lowercase_prompts"] is True
    assert manifest["unet"]["inputs"] == [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "encoder_attention_mask",
        "resolution",
        "aspect_ratio",
    ]
    assert [c["inputs"] for c in manifest["text_encoders"]] == [["input_ids", "attention_mask"]]
    assert set(manifest["stock"]) == {"scheduler", "tokenizer"}


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="defaults-cfg4.5"),
        pytest.param({"guidance_scale": 1.0}, id="no-cfg"),
        pytest.param({"negative_prompt": "blurry, ugly"}, id="negative"),
        pytest.param({"prompt": ["a cat", "An Astronaut riding a horse in the jungle, 8k "]}, id="list-mixed-case"),
        pytest.param({"num_images_per_prompt": 3, "num_inference_steps": 6}, id="chunked"),
    ],
)
def test_matches_diffusers(pixart_artifact: Path, reference, kwargs: dict) -> None:
    mine = load_pipeline(pixart_artifact, device="cpu", warmup=True)  # T5 mask and micro-conditioning in the warm-up
    mine.set_progress_bar_config(disable=True)
    assert_matches(mine, reference, **kwargs)


def test_stock_t5_non_square_math_attention(pixart_stock_t5_artifact: Path, reference) -> None:
    """The transformers T5 encoder shipped as is, at 96x64 (aspect ratio 2/3 in the micro-conditioning), with the
    attention compiled as plain matmul + softmax (`--attention math`, recorded per package)."""
    artifact = pixart_stock_t5_artifact
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["text_encoders"] == [] and "text_encoder" in manifest["stock"]
    assert manifest["options"]["attention"] == {"unet/96x64.pt2": "math", "vae_decoder/96x64.pt2": "math"}
    mine = load_pipeline(artifact, device="cpu")
    mine.set_progress_bar_config(disable=True)
    assert_matches(mine, reference, width=96, height=64, negative_prompt="  A Dog")


def test_run_cli_writes_an_image(pixart_artifact: Path, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "pixart.png"
    args = ["-p", "a cat", "--steps", "2", "--seed", "1", "--out", str(out)]
    proc = run_cli("fastdiff-run", str(pixart_artifact), *args)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (64, 64)


def test_step_without_micro_conditioning() -> None:
    """The 512 and 256 models (sample size 64, 32) take no resolution conditioning: PixArtStep, the transformer's
    own output less its learned-variance half."""
    from diffusers import PixArtTransformer2DModel

    from fastdiff.exporter.random_models import TINY_PIXART_ARCH
    from fastdiff.exporter.wrappers import PixArtStep

    config = {**TINY_PIXART_ARCH["transformer"], "sample_size": 64, "use_additional_conditions": None}
    transformer = PixArtTransformer2DModel(**config).eval()
    assert not transformer.use_additional_conditions
    g = torch.Generator().manual_seed(0)
    sample, states = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 120, 32, generator=g)
    mask = torch.ones(2, 120, dtype=torch.long)
    mask[0, 10:] = 0
    timestep = torch.tensor(500.0)
    with torch.no_grad():
        out = PixArtStep(transformer)(sample, timestep, states, mask)
        expected = transformer(
            sample,
            encoder_hidden_states=states,
            encoder_attention_mask=mask,
            timestep=timestep.expand(2),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample[:, :4]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_local_folder_default_resolution(pixart_checkpoint: Path) -> None:
    """A PixArt checkpoint given as a folder (not a preset): its trained size comes from the transformer's config."""
    from fastdiff.exporter.source import default_resolution
    from fastdiff.runtime.format import Resolution

    assert default_resolution(str(pixart_checkpoint)) == Resolution(1024, 1024)  # sample size 128 x VAE factor 8
