"""Tests for the embedded tiny SDXL checkpoint (fastdiff.exporter.random_models)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from transformers import CLIPTokenizer

from fastdiff.exporter.random_models import TINY_MODEL_ID, build_tiny_sdxl, default_tiny_path

PROMPT = "a photo of a cat"
UNET_WEIGHTS = Path("unet", "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / TINY_MODEL_ID)


@pytest.fixture(scope="module")
def pipe(checkpoint: Path) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(checkpoint)


def test_layout(checkpoint: Path) -> None:
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (checkpoint / sub).is_dir(), sub
    assert (checkpoint / "model_index.json").is_file()
    for weights in checkpoint.rglob("*.safetensors"):
        with safe_open(weights, framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}, weights
    assert not [p for p in checkpoint.parent.iterdir() if p != checkpoint], "temp folder left behind"


def test_deterministic(checkpoint: Path, tmp_path: Path) -> None:
    again = build_tiny_sdxl(tmp_path / "same")
    other = build_tiny_sdxl(tmp_path / "other", seed=1)
    for weights in checkpoint.rglob("*.safetensors"):
        rel = weights.relative_to(checkpoint)
        assert weights.read_bytes() == (again / rel).read_bytes(), rel
    assert (checkpoint / UNET_WEIGHTS).read_bytes() != (other / UNET_WEIGHTS).read_bytes()


def test_existing_checkpoint_is_kept(tmp_path: Path) -> None:
    path = build_tiny_sdxl(tmp_path / "ckpt")
    before = (path / UNET_WEIGHTS).stat().st_mtime_ns
    assert build_tiny_sdxl(path, seed=1) == path
    assert (path / UNET_WEIGHTS).stat().st_mtime_ns == before


def test_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(FileExistsError):
        build_tiny_sdxl(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_default_tiny_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path))
    assert default_tiny_path() == tmp_path / "tiny-sdxl"
    monkeypatch.delenv("FASTDIFF_CACHE")
    assert default_tiny_path() == Path.home() / ".cache" / "fastdiff" / "tiny-sdxl"


def test_generates_image(pipe: StableDiffusionXLPipeline) -> None:
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder_2.dtype == torch.float32
    image = pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()


@pytest.mark.parametrize("name", ["tokenizer", "tokenizer_2"])
def test_tokenizers(pipe: StableDiffusionXLPipeline, name: str) -> None:
    tokenizer = getattr(pipe, name)
    config = getattr(pipe, name.replace("tokenizer", "text_encoder")).config
    assert tokenizer.model_max_length == 77
    assert len(tokenizer) == config.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config.bos_token_id, config.eos_token_id)
    assert tokenizer.pad_token_id == config.pad_token_id
    ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT


def test_tokenizer_pads_like_sdxl(pipe: StableDiffusionXLPipeline) -> None:
    assert pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.tokenizer_2.pad_token == "!"


@pytest.mark.parametrize("name", ["tokenizer", "tokenizer_2"])
def test_vocab_files_match(checkpoint: Path, tmp_path: Path, name: str) -> None:
    """vocab.json + merges.txt alone (no tokenizer.json) give the same tokenizer."""
    legacy = shutil.copytree(checkpoint / name, tmp_path / name, ignore=lambda *_: ["tokenizer.json"])
    full = CLIPTokenizer.from_pretrained(checkpoint / name)
    files_only = CLIPTokenizer.from_pretrained(legacy)
    text = "the cat and a dog, sitting in 2 photos!"
    assert files_only(text).input_ids == full(text).input_ids
    assert files_only.pad_token_id == full.pad_token_id


def test_pooled_output_at_eos(pipe: StableDiffusionXLPipeline) -> None:
    tokenizer, encoder = pipe.tokenizer_2, pipe.text_encoder_2
    enc = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids = enc.input_ids
    eos = ids[0].tolist().index(tokenizer.eos_token_id)
    assert eos < 76  # padded with "!" afterwards, so the last position is not the eos
    with torch.no_grad():
        out = encoder(ids)
        expected = encoder.text_projection(out.last_hidden_state[0, eos])
    torch.testing.assert_close(out.text_embeds[0], expected)
    assert not torch.allclose(out.text_embeds[0], encoder.text_projection(out.last_hidden_state[0, -1]))


def _parameter_counts(arch: dict) -> dict[str, int]:
    from fastdiff.exporter.random_models import _build_pipeline

    with torch.device("meta"):  # shapes only: no memory, no init time
        pipe = _build_pipeline(arch, 0)
    return {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2")
        if getattr(pipe, name, None) is not None
    }


def test_benchmark_architectures_have_the_published_sizes() -> None:
    """The random-weight benchmark models are the real architectures: SDXL base against the verified counts in its
    config file; SSD-1B, SD 1.5 and PixArt-XL-2 against their published parameter counts."""
    from fastdiff.exporter.random_models import pixart_xl_arch, sd15_arch, sdxl_base_arch, ssd_1b_arch

    sdxl = sdxl_base_arch()
    expected = {k: v for k, v in sdxl["parameter_counts"].items() if k != "vae_decoder"}
    assert _parameter_counts(sdxl) == expected
    assert _parameter_counts(sd15_arch()) == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    pixart = _parameter_counts(pixart_xl_arch())
    assert pixart["transformer"] == 611_349_152  # PixArt-α XL-2: "0.6B"
    assert 4.7e9 < pixart["text_encoder"] < 4.8e9  # T5 v1.1 XXL's encoder
    ssd = _parameter_counts(ssd_1b_arch())
    assert 1.3e9 < ssd.pop("unet") < 1.35e9  # SSD-1B: "1.3B"
    assert ssd == {k: v for k, v in expected.items() if k != "unet"}  # SDXL's text encoders and VAE


def test_ssd_1b_unet_is_the_reference_layout() -> None:
    """ssd_1b_arch's UNet, read back in the form of the table it was taken from (ComfyUI's SSD_1B): transformer layers
    per down-path resnet, per up-path resnet from the highest resolution up (each block's layers last to first),
    and -1 for a mid block of one resnet without attention."""
    from diffusers import UNet2DConditionModel

    from fastdiff.exporter.random_models import ssd_1b_arch

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ssd_1b_arch()["unet"])

    def depths(block) -> list[int]:
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        return [len(a.transformer_blocks) if a is not None else 0 for a in attentions]

    down = [d for block in unet.down_blocks for d in depths(block)]
    up = [d for block in reversed(unet.up_blocks) for d in reversed(depths(block))]
    mid = -1 if len(unet.mid_block.resnets) == 1 and not getattr(unet.mid_block, "attentions", None) else None
    assert (down, up, mid) == ([0, 0, 2, 2, 4, 4], [0, 0, 0, 1, 1, 2, 10, 4, 4], -1)
