"""The artifact format: what manifest.json records about the session artifact, and that it round-trips."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import EXPORT_RESOLUTIONS
from safetensors import safe_open

from fastdiff.runtime import FORMAT_VERSION, Manifest, Resolution, parse_resolution, read_manifest
from fastdiff.runtime.format import MANIFEST_NAME

STOCK = ["scheduler", "tokenizer", "tokenizer_2"]  # and the text encoders, where they are not compiled


def compiled_components(manifest: Manifest) -> list:
    return [manifest.unet, manifest.vae_decoder, *getattr(manifest, "text_encoders", [])]


@pytest.fixture(scope="module")
def manifest(tiny_artifact: Path) -> Manifest:
    return read_manifest(tiny_artifact)


def test_round_trip(tiny_artifact: Path, manifest: Manifest) -> None:
    again = Manifest.from_dict(json.loads(manifest.to_json()))
    assert again == manifest
    assert again.to_json() == manifest.to_json()
    assert json.loads((tiny_artifact / MANIFEST_NAME).read_text()) == json.loads(manifest.to_json())


def test_round_trip_detects_a_change(manifest: Manifest) -> None:
    data = json.loads(manifest.to_json())
    data["model"]["scaling_factor"] = 0.18215
    assert Manifest.from_dict(data) != manifest


def test_build_record(manifest: Manifest) -> None:
    assert manifest.format == "fastdiff-artifact"
    assert manifest.format_version == FORMAT_VERSION
    assert manifest.source["model"] == "tiny-sdxl"
    assert manifest.source.get("preset") == "tiny-sdxl"
    assert manifest.resolutions == [Resolution(64, 64), Resolution(96, 64)]
    assert manifest.resolutions == sorted(parse_resolution(r) for r in EXPORT_RESOLUTIONS)
    assert manifest.batch_size == 2
    assert manifest.unet.max_batch == 4  # conditional and unconditional halves
    assert manifest.vae_decoder.max_batch == 2
    assert manifest.dtype == manifest.unet.dtype == manifest.vae_decoder.dtype == "fp32"
    assert manifest.options["passes"] == ["sdpa", "fuse_qkv", "channels_last"]
    assert manifest.options["vae_passes"] == ["sdpa", "fuse_qkv", "channels_last"]
    assert manifest.unet.channels_last and manifest.vae_decoder.channels_last  # conv weights stored NHWC
    assert manifest.options["attention"] == {p: "default" for p in manifest.files if p.endswith(".pt2")}
    assert manifest.options["inductor"] == {"force_layout_optimization": True}  # the channels_last pass
    assert manifest.versions["torch"] == torch.__version__
    for dist in ("diffusers", "transformers", "fastdiff"):
        assert manifest.versions[dist], dist
    assert manifest.device["type"] == "cpu"
    assert manifest.device["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    assert manifest.created  # an ISO timestamp
    assert set(STOCK) <= set(manifest.stock)
    text_encoders = ["text_encoder", "text_encoder_2"]
    if compiled_components(manifest)[2:]:  # compiled text encoders, one weight file and package each
        assert [c.weights for c in manifest.text_encoders] == [f"{n}/weights.safetensors" for n in text_encoders]
        assert not set(text_encoders) & set(manifest.stock)
    else:  # stock transformers text encoders
        assert set(text_encoders) <= set(manifest.stock)


def test_model_facts(manifest: Manifest) -> None:
    facts = manifest.model
    assert facts.family == "sdxl"
    assert facts.latent_channels == 4
    assert facts.vae_scale_factor == 8
    assert facts.scaling_factor == pytest.approx(0.13025)
    assert facts.force_zeros_for_empty_prompt is True
    assert len(facts.time_ids) == 6
    assert facts.time_ids[0] == "original_height" and facts.time_ids[-1] == "target_width"
    assert facts.text_max_length == 77
    assert facts.pooled_dim > 0


def test_files_match_disk(tiny_artifact: Path, manifest: Manifest) -> None:
    """Every file but the manifest is listed, with its true size and sha256 (recomputed here)."""
    on_disk = {p.relative_to(tiny_artifact).as_posix(): p for p in tiny_artifact.rglob("*") if p.is_file()}
    assert set(on_disk) - set(manifest.files) == {MANIFEST_NAME}
    for rel, entry in manifest.files.items():
        data = on_disk[rel].read_bytes()
        assert entry["size"] == len(data), rel
        assert entry["sha256"] == hashlib.sha256(data).hexdigest(), rel
    for comp in compiled_components(manifest):
        assert comp.weights in manifest.files
        assert all(rel in manifest.files for rel in comp.packages.values())
    for folder in manifest.stock.values():
        assert any(rel.startswith(f"{folder}/") for rel in manifest.files), folder


def test_packages_share_one_weight_file(tiny_artifact: Path, manifest: Manifest) -> None:
    """One code-only package per resolution; all bind the component's single safetensors file."""
    from fastdiff.exporter.compile import package_constant_names

    for comp, name in ((manifest.unet, "unet"), (manifest.vae_decoder, "vae_decoder")):
        assert comp.weights == f"{name}/weights.safetensors"
        assert sorted(comp.packages) == ["64x64", "96x64"]
        assert sorted(comp.packages.values()) == [f"{name}/64x64.pt2", f"{name}/96x64.pt2"]
        assert [rel for rel in manifest.files if rel.startswith(f"{name}/") and rel.endswith(".safetensors")] == [
            comp.weights
        ]
        with safe_open(tiny_artifact / comp.weights, framework="pt") as f:
            stored = set(f.keys())
        needed = []
        for rel in comp.packages.values():
            entries = zipfile.ZipFile(tiny_artifact / rel).namelist()
            assert not [e for e in entries if "constants" in e or e.endswith((".bin", ".safetensors"))], entries
            needed.append(set(package_constant_names(tiny_artifact / rel, torch.device("cpu"))))
        assert needed[0] == needed[1], f"{name}: resolutions bind different weights"
        assert needed[0] and needed[0] <= stored, f"{name}: weights missing from {comp.weights}"


def test_no_temp_folders(tiny_artifact: Path) -> None:
    assert [p.name for p in tiny_artifact.parent.iterdir()] == [tiny_artifact.name]
    assert not [p for p in tiny_artifact.rglob(".*")], "hidden temp files inside the artifact"
