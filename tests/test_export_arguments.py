"""fastdiff-export's arguments (model, resolutions, device, passes, quantization, Inductor settings) are refused in
seconds, before anything is compiled, and leave nothing behind; through the Python API too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import INVALID_RES, assert_export_refused, export, tree

from fastdiff.runtime import FastDiffError


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_export_device_cuda_without_gpu(exports: Path) -> None:
    proc, seconds = export("tiny-sdxl", "--res", "64", "--device", "cuda", "--out", str(exports / "a"))
    assert_export_refused(proc, seconds, exports, "no CUDA GPU is visible")
    assert list(exports.iterdir()) == []


def test_export_unknown_model(exports: Path) -> None:
    proc, seconds = export("no-such-model", "--res", "64", "--device", "cpu", "--out", str(exports / "a"))
    assert_export_refused(proc, seconds, exports, "unknown model 'no-such-model'", "tiny-sdxl")
    assert list(exports.iterdir()) == []


def test_export_hub_id_offline_not_cached(exports: Path, tmp_path: Path) -> None:
    hf_home = tmp_path / "hf-home"
    hf_home.mkdir()
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub")}
    proc, seconds = export(
        "some-org/some-model", "--res", "64", "--device", "cpu", "--out", str(exports / "a"), env=env
    )
    assert_export_refused(proc, seconds, exports, "cannot load some-org/some-model", "Hugging Face cache")
    assert list(exports.iterdir()) == []


def test_export_folder_without_model_index(exports: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    (checkpoint / "unet").mkdir(parents=True)
    (checkpoint / "unet" / "config.json").write_text("{}")
    proc, seconds = export(str(checkpoint), "--res", "64", "--device", "cpu", "--out", str(exports / "a"))
    assert_export_refused(proc, seconds, exports, "no model_index.json")
    assert list(exports.iterdir()) == []
    assert tree(checkpoint) == {"unet/config.json": b"{}"}


@pytest.mark.parametrize(("res", "phrase"), INVALID_RES)
def test_export_invalid_res(exports: Path, res: str, phrase: str) -> None:
    proc, seconds = export("tiny-sdxl", "--res", res, "--device", "cpu", "--out", str(exports / "a"))
    assert_export_refused(proc, seconds, exports, phrase)
    assert list(exports.iterdir()) == []


def test_export_batch_size_zero(exports: Path) -> None:
    proc, seconds = export("tiny-sdxl", "--res", "64", "--batch-size", "0", "--device", "cpu", "--out", f"{exports}/a")
    assert_export_refused(proc, seconds, exports, "--batch-size must be at least 1")
    assert list(exports.iterdir()) == []


def test_export_unknown_pass(exports: Path) -> None:
    proc, seconds = export("tiny-sdxl", "--res", "64", "--passes", "sdpa,bogus", "--out", str(exports / "a"))
    assert_export_refused(proc, seconds, exports, "unknown pass 'bogus'")
    assert "[fastdiff-export] loading" not in proc.stderr  # refused before the (possibly downloaded) model is loaded
    assert list(exports.iterdir()) == []


def test_export_unknown_inductor_config(exports: Path) -> None:
    proc, seconds = export("tiny-sdxl", "--res", "64", "--inductor-config", "max_autotun=1", "--out", f"{exports}/a")
    assert_export_refused(proc, seconds, exports, "unknown inductor config 'max_autotun'", "did you mean max_autotune?")
    assert list(exports.iterdir()) == []


def test_export_inductor_config_for_a_missing_component(exports: Path) -> None:
    args = ("--res", "64", "--device", "cpu", "--out", f"{exports}/a")
    proc, seconds = export("tiny-sd", *args, "--inductor-config", "text_encoder_2:max_autotune=true")
    assert_export_refused(proc, seconds, exports, "tiny-sd has no text_encoder_2 to compile")
    assert list(exports.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp8's requirement is only checked on a CPU-only machine here")
def test_export_fp8_on_cpu(exports: Path) -> None:
    proc, seconds = export("tiny-sdxl", "--res", "64", "--device", "cpu", "--quantize", "fp8", "--out", f"{exports}/a")
    assert_export_refused(proc, seconds, exports, "fp8 needs a CUDA GPU of compute capability 8.9")
    assert list(exports.iterdir()) == []


def test_export_pixart_resolution_of_partial_patches(exports: Path) -> None:
    """72 is a multiple of the VAE's 8, but its 9x9 latents are not whole 2x2 patches: the transformer would return
    8x8 and the artifact fail at run time."""
    proc, seconds = export("tiny-pixart", "--res", "72", "--device", "cpu", "--out", str(exports / "a"))
    assert_export_refused(proc, seconds, exports, "72x72 is not a multiple of 16", "2x2 patches")
    assert list(exports.iterdir()) == []


def test_export_quantization_named_as_a_pass(exports: Path) -> None:
    proc, seconds = export("tiny-sdxl", "--passes", "sdpa,int8", "--device", "cpu", "--out", f"{exports}/a")
    assert_export_refused(proc, seconds, exports, "--passes int8: quantization is chosen with --quantize")
    assert list(exports.iterdir()) == []


def test_export_quantize_linears_without_quantization(exports: Path) -> None:
    args = ("--device", "cpu", "--quantize", "none", "--quantize-linears", "ff.net.0.proj", "--out", f"{exports}/a")
    proc, seconds = export("tiny-sdxl", "--res", "64", *args)
    assert_export_refused(proc, seconds, exports, "--quantize-linears names linears to quantize, but no quantization")
    assert list(exports.iterdir()) == []


def test_export_quantize_linears_names_nothing(exports: Path) -> None:
    pytest.importorskip("torchao")
    names = "ff.net.0.proj,attn9.to_qkv"
    args = ("--device", "cpu", "--quantize", "int8", "--quantize-linears", names, "--out", f"{exports}/a")
    proc, seconds = export("tiny-sdxl", "--res", "64", *args)
    assert_export_refused(proc, seconds, exports, "no linear the UNet2DConditionModel runs is named 'attn9.to_qkv'")
    assert list(exports.iterdir()) == []


# The same checks through the Python API, in-process (cheap: no subprocess start).


def test_export_api_errors(exports: Path, tmp_path: Path) -> None:
    from fastdiff.exporter.export import ExportOptions, export_artifact
    from fastdiff.runtime import parse_resolution

    def options(**kw) -> ExportOptions:
        base = {"model": "tiny-sdxl", "resolutions": [parse_resolution(64)], "device": torch.device("cpu")}
        return ExportOptions(**{**base, "out": exports / "a", **kw})

    with pytest.raises(FastDiffError, match="--batch-size must be at least 1"):
        export_artifact(options(batch_size=0))
    with pytest.raises(FastDiffError, match="no resolution given"):
        export_artifact(options(resolutions=[]))
    with pytest.raises(FastDiffError, match="unknown model"):
        export_artifact(options(model="no-such-model"))
    with pytest.raises(FastDiffError, match="unknown pass 'bogus'"):
        export_artifact(options(passes=["bogus"]))
    with pytest.raises(FastDiffError, match="passes int8, fp8: one quantization at a time"):
        export_artifact(options(passes=["sdpa", "int8", "fp8"]))
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FastDiffError, match="no model_index.json"):
        export_artifact(options(model=str(tmp_path / "ckpt")))
    (tmp_path / "sd_xl_base_1.0.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(FastDiffError, match="is a single file") as refused:
        export_artifact(options(model=str(tmp_path / "sd_xl_base_1.0.safetensors")))
    assert "from_single_file(file).save_pretrained(folder)" in refused.value.fix
    (exports / "mine").mkdir()
    (exports / "mine" / "notes.txt").write_text("mine")  # an empty folder would be replaced
    with pytest.raises(FastDiffError, match="not a fastdiff artifact"):
        export_artifact(options(out=exports / "mine", overwrite=True))
    # Other projects write a manifest.json too (browser extensions, web apps): not an artifact either.
    (exports / "extension").mkdir()
    (exports / "extension" / "manifest.json").write_text('{"manifest_version": 3}')
    (exports / "extension" / "background.js").write_text("mine")
    with pytest.raises(FastDiffError, match="not a fastdiff artifact"):
        export_artifact(options(out=exports / "extension", overwrite=True))
    assert (exports / "extension" / "background.js").read_text() == "mine"
    with pytest.raises(FastDiffError, match="unknown model"):  # fails after the target's folders were made
        export_artifact(options(model="no-such-model", out=exports / "new" / "deeper" / "a"))
    assert sorted(p.name for p in exports.iterdir()) == ["extension", "mine"]
