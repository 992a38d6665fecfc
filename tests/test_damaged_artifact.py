"""A missing, damaged or hand-edited artifact (its folder, manifest, weights, packages, tokenizer, scheduler config)
is refused with its fault named, by fastdiff-run, fastdiff-inspect and load_pipeline alike."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import invoke_cli
from helpers import assert_clean_error, copy_artifact, edit_manifest, images_in, reseal, run, tree

from fastdiff.runtime import FastDiffError, load_pipeline, read_manifest
from fastdiff.runtime.format import MANIFEST_NAME, sha256_file

UNET_WEIGHTS = "unet/weights.safetensors"


def assert_refused_everywhere(
    target: Path, tmp_path: Path, phrase: str, *more: str, run_args: tuple = (), inspect_args: tuple = ()
) -> None:
    """The same problem refused cleanly by fastdiff-run (naming `phrase` and `more`), fastdiff-inspect and
    load_pipeline (both naming `phrase`)."""
    assert_clean_error(run(target, tmp_path, *run_args), phrase, *more)
    assert_clean_error(invoke_cli("fastdiff-inspect", str(target), *inspect_args), phrase)
    with pytest.raises(FastDiffError, match=re.escape(phrase)):
        load_pipeline(target, device="cpu")


# artifact folder -------------------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert_refused_everywhere(missing, tmp_path, "does not exist", str(missing))
    assert images_in(tmp_path) == []


def test_folder_without_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert_refused_everywhere(folder, tmp_path, "manifest.json is missing", "not a fastdiff artifact")
    assert tree(folder) == {"notes.txt": b"mine"}


def test_file_instead_of_folder(tiny_artifact: Path, tmp_path: Path) -> None:
    file = tiny_artifact / MANIFEST_NAME
    assert_refused_everywhere(file, tmp_path, "is not a folder")


# the manifest ----------------------------------------------------------------------------------------


def test_manifest_invalid_json(tiny_artifact: Path, tmp_path: Path) -> None:
    art = copy_artifact(tiny_artifact, tmp_path)
    (art / MANIFEST_NAME).write_text('{"format": "fastdiff-artifact", ')
    assert_refused_everywhere(art, tmp_path, "not valid JSON")


def test_manifest_nested_too_deep(tiny_artifact: Path, tmp_path: Path) -> None:
    art = copy_artifact(tiny_artifact, tmp_path)
    (art / MANIFEST_NAME).write_text("[" * 100_000)
    assert_refused_everywhere(art, tmp_path, "not valid JSON")


def _drop_inputs(component: dict[str, Any], kept: int) -> None:
    """Its inputs after the first `kept` gone from the manifest, their records too: the package still takes them."""
    component["inputs"] = component["inputs"][:kept]
    component["input_dtypes"] = component["input_dtypes"][:kept]
    for shapes in component["input_shapes"].values():
        del shapes[kept:]


def _rename_package(data: dict[str, Any], old: str, new: str) -> None:
    for component in ("unet", "vae_decoder"):
        data[component]["packages"][new] = data[component]["packages"].pop(old)


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        (lambda d: d["unet"]["channels_last"].append("nope.weight"), "names nope.weight as a channels_last weight"),
        (lambda d: _drop_inputs(d["unet"], 3), "takes 5 inputs; the manifest lists 3"),
        (lambda d: _rename_package(d, "64x64", "100x100"), "package '100x100': invalid resolution"),
    ],
    ids=["channels-last-name", "inputs", "package-key"],
)
def test_manifest_that_parses_but_does_not_match_its_files(
    tiny_artifact: Path, tmp_path: Path, edit, phrase: str
) -> None:
    """A hand-edited manifest that is still well-formed: refused with the artifact's fault named, not a KeyError or
    a tensor-shape error from deep inside the load."""
    art = copy_artifact(tiny_artifact, tmp_path)
    edit_manifest(art, edit)
    assert_clean_error(run(art, tmp_path, "--res", "96x64"), phrase, "export the model again")
    assert images_in(tmp_path) == []


def test_manifest_not_utf8(tiny_artifact: Path, tmp_path: Path) -> None:
    art = copy_artifact(tiny_artifact, tmp_path)
    (art / MANIFEST_NAME).write_bytes(b"\xff\xfe\x00garbage")
    assert_clean_error(invoke_cli("fastdiff-inspect", str(art)), "not valid JSON")


def test_manifest_newer_format(tiny_artifact: Path, tmp_path: Path) -> None:
    art = copy_artifact(tiny_artifact, tmp_path)
    edit_manifest(art, lambda d: d.update(format_version=d["format_version"] + 1))
    assert_refused_everywhere(art, tmp_path, "newer than this fastdiff reads", "upgrade fastdiff")


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        (lambda d: d.pop("unet"), "'unet' is missing"),
        (lambda d: d.pop("device"), "device"),
        (lambda d: d["model"].pop("latent_channels"), "latent_channels"),
        (lambda d: d["device"].pop("type"), "device.type is missing"),
        (lambda d: d["versions"].pop("torch"), "versions.torch is missing"),
        (lambda d: d["files"][UNET_WEIGHTS].pop("size"), f"files entry {UNET_WEIGHTS}"),
        (lambda d: d["files"].pop(UNET_WEIGHTS), f"{UNET_WEIGHTS} is not listed under files"),
        (lambda d: d.update(stock={}), "stock lacks"),
        (lambda d: d.update(device="cpu"), "device is not an object"),
        (lambda d: d.update(batch_size=0), "batch_size 0 is not a positive integer"),
        (lambda d: d.pop("format"), "not a fastdiff manifest"),
        (lambda d: d.pop("format_version"), "no valid format_version"),
        (lambda d: d["vae_decoder"].update(dtype="fp8"), "vae_decoder.dtype 'fp8' is not one of"),
        (lambda d: d["model"].update(default_guidance_scale=None), "default_guidance_scale is not a number"),
        (lambda d: d["model"].update(default_resolution=[128]), "default_resolution [128] is not [width, height]"),
        (lambda d: d["model"].update(latents_std="x"), "model.latents_std is not a list of numbers or null"),
        (lambda d: d["unet"].update(inputs=[1]), "unet.inputs is not a list of strings"),
        (lambda d: d["text_encoders"].pop(), "text_encoders lists 1; a sdxl model has 2"),
    ],
    ids=[
        "no-unet",
        "no-device",
        "no-model-latent_channels",
        "no-device-type",
        "no-versions-torch",
        "no-file-size",
        "file-not-listed",
        "empty-stock",
        "device-not-object",
        "batch-size-0",
        "no-format",
        "no-format-version",
        "vae-dtype",
        "guidance-null",
        "resolution-one-number",
        "latents-std-string",
        "inputs-not-strings",
        "one-text-encoder",
    ],
)
def test_manifest_missing_or_bad_key(tiny_artifact: Path, tmp_path: Path, edit, phrase: str) -> None:
    art = copy_artifact(tiny_artifact, tmp_path)
    edit_manifest(art, edit)
    with pytest.raises(FastDiffError, match="export") as info:
        read_manifest(art)
    assert phrase in str(info.value)
    with pytest.raises(FastDiffError, match=re.escape(phrase)):
        load_pipeline(art, device="cpu")


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        (lambda d: d.pop("unet"), "'unet' is missing"),
        (lambda d: d["device"].pop("type"), "device.type is missing"),
        (lambda d: d["files"][UNET_WEIGHTS].pop("sha256"), f"files entry {UNET_WEIGHTS}"),
        (lambda d: d["unet"].update(weights=[UNET_WEIGHTS]), "unet.weights is not a string"),  # read ahead first
    ],
    ids=["no-unet", "no-device-type", "no-file-sha256", "weights-not-a-string"],
)
def test_manifest_missing_key_cli(tiny_artifact: Path, tmp_path: Path, edit, phrase: str) -> None:
    art = copy_artifact(tiny_artifact, tmp_path)
    edit_manifest(art, edit)
    assert_clean_error(run(art, tmp_path), phrase, "export the model again")
    assert_clean_error(invoke_cli("fastdiff-inspect", str(art), "--verify"), phrase)
    assert images_in(tmp_path) == []


# damaged files ---------------------------------------------------------------------------------------


def test_truncated_weights(tiny_artifact: Path, tmp_path: Path) -> None:
    art = copy_artifact(tiny_artifact, tmp_path)
    weights = art / UNET_WEIGHTS
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert_clean_error(run(art, tmp_path), UNET_WEIGHTS, "truncated")
    for verify in ((), ("--verify",)):  # sizes are checked without --verify too, as a load checks them
        proc = invoke_cli("fastdiff-inspect", str(art), *verify)
        assert_clean_error(proc, UNET_WEIGHTS, "do not match the manifest")
        assert re.search(r"^loads here\s+no: 1 of \d+ files do not match the manifest$", proc.stdout, re.M)
    with pytest.raises(FastDiffError, match="truncated"):
        load_pipeline(art, device="cpu")  # the size check, without verify
    assert images_in(tmp_path) == []


def test_corrupted_weights_same_size(tiny_artifact: Path, tmp_path: Path) -> None:
    art = copy_artifact(tiny_artifact, tmp_path)
    weights = art / UNET_WEIGHTS
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2  # far past the header: tensor bytes
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    weights.write_bytes(bytes(data))
    assert weights.stat().st_size == (tiny_artifact / UNET_WEIGHTS).stat().st_size

    proc = invoke_cli("fastdiff-inspect", str(art), "--verify")
    assert_clean_error(proc, UNET_WEIGHTS, "sha256 differs", "1 of")
    assert "verified" not in proc.stdout
    with pytest.raises(FastDiffError, match=f"{UNET_WEIGHTS}: sha256 differs"):
        load_pipeline(art, device="cpu", verify=True)


def test_corrupted_safetensors_header(tiny_artifact: Path, tmp_path: Path) -> None:
    """A damaged header that the size check cannot see (the manifest's size was updated to match)."""
    art = copy_artifact(tiny_artifact, tmp_path)
    weights = art / UNET_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[8:40] = b"#" * 32  # the JSON header starts after its 8-byte length
    weights.write_bytes(bytes(data))
    reseal(art)  # a consistent tamper: what the weights reader itself makes of it
    assert_clean_error(run(art, tmp_path), "cannot read weights", "truncated or corrupted")
    with pytest.raises(FastDiffError, match="cannot read weights"):
        load_pipeline(art, device="cpu")


def test_safetensors_header_length_absurd(tiny_artifact: Path, tmp_path: Path) -> None:
    art = copy_artifact(tiny_artifact, tmp_path)
    weights = art / UNET_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")
    weights.write_bytes(bytes(data))
    reseal(art)
    with pytest.raises(FastDiffError, match="cannot read weights"):
        load_pipeline(art, device="cpu")


def test_missing_package(tiny_artifact: Path, tmp_path: Path) -> None:
    art = copy_artifact(tiny_artifact, tmp_path)
    (art / "unet" / "96x64.pt2").unlink()
    assert_refused_everywhere(
        art,
        tmp_path,
        "unet/96x64.pt2: missing",
        "export the model again",
        run_args=("--res", "64"),
    )


def test_damaged_package(tiny_artifact: Path, tmp_path: Path) -> None:
    """A .pt2 that is not a zip archive (manifest updated to match): the loader's error, not a crash; not updated:
    refused before it is opened, at every load."""
    from fastdiff.runtime.format import sha256_file

    art = copy_artifact(tiny_artifact, tmp_path)
    package = art / "vae_decoder" / "64x64.pt2"
    package.write_bytes(b"not a zip archive" * 100)
    edit_manifest(art, lambda d: d["files"]["vae_decoder/64x64.pt2"].update(size=package.stat().st_size))
    assert_clean_error(run(art, tmp_path, "--res", "64"), "64x64.pt2 does not match the sha256 in its manifest")
    entry = {"size": package.stat().st_size, "sha256": sha256_file(package)}
    edit_manifest(art, lambda d: d["files"]["vae_decoder/64x64.pt2"].update(entry))
    assert_clean_error(run(art, tmp_path, "--res", "64"), "64x64.pt2 is not a package archive")


def rewritten_package(source: Path, out: Path, replace: dict[str, bytes | None], add: str | None = None) -> Path:
    """A copy of package `source` whose members ending in a key of `replace` hold its bytes (None: left out), with
    an empty JSON file beside the library, named as it is but ending in `add` instead of ".so", if `add`."""
    import zipfile

    with zipfile.ZipFile(source) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            suffix = next((k for k in replace if info.filename.endswith(k)), None)
            if suffix is None:
                dst.writestr(info, src.read(info))
            elif replace[suffix] is not None:
                dst.writestr(info, replace[suffix])
            if add and info.filename.endswith(".so"):
                dst.writestr(info.filename.removesuffix(".so") + add, b"{}")
    return out


@pytest.mark.parametrize(
    "replace, add, message",
    [
        ({".so": b"not a library" * 100}, None, "cannot load compiled package .*64x64.pt2: its library: invalid ELF"),
        ({".so": None}, None, "cannot run here: .*64x64.pt2: expected one model library in the archive, found 0"),
        (
            {},
            ".json",
            "cannot run here: .*64x64.pt2: it calls operators outside AOTInductor's C shim",
        ),  # extern kernels
    ],
    ids=["damaged-library", "no-library", "extern-kernels"],
)
@pytest.mark.parametrize("runner", ["capi", ""], ids=["c-interface", "automatic"])
def test_unusable_package_leaves_no_extraction(
    replace: dict,
    add: str | None,
    message: str,
    runner: str,
    tiny_artifact: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A package whose compiled library cannot be opened or run: refused by name (by the C interface, or, where it
    hands the package on, by torch's loader), and the folder it was extracted into is gone."""
    import tempfile

    from fastdiff.runtime.packages import RUNNER_VARIABLE, load_module

    package = rewritten_package(tiny_artifact / "vae_decoder" / "64x64.pt2", tmp_path / "64x64.pt2", replace, add)
    extractions = tmp_path / "tmp"
    extractions.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(extractions))  # where packages are extracted
    monkeypatch.setenv(RUNNER_VARIABLE, runner)
    with pytest.raises(FastDiffError, match=message if runner else r"64x64.pt2"):
        load_module(package, {}, torch.device("cpu"))
    assert list(extractions.iterdir()) == []


def test_tokenizer_without_padding(tiny_artifact: Path, tmp_path: Path) -> None:
    """A tokenizer.json that does not pad to the compiled text length (an older artifact, or an edited one) would feed
    the compiled encoders the wrong shape: refused at load."""
    from tokenizers import Tokenizer

    art = copy_artifact(tiny_artifact, tmp_path)
    path = art / "tokenizer_2" / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.save(str(path))
    reseal(art)
    with pytest.raises(FastDiffError, match="does not pad and truncate to 77 tokens"):
        load_pipeline(art, device="cpu")


def _edit_scheduler(art: Path, edit: Callable[[dict[str, Any]], object] | None, text: str | None = None) -> None:
    path = art / "scheduler" / "scheduler_config.json"
    if text is None:
        config = json.loads(path.read_text())
        edit(config)
        text = json.dumps(config)
    path.write_text(text)
    reseal(art)


@pytest.mark.parametrize(
    "edit, text, phrase",
    [
        (None, "{not json", "cannot read the scheduler config"),
        (None, '["EulerDiscreteScheduler"]', "cannot read the scheduler config"),
        (lambda c: c.update(num_train_timesteps="many"), None, "cannot load scheduler EulerDiscreteScheduler"),
        (lambda c: c.pop("_class_name"), None, "cannot read the scheduler config"),
        (lambda c: c.update(_class_name="WarpDriveScheduler"), None, "scheduler WarpDriveScheduler is not in the"),
        (lambda c: c.update(beta_schedule="zigzag"), None, "cannot load scheduler EulerDiscreteScheduler"),
    ],
)
def test_bad_scheduler_config(tiny_artifact: Path, tmp_path: Path, edit, text, phrase: str) -> None:
    art = copy_artifact(tiny_artifact, tmp_path)
    _edit_scheduler(art, edit, text)
    with pytest.raises(FastDiffError, match=phrase):
        load_pipeline(art, device="cpu")
    assert_clean_error(run(art, tmp_path, "--res", "64"), phrase)


def test_session_artifact_untouched(tiny_artifact: Path) -> None:
    """The damage above was done to copies."""
    manifest = read_manifest(tiny_artifact)
    for rel in (UNET_WEIGHTS, "unet/96x64.pt2", "vae_decoder/64x64.pt2"):
        assert sha256_file(tiny_artifact / rel) == manifest.files[rel]["sha256"], rel
