"""Checkpoint folders as users have them: weights saved as a variant, SD 1.x without its safety checker, parts
missing or mismatched, another VAE, paths given as Path objects or as `.`. What loads is compared with diffusers'
own loading of the same folder; what cannot load is refused before anything compiles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import invoke_cli

from fastdiff.runtime import parse_resolution


@pytest.fixture
def checkpoint(tmp_path: Path, fastdiff_cache: Path) -> Path:
    """A copy of the tiny SD 1.x checkpoint, to change."""
    from fastdiff.exporter.random_models import tiny_sd

    return Path(shutil.copytree(tiny_sd(), tmp_path / "ckpt"))


def save_as_variant(folder: Path, variant: str) -> None:
    """Rename every weight file as diffusers' save_pretrained(variant=...) names it."""
    for path in folder.glob("*/*.safetensors"):
        path.rename(path.with_name(f"{path.stem}.{variant}{path.suffix}"))


def list_components(folder: Path, **components: list) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, **components}))


def vae_with_latent_channels(folder: Path, channels: int, out: Path) -> Path:
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(folder / "vae")
    AutoencoderKL.from_config({**config, "latent_channels": channels}).save_pretrained(out)
    return out


def written(path: Path, text: str) -> Path:
    """A folder holding `path`, written with `text`."""
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path.parent


def refused(*args: str, res: tuple[str, ...] = ("--res", "64")) -> str:
    """fastdiff-export refusing ARGS with one clean error before compiling; its stderr."""
    proc = invoke_cli("fastdiff-export", *args, *res, "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "torch.export" not in proc.stderr, proc.stderr
    return proc.stderr


def test_variant_weights_load_as_diffusers_loads_them(checkpoint: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from fastdiff.exporter.source import load_source

    save_as_variant(checkpoint, "fp16")
    mine = load_source(str(checkpoint), torch.float32, variant="fp16")
    theirs = StableDiffusionPipeline.from_pretrained(checkpoint, variant="fp16", safety_checker=None)
    for name, tensor in theirs.unet.state_dict().items():
        torch.testing.assert_close(mine.pipe.unet.state_dict()[name], tensor, rtol=0, atol=0)
    assert mine.record["variant"] == "fp16" and mine.record["model"] == str(checkpoint.resolve())
    # Without --variant such a folder is refused with the option to pass (diffusers: "no file named ....bin").
    for args in ((), ("--variant", "bf16")):  # with the default resolution's reading of the folder too
        stderr = refused(str(checkpoint), *args, "--out", str(tmp_path / "a"), res=())
        assert "holds only fp16 weights" in stderr and "pass --variant fp16" in stderr, stderr
    assert "no bf16 ones" in stderr, stderr
    # With it, the load gets as far as the parts' own checks (here a VAE of another latent size, as --vae).
    vae = vae_with_latent_channels(checkpoint, 8, tmp_path / "vae8")
    stderr = refused(str(checkpoint), "--variant", "fp16", "--vae", str(vae), "--out", str(tmp_path / "a"))
    assert f"the VAE {vae} makes latents of 8 channels" in stderr and "denoiser takes 4" in stderr, stderr
    assert not (tmp_path / "a").exists()


def test_safety_checker_listed_but_absent(checkpoint: Path) -> None:
    """SD 1.5 folders list the safety checker and its image processor (1.2 GB, often deleted); no artifact uses them."""
    from fastdiff.exporter.source import load_source

    list_components(
        checkpoint,
        safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
        feature_extractor=["transformers", "CLIPImageProcessor"],
    )
    source = load_source(str(checkpoint), torch.float32)
    assert source.family == "sd" and source.pipe.safety_checker is None


def test_a_missing_part_is_named(checkpoint: Path, tmp_path: Path) -> None:
    shutil.rmtree(checkpoint / "tokenizer")
    stderr = refused(str(checkpoint), "--out", str(tmp_path / "a"))
    assert f"{checkpoint / 'tokenizer'} is missing: model_index.json lists tokenizer" in stderr, stderr


def test_a_tokenizer_without_its_length(checkpoint: Path, tmp_path: Path) -> None:
    """transformers takes a tokenizer_config.json without model_max_length as unlimited: the export would trace the
    text encoder at that length."""
    config_path = checkpoint / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("model_max_length")
    config_path.write_text(json.dumps(config))
    positions = json.loads((checkpoint / "text_encoder" / "config.json").read_text())["max_position_embeddings"]
    stderr = refused(str(checkpoint), "--out", str(tmp_path / "a"))
    assert "tokenizer takes prompts of any length" in stderr and f'"model_max_length": {positions}' in stderr, stderr


def test_another_vae_where_the_checkpoint_has_none(checkpoint: Path, tmp_path: Path) -> None:
    """The default resolution comes from --vae's scale factor when the checkpoint has no VAE of its own."""
    from fastdiff.exporter.source import default_resolution

    own = default_resolution(str(checkpoint))
    vae = Path(shutil.copytree(checkpoint / "vae", tmp_path / "vae"))
    shutil.rmtree(checkpoint / "vae")
    assert default_resolution(str(checkpoint), vae=str(vae)) == own
    for res in (("--res", "64"), ()):  # and without one, the missing VAE is named, with --res or without it
        stderr = refused(str(checkpoint), "--out", str(tmp_path / "a"), res=res)
        assert f"{checkpoint / 'vae'} is missing" in stderr, stderr


@pytest.mark.parametrize(
    ("make", "phrases"),
    [
        (
            lambda ckpt, tmp: Path(shutil.copy(ckpt / "vae" / "diffusion_pytorch_model.safetensors", tmp / "v.st")),
            ["is a file, not a diffusers VAE folder", "from_single_file"],
        ),
        (lambda ckpt, tmp: ckpt, ["is not a diffusers VAE folder (no config.json)", "pass {ckpt}/vae"]),
        (lambda ckpt, tmp: "./vaes/x", ["there is no such folder, and it is not a hub id"]),
        (lambda ckpt, tmp: ckpt / "unet", ["its config.json is a UNet2DConditionModel's"]),
        (lambda ckpt, tmp: written(tmp / "odd" / "config.json", "[1]"), ["its config.json names no model class"]),
    ],
    ids=["file", "pipeline-folder", "missing", "unet", "odd-config"],
)
def test_export_refuses_a_vae_that_is_no_vae(checkpoint: Path, tmp_path: Path, make, phrases: list[str]) -> None:
    vae = make(checkpoint, tmp_path)
    stderr = refused("tiny-sd", "--vae", str(vae), "--out", str(tmp_path / "a"))
    for phrase in phrases:
        assert phrase.format(ckpt=checkpoint) in stderr, stderr


def test_a_mistyped_folder_is_not_only_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`models/my-sdxl` reads as a hub id too; offline, the error says that no such folder exists either."""
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    # In-process, huggingface_hub read HF_HUB_OFFLINE at its import (at collection, before conftest set it): without
    # this the lookup waits for the network's timeouts.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    stderr = refused("models/my-sdxl", "--out", "a")
    assert "there is no folder models/my-sdxl, and as a hub id it is not in the Hugging Face cache" in stderr, stderr


def test_export_options_take_paths_and_name_dot_after_the_folder(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastdiff.exporter.options import ExportOptions

    options = ExportOptions(model=checkpoint, resolutions=[parse_resolution(64)], device=torch.device("cpu"))
    assert options.model == str(checkpoint) and options.default_out() == Path("artifacts/ckpt-64x64-fp32-cpu")
    options = ExportOptions(model=checkpoint, resolutions=[], device=torch.device("cpu"), vae=checkpoint / "vae")
    assert options.vae == str(checkpoint / "vae")
    monkeypatch.chdir(checkpoint)
    for model in (".", "./"):
        options = ExportOptions(model=model, resolutions=[parse_resolution(64)], device=torch.device("cpu"))
        assert options.default_out() == Path("artifacts/ckpt-64x64-fp32-cpu")
