"""The Stable Diffusion 1.x family: exported, loaded and compared with diffusers' own StableDiffusionPipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_matches_diffusers, run_cli

from fastdiff.runtime import load_pipeline


@pytest.fixture(scope="module")
def sd_pipelines(sd_artifact: Path, sd_checkpoint: Path):
    from diffusers import StableDiffusionPipeline

    mine = load_pipeline(sd_artifact, device="cpu")
    reference = StableDiffusionPipeline.from_pretrained(sd_checkpoint)
    for pipe in (mine, reference):
        pipe.set_progress_bar_config(disable=True)
    return mine, reference


def test_manifest_records_the_family(sd_artifact: Path) -> None:
    manifest = json.loads((sd_artifact / "manifest.json").read_text())
    assert manifest["model"]["family"] == "sd"
    assert manifest["model"]["pooled_dim"] is None and manifest["model"]["time_ids"] is None
    assert manifest["model"]["default_guidance_scale"] == 7.5  # StableDiffusionPipeline's default
    assert manifest["model"]["force_zeros_for_empty_prompt"] is False
    assert manifest["unet"]["inputs"] == ["sample", "timestep", "encoder_hidden_states"]
    assert [c["weights"] for c in manifest["text_encoders"]] == ["text_encoder/weights.safetensors"]
    assert "tokenizer_2" not in manifest["stock"]


def test_manifest_records_one_components_inductor_settings(sd_artifact: Path) -> None:
    options = json.loads((sd_artifact / "manifest.json").read_text())["options"]
    assert "epilogue_fusion" not in options["inductor"]
    assert options["inductor_by_component"] == {"vae_decoder": {**options["inductor"], "epilogue_fusion": False}}
    proc = run_cli("fastdiff-inspect", str(sd_artifact))
    assert proc.returncode == 0, proc.stderr
    assert "vae_decoder" in proc.stdout and "'epilogue_fusion': False" in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="defaults-cfg7.5"),
        pytest.param({"guidance_scale": 1.0}, id="no-cfg"),
        pytest.param({"negative_prompt": "blurry, ugly"}, id="negative"),
        pytest.param({"prompt": ["a cat", "a dog in the rain"], "num_images_per_prompt": 2}, id="list-x2"),
        pytest.param({"num_images_per_prompt": 3, "num_inference_steps": 6}, id="chunked"),
    ],
)
def test_matches_diffusers(sd_pipelines, kwargs: dict) -> None:
    assert_matches_diffusers(*sd_pipelines, **kwargs)


def test_stock_text_encoder_gives_the_final_hidden_states(sd_pipelines, sd_checkpoint: Path) -> None:
    # SD 1.x conditions on the encoder's last hidden state (SDXL on its penultimate one): --text-encoders stock
    # artifacts use this loader, so it must return what StableDiffusionPipeline.encode_prompt does.
    import torch

    from fastdiff.runtime.text import load_stock_text_encoder

    _, reference = sd_pipelines
    encode, _ = load_stock_text_encoder(sd_checkpoint / "text_encoder", torch.float32, torch.device("cpu"), False)
    ids = reference.tokenizer(
        ["a cat"], padding="max_length", max_length=reference.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    hidden, _ = encode(ids, torch.ones_like(ids))
    expected, _ = reference.encode_prompt("a cat", "cpu", 1, False)
    torch.testing.assert_close(hidden, expected, rtol=0, atol=1e-6)


def test_warm_up(sd_pipelines) -> None:
    mine, _ = sd_pipelines
    mine.warm_up()  # one CLIP encoder, no added conditioning


def test_run_cli_writes_an_image(sd_artifact: Path, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "sd.png"
    proc = run_cli("fastdiff-run", str(sd_artifact), "-p", "a cat", "--steps", "2", "--seed", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (64, 64)
