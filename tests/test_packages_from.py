"""`fastdiff-export MODEL --packages-from ART`: another checkpoint of ART's architecture gets an artifact with ART's
packages, byte for byte, and its own weights, compiling nothing; a checkpoint that does not fit them is refused,
naming the first tensor that differs."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import assert_matches_diffusers, invoke_cli
from helpers import assert_export_refused, export
from safetensors.torch import load_file, save_file

from fastdiff.runtime import load_pipeline
from fastdiff.runtime.format import MANIFEST_NAME, describe_files, read_manifest


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory, fastdiff_cache: Path) -> Path:
    """A fine-tune, as far as the packages can tell: the tiny SDXL architecture with other (random) weights."""
    from fastdiff.exporter.random_models import TINY_ARCH, build_random_checkpoint

    return build_random_checkpoint(tmp_path_factory.mktemp("other") / "checkpoint", TINY_ARCH, seed=7)


@pytest.fixture(scope="module")
def reused(tmp_path_factory: pytest.TempPathFactory, tiny_artifact: Path, other_checkpoint: Path) -> tuple[Path, float]:
    """(the other checkpoint's artifact made with the tiny artifact's packages, the seconds that took)."""
    out = tmp_path_factory.mktemp("reused") / "fine-tune"
    start = time.perf_counter()
    proc = invoke_cli(
        "fastdiff-export", str(other_checkpoint), "--packages-from", str(tiny_artifact), "--out", str(out)
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "torch.export" not in proc.stderr and "AOTInductor" not in proc.stderr  # nothing compiled
    return out, seconds


def test_packages_are_the_source_artifacts(reused: tuple[Path, float], tiny_artifact: Path) -> None:
    out, seconds = reused
    mine, source = read_manifest(out), read_manifest(tiny_artifact)
    packages = [rel for c in (source.unet, source.vae_decoder, *source.text_encoders) for rel in c.packages.values()]
    assert len(packages) == 6  # two resolutions of the UNet and the VAE decoder, two text encoders
    for rel in packages:
        assert (out / rel).read_bytes() == (tiny_artifact / rel).read_bytes(), rel
        assert mine.files[rel] == source.files[rel]
    for component in ("unet", "vae_decoder", "text_encoder", "text_encoder_2"):  # its own weights
        rel = f"{component}/weights.safetensors"
        assert mine.files[rel]["sha256"] != source.files[rel]["sha256"], rel
    assert (mine.options, mine.device, mine.batch_size, mine.dtype) == (
        source.options,
        source.device,
        source.batch_size,
        source.dtype,
    )
    assert seconds < 60, f"took {seconds:.0f} s"  # a full export of it compiles 6 packages: minutes on 2 cores


def test_the_manifest_says_where_the_packages_came_from(reused: tuple[Path, float], tiny_artifact: Path) -> None:
    out, _ = reused
    source = json.loads((out / MANIFEST_NAME).read_text())["source"]
    assert source["packages_from"]["artifact"] == str(tiny_artifact.absolute())
    assert source["packages_from"]["source"] == read_manifest(tiny_artifact).source


def test_matches_diffusers_on_the_fine_tune(reused: tuple[Path, float], other_checkpoint: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = load_pipeline(reused[0], device="cpu")
    reference = StableDiffusionXLPipeline.from_pretrained(other_checkpoint)
    for p in (pipe, reference):
        p.set_progress_bar_config(disable=True)
    assert_matches_diffusers(pipe, reference)
    assert_matches_diffusers(pipe, reference, height=64, width=96, num_images_per_prompt=2)


def test_the_same_checkpoint_gives_the_same_weights(tiny_artifact: Path, tmp_path: Path) -> None:
    """Reusing an artifact's packages for its own checkpoint writes the weight files its full export wrote."""
    proc = invoke_cli("fastdiff-export", "tiny-sdxl", "--packages-from", str(tiny_artifact), "--out", f"{tmp_path}/a")
    assert proc.returncode == 0, proc.stderr
    for component in ("unet", "vae_decoder", "text_encoder", "text_encoder_2"):
        rel = f"{component}/weights.safetensors"
        assert (tmp_path / "a" / rel).read_bytes() == (tiny_artifact / rel).read_bytes(), rel


def _damaged(tiny_artifact: Path, exports: Path) -> Path:
    art = Path(shutil.copytree(tiny_artifact, exports.parent / "damaged"))
    (art / "unet" / "64x64.pt2").unlink()
    return art


def _package_changed(tiny_artifact: Path, exports: Path) -> Path:
    """A package changed in place at its size, the manifest left as it was: no new manifest may vouch for it."""
    art = Path(shutil.copytree(tiny_artifact, exports.parent / "changed"))
    package = art / "vae_decoder" / "64x64.pt2"
    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 0xFF
    package.write_bytes(bytes(data))
    return art


def _older(tiny_artifact: Path, exports: Path) -> Path:
    """The artifact as an older fastdiff wrote it: Inductor compiled the UNet's 4-value conv_out bias into the code,
    so the weight file lacks it."""
    art = Path(shutil.copytree(tiny_artifact, exports.parent / "older"))
    weights = art / "unet" / "weights.safetensors"
    tensors = load_file(weights)
    del tensors["unet.conv_out.bias"]
    save_file(tensors, weights, metadata={"format": "pt"})
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["files"] = describe_files(art)
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    return art


def _unrecorded(tiny_artifact: Path, exports: Path) -> Path:
    """An artifact exported before the manifest recorded its compiled components' configs."""
    art = Path(shutil.copytree(tiny_artifact, exports.parent / "unrecorded"))
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    del manifest["options"]["architecture"]
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    return art


def _reconfigured(component: str, key: str, value: object) -> Callable[[Path, Path, Path], tuple[Path, Path]]:
    """The tiny checkpoint with one config value changed: every weight fits the packages, but their code computes
    with the old value."""

    def make(art: Path, distilled: Path, exports: Path) -> tuple[Path, Path]:
        from fastdiff.exporter.presets import PRESETS

        checkpoint = Path(shutil.copytree(PRESETS["tiny-sdxl"].build(), exports.parent / f"{component}-{key}"))
        config = checkpoint / component / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), key: value}))
        return checkpoint, art

    return make


REFUSALS = {  # case -> (MODEL and ART from the tiny artifact, the distilled checkpoint, the exports folder; phrases)
    "another family": (
        lambda art, distilled, exports: ("tiny-sd", art),
        "tiny-sd is of family sd; ",
        "an artifact of family sdxl",
    ),
    "another architecture": (
        lambda art, distilled, exports: (distilled, art),
        "'s unet has mid_block_type 'UNetMidBlock2D'; ",
        "packages were compiled for 'UNetMidBlock2DCrossAttn'",
        "a full export is needed",
    ),
    "another unet config": (
        _reconfigured("unet", "norm_eps", 0.01),
        "'s unet has norm_eps 0.01;",
        "packages were compiled for 1e-05",
        "a full export is needed",
    ),
    "another text encoder config": (
        _reconfigured("text_encoder", "hidden_act", "gelu"),
        "'s text_encoder has hidden_act 'gelu';",
        "compiled for 'quick_gelu'",
    ),
    "an artifact that does not record its configuration": (
        lambda art, distilled, exports: ("tiny-sdxl", _unrecorded(art, exports)),
        "does not record the configuration its packages were compiled for",
    ),
    "not an artifact": (lambda art, distilled, exports: ("tiny-sdxl", exports), "is not a fastdiff artifact"),
    "an older artifact": (
        lambda art, distilled, exports: ("tiny-sdxl", _older(art, exports)),
        "packages have their unet weight unet.conv_out.bias compiled into their code",
    ),
    "a damaged artifact": (
        lambda art, distilled, exports: ("tiny-sdxl", _damaged(art, exports)),
        "is damaged: unet/64x64.pt2: missing",
    ),
    "a package changed since its export": (
        lambda art, distilled, exports: ("tiny-sdxl", _package_changed(art, exports)),
        "vae_decoder/64x64.pt2 does not match the sha256 in its manifest",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refused(case: str, tiny_artifact: Path, distilled_checkpoint: Path, exports: Path) -> None:
    make, *phrases = REFUSALS[case]
    model, art = make(tiny_artifact, distilled_checkpoint, exports)
    proc, seconds = export(str(model), "--packages-from", str(art), "--out", str(exports / "a"))
    assert_export_refused(proc, seconds, exports, *phrases)
    assert not (exports / "a").exists()


@pytest.mark.parametrize("flag", [("--res", "64"), ("--quantize", "none"), ("--dtype", "fp32"), ("--batch-size", "2")])
def test_options_the_packages_fix_are_refused(flag: tuple[str, str], tiny_artifact: Path, exports: Path) -> None:
    proc, seconds = export("tiny-sdxl", "--packages-from", str(tiny_artifact), *flag, "--out", str(exports / "a"))
    assert_export_refused(proc, seconds, exports, f"{flag[0]} cannot be combined with --packages-from")
