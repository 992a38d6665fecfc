"""Bad input gets a clear error, never a traceback, a crash or a half-written artifact; nothing the user had is lost.

Every case runs through the console scripts (a fresh interpreter each: `error: ...` on stderr, non-zero exit) and,
where the Python API has the same entry point, through it (a FastDiffError). Damaged artifacts are copies of the
session artifact, which is never modified.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import invoke_cli, run_cli
from diffusers.callbacks import SDCFGCutoffCallback

from fastdiff.runtime import FastDiffError, load_pipeline, parse_resolution, read_manifest
from fastdiff.runtime import compat as compat_module
from fastdiff.runtime.compat import check_compatible
from fastdiff.runtime.format import MANIFEST_NAME, sha256_file

EXPORTED = "64x64, 96x64"  # how messages list conftest's EXPORT_RESOLUTIONS
UNET_WEIGHTS = "unet/weights.safetensors"
INVALID_RES = [  # --res values every command refuses, and the phrase its error names
    ("100", "not a multiple of 8"),
    ("abc", "invalid resolution 'abc'"),
    ("8x8", "between 64 and 4096"),
    ("99999", "between 64 and 4096"),
    ("0", "between 64 and 4096"),
]


# helpers ---------------------------------------------------------------------------------------------


def assert_clean_error(proc: subprocess.CompletedProcess, *phrases: str, usage: bool = False) -> None:
    """Non-zero exit, `error: ...` on stderr naming the problem, no traceback anywhere.

    usage: click rejected an option value itself; it prints `Error: Invalid value for ...` after a usage line.
    """
    both = proc.stdout + proc.stderr
    assert proc.returncode != 0, both
    assert "Traceback" not in both, both
    assert "error:" in (proc.stderr.lower() if usage else proc.stderr), proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr, f"{phrase!r} not in:\n{proc.stderr}"


def assert_refused_everywhere(
    target: Path, tmp_path: Path, phrase: str, *more: str, run_args: tuple = (), inspect_args: tuple = ()
) -> None:
    """The same problem refused cleanly by fastdiff-run (naming `phrase` and `more`), fastdiff-inspect and
    load_pipeline (both naming `phrase`)."""
    assert_clean_error(run(target, tmp_path, *run_args), phrase, *more)
    assert_clean_error(invoke_cli("fastdiff-inspect", str(target), *inspect_args), phrase)
    with pytest.raises(FastDiffError, match=re.escape(phrase)):
        load_pipeline(target, device="cpu")


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its content, to check that a refused command changed nothing."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def copy_artifact(artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "art"))


def edit_manifest(root: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    path = root / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def run(artifact: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """fastdiff-run with a cheap request (1 step), writing into tmp_path unless --out is given."""
    out = [] if "--out" in args else ["--out", str(tmp_path / "img.png")]
    return invoke_cli("fastdiff-run", str(artifact), "-p", "a cat", "--steps", "1", "--device", "cpu", *out, *args)


def images_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".png", ".jpg", ".webp"))


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


def _rename_package(data: dict[str, Any], old: str, new: str) -> None:
    for component in ("unet", "vae_decoder"):
        data[component]["packages"][new] = data[component]["packages"].pop(old)


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        (lambda d: d["unet"]["channels_last"].append("nope.weight"), "names nope.weight as a channels_last weight"),
        (lambda d: d["unet"].update(inputs=d["unet"]["inputs"][:3]), "takes 5 inputs; the manifest lists 3"),
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
    edit_manifest(art, lambda d: d["files"][UNET_WEIGHTS].update(size=len(data)))
    assert_clean_error(run(art, tmp_path), "cannot read weights", "truncated or corrupted")
    with pytest.raises(FastDiffError, match="cannot read weights"):
        load_pipeline(art, device="cpu")


def test_safetensors_header_length_absurd(tiny_artifact: Path, tmp_path: Path) -> None:
    art = copy_artifact(tiny_artifact, tmp_path)
    weights = art / UNET_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")
    weights.write_bytes(bytes(data))
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
    """A .pt2 that is not a zip archive (manifest updated to match): the loader's error, not a crash."""
    art = copy_artifact(tiny_artifact, tmp_path)
    package = art / "vae_decoder" / "64x64.pt2"
    package.write_bytes(b"not a zip archive" * 100)
    edit_manifest(art, lambda d: d["files"]["vae_decoder/64x64.pt2"].update(size=package.stat().st_size))
    assert_clean_error(run(art, tmp_path, "--res", "64"), "cannot load compiled package")


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
        ({".so": b"not a library" * 100}, None, "its library: invalid ELF header"),
        ({".so": None}, None, "expected one model library in the archive, found 0"),
        ({}, ".json", "operators outside AOTInductor's C shim"),  # extern kernels, for torch's proxy executor
    ],
    ids=["damaged-library", "no-library", "extern-kernels"],
)
def test_unusable_package_leaves_no_extraction(
    replace: dict, add: str | None, message: str, tiny_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package whose compiled library cannot be opened or run: refused by name, and the folder it was extracted
    into is gone."""
    import tempfile

    from fastdiff.runtime.packages import CompiledModule

    package = rewritten_package(tiny_artifact / "vae_decoder" / "64x64.pt2", tmp_path / "64x64.pt2", replace, add)
    extractions = tmp_path / "tmp"
    extractions.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(extractions))  # where packages are extracted
    with pytest.raises(FastDiffError, match=f"cannot load compiled package .*64x64.pt2: .*{message}"):
        CompiledModule(package, {}, torch.device("cpu"))
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
    edit_manifest(art, lambda d: d["files"]["tokenizer_2/tokenizer.json"].update(size=path.stat().st_size))
    with pytest.raises(FastDiffError, match="does not pad and truncate to 77 tokens"):
        load_pipeline(art, device="cpu")


def _edit_scheduler(art: Path, edit: Callable[[dict[str, Any]], object] | None, text: str | None = None) -> None:
    path = art / "scheduler" / "scheduler_config.json"
    if text is None:
        config = json.loads(path.read_text())
        edit(config)
        text = json.dumps(config)
    path.write_text(text)
    edit_manifest(art, lambda d: d["files"]["scheduler/scheduler_config.json"].update(size=path.stat().st_size))


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


# compatibility ---------------------------------------------------------------------------------------


def test_artifact_for_another_device(tiny_artifact: Path, tmp_path: Path) -> None:
    art = copy_artifact(tiny_artifact, tmp_path)
    edit_manifest(art, lambda d: d["device"].update(type="cuda", name="NVIDIA H100", capability="9.0"))
    assert_clean_error(run(art, tmp_path), "compiled for cuda, not cpu")
    with pytest.raises(FastDiffError, match="compiled for cuda, not cpu"):
        load_pipeline(art, device="cpu")
    if not torch.cuda.is_available():  # the default device is the artifact's
        proc = invoke_cli("fastdiff-run", str(art), "-p", "a cat", "--out", str(tmp_path / "img.png"))
        assert_clean_error(proc, "compiled for cuda, but no CUDA GPU is visible", "a machine with a GPU")
        with pytest.raises(FastDiffError, match="no CUDA GPU"):
            load_pipeline(art)
        proc = invoke_cli("fastdiff-inspect", str(art))  # the summary, then the check's failure
        assert_clean_error(proc, "cannot load here", "no CUDA GPU is visible")
        assert re.search(r"^loads here\s+no: this artifact was compiled for cuda", proc.stdout, re.M), proc.stdout
    assert images_in(tmp_path) == []


def _cuda_record(capability: str) -> dict[str, Any]:
    return {"type": "cuda", "cpu_isa": "AVX2", "name": f"GPU sm{capability}", "capability": capability}


def test_artifact_for_another_gpu_architecture(tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Faked: a manifest built on capability 8.0, a process whose GPU says 9.0."""
    manifest = read_manifest(tiny_artifact)
    manifest.device = _cuda_record("8.0")
    monkeypatch.setattr(compat_module, "device_record", lambda device: _cuda_record("9.0"))
    with pytest.raises(FastDiffError, match=r"compute capability 8\.0 .* is 9\.0") as info:
        check_compatible(manifest, torch.device("cuda"))
    assert "export the model again on this kind of GPU" in str(info.value)
    monkeypatch.setattr(compat_module, "device_record", lambda device: _cuda_record("8.0"))
    check_compatible(manifest, torch.device("cuda"))  # the same architecture is fine


def test_artifact_for_a_wider_cpu_isa(tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = read_manifest(tiny_artifact)
    manifest.device = {**manifest.device, "cpu_isa": "AVX512"}
    monkeypatch.setattr(compat_module, "device_record", lambda device: {"type": "cpu", "cpu_isa": "AVX2"})
    with pytest.raises(FastDiffError, match="compiled for CPUs with AVX512, this CPU has AVX2"):
        check_compatible(manifest, torch.device("cpu"))
    manifest.device = {**manifest.device, "cpu_isa": "DEFAULT"}
    check_compatible(manifest, torch.device("cpu"))  # a narrower ISA runs on a wider CPU


def test_incompatible_torch(tiny_artifact: Path, tmp_path: Path) -> None:
    art = copy_artifact(tiny_artifact, tmp_path)
    edit_manifest(art, lambda d: d["versions"].update(torch="2.9.0"))
    assert_clean_error(run(art, tmp_path), "compiled with torch 2.9.0", "install torch 2.9.x")
    with pytest.raises(FastDiffError, match="compiled with torch 2.9.0"):
        load_pipeline(art, device="cpu")
    assert_clean_error(invoke_cli("fastdiff-inspect", str(art)), "cannot load here", "compiled with torch 2.9.0")


def test_same_torch_minor_is_compatible(tiny_artifact: Path) -> None:
    manifest = read_manifest(tiny_artifact)
    major_minor = ".".join(torch.__version__.split(".")[:2])
    manifest.versions = {**manifest.versions, "torch": f"{major_minor}.99"}
    check_compatible(manifest, torch.device("cpu"))


# fastdiff-run input ----------------------------------------------------------------------------------


def test_unexported_resolution(tiny_artifact: Path, tiny_pipeline, tmp_path: Path) -> None:
    proc = run(tiny_artifact, tmp_path, "--res", "128")
    assert_clean_error(proc, "128x128", EXPORTED)
    with pytest.raises(FastDiffError, match=EXPORTED):
        tiny_pipeline("a cat", num_inference_steps=1, height=128, width=128)
    with pytest.raises(FastDiffError, match=EXPORTED):
        load_pipeline(tiny_artifact, device="cpu", resolutions=["128"])
    with pytest.raises(FastDiffError, match=EXPORTED):  # one resolution given as a string, not its characters
        load_pipeline(tiny_artifact, device="cpu", resolutions="128")
    with pytest.raises(FastDiffError, match="no resolution asked for"):
        load_pipeline(tiny_artifact, device="cpu", resolutions=[])
    assert images_in(tmp_path) == []


def test_transposed_resolution_is_not_exported(tiny_pipeline) -> None:
    with pytest.raises(FastDiffError, match=r"64x96 \(width x height\) was not exported"):
        tiny_pipeline("a cat", num_inference_steps=1, height=96, width=64)


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_non_positive_steps_cli(tiny_artifact: Path, tmp_path: Path, steps: str) -> None:
    proc = invoke_cli(
        "fastdiff-run", str(tiny_artifact), "-p", "a cat", "--steps", steps, "--out", str(tmp_path / "i.png")
    )
    assert_clean_error(proc, "--steps", steps, usage=True)
    assert images_in(tmp_path) == []


@pytest.mark.parametrize("steps", [0, -3, 1.5, True])
def test_non_positive_steps_api(tiny_pipeline, steps) -> None:
    with pytest.raises(FastDiffError, match="num_inference_steps must be a positive integer"):
        tiny_pipeline("a cat", num_inference_steps=steps, height=64, width=64)


def test_bad_call_arguments_api(tiny_pipeline) -> None:
    with pytest.raises(FastDiffError, match="guidance_scale must be a finite number"):
        tiny_pipeline("a cat", num_inference_steps=1, guidance_scale=float("nan"))
    with pytest.raises(FastDiffError, match="num_images_per_prompt"):
        tiny_pipeline("a cat", num_inference_steps=1, num_images_per_prompt=0)
    with pytest.raises(FastDiffError, match="negative prompts for"):
        tiny_pipeline(["a", "b"], negative_prompt=["x"], num_inference_steps=1)
    with pytest.raises(FastDiffError, match="give both height and width"):
        tiny_pipeline("a cat", num_inference_steps=1, height=64)
    with pytest.raises(FastDiffError, match="output_type"):
        tiny_pipeline("a cat", num_inference_steps=1, output_type="bmp")
    for count in (2, 3):  # diffusers refuses a generator list that is not one per image, too
        generators = [torch.Generator().manual_seed(i) for i in range(count)]
        with pytest.raises(FastDiffError, match=rf"{count} generators for 1 image(?!s)"):
            tiny_pipeline("a cat", num_inference_steps=1, generator=generators)


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"prompt": None}, "prompt must be a string or a non-empty list of strings, got None"),
        ({"prompt": 5}, "prompt must be a string"),
        ({"prompt": []}, "prompt must be a string"),
        ({"prompt": ["a", 5]}, "prompt must be a string"),
        ({"negative_prompt": 5}, "negative_prompt must be a string"),
        ({"guidance_scale": "5"}, "guidance_scale must be a finite number, got '5'"),
        ({"width": "abc", "height": 64}, "height and width must be positive integers"),
        ({"width": 64.9, "height": 64}, "height and width must be positive integers"),
        ({"generator": "x"}, "generator must be a torch.Generator or a list of them"),
        ({"generator": [torch.Generator(), 1]}, "generator must be a torch.Generator or a list of them"),
        ({"latents": torch.zeros(1, 4, 8, 9)}, "latents must be a tensor of shape (1, 4, 8, 8) for this call, got"),
        ({"latents": [0.0]}, "latents must be a tensor of shape (1, 4, 8, 8) for this call, got list"),
        ({"callback_on_step_end": "x"}, "callback_on_step_end must be callable"),
        (
            {"callback_on_step_end": lambda *a: {}, "callback_on_step_end_tensor_inputs": ["prompt_embeds"]},
            "callback_on_step_end_tensor_inputs asks for 'prompt_embeds'; this pipeline offers only latents",
        ),
        (
            {"callback_on_step_end": SDCFGCutoffCallback(cutoff_step_ratio=0.5)},  # a diffusers PipelineCallback
            "callback_on_step_end (its tensor_inputs) asks for 'prompt_embeds'",
        ),
        ({"callback_on_step_end": lambda *a: {"latents": None}}, "the latents callback_on_step_end returned must be"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) else None,
)
def test_call_arguments_of_the_wrong_type_api(tiny_pipeline, kwargs: dict, phrase: str) -> None:
    """The API's errors are FastDiffErrors for wrongly typed arguments too, not a TypeError from deep inside."""
    with pytest.raises(FastDiffError, match=re.escape(phrase)):
        tiny_pipeline(**{"prompt": "a cat", "num_inference_steps": 1, **kwargs})


def test_call_arguments_of_other_types_that_diffusers_takes_api(tiny_pipeline) -> None:
    """A numpy number or a 0-d tensor as the guidance, sizes as floats without a fraction, prompts in a tuple."""
    import numpy as np

    def latents(**kwargs):
        call = {"prompt": "a cat", "num_inference_steps": 1, "height": 64, "width": 64, "output_type": "latent"}
        return tiny_pipeline(**{**call, **kwargs}, generator=torch.Generator().manual_seed(0)).images

    expected = latents(guidance_scale=5.0)
    for kwargs in (
        {"guidance_scale": torch.tensor(5.0)},
        {"guidance_scale": np.float32(5.0)},
        {"guidance_scale": 5.0, "height": 64.0, "width": np.int64(64)},
        {"guidance_scale": 5.0, "prompt": ("a cat",)},
    ):
        torch.testing.assert_close(latents(**kwargs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("guidance", ["nan", "inf"])
def test_guidance_not_finite_cli(tiny_artifact: Path, tmp_path: Path, guidance: str) -> None:
    proc = run(tiny_artifact, tmp_path, "--guidance", guidance)
    assert_clean_error(proc, "--guidance", f"{guidance} is not a finite number", usage=True)
    assert images_in(tmp_path) == []


def test_seed_out_of_range_cli(tiny_artifact: Path, tmp_path: Path) -> None:
    proc = run(tiny_artifact, tmp_path, "--seed", str(2**64))
    assert_clean_error(proc, "--seed", usage=True)
    assert images_in(tmp_path) == []


@pytest.mark.parametrize(("name", "count"), [("img.png", 1), ("images", 1), ("images", 2), (".", 2)])
def test_out_is_a_folder(tiny_artifact: Path, tmp_path: Path, name: str, count: int) -> None:
    """A folder's name need not look like an image's; several images would go beside it, named after it."""
    folder = tmp_path / "in" / name
    (folder / "inside").mkdir(parents=True)
    proc = run(tiny_artifact, tmp_path, "--out", str(folder), "--overwrite", "--num-images", str(count))
    assert_clean_error(proc, "it is a folder")
    assert [p.name for p in folder.iterdir()] == ["inside"]


def test_several_images_beside_a_folder_named_like_an_image(tiny_artifact: Path, tmp_path: Path) -> None:
    (tmp_path / "img.png").mkdir()
    proc = run(tiny_artifact, tmp_path, "--out", str(tmp_path / "img.png"), "--num-images", "2", "--res", "64")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["img-0.png", "img-1.png"]


def test_image_write_failure_is_reported_and_cleaned_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full (or the folder gone) after the up-front checks: a clean error, no temporary file left behind."""
    import errno

    import PIL.Image

    from fastdiff.runtime.cli import _save_atomically

    image = PIL.Image.new("RGB", (8, 8))
    with pytest.raises(FastDiffError, match="cannot write .*gone"):
        _save_atomically(image, tmp_path / "gone" / "img.png", overwrite=False)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(image, "save", disk_full)
    with pytest.raises(FastDiffError, match="No space left on device") as info:
        _save_atomically(image, tmp_path / "img.png", overwrite=False)
    assert "free space there" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard-links", "no-hard-links"])
def test_an_image_made_meanwhile_is_not_replaced(
    hard_links: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs writing the same --out at once both pass the check made before generating: without --overwrite the
    second does not replace the first's image (with it, it does), on file systems with hard links or without."""
    import errno

    import PIL.Image

    from fastdiff.runtime.cli import _save_atomically

    if not hard_links:

        def no_link(*args) -> None:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))

        monkeypatch.setattr(os, "link", no_link)
    path = tmp_path / "img.png"
    path.write_bytes(b"the other run's image")
    with pytest.raises(FastDiffError, match="was created while this run generated"):
        _save_atomically(PIL.Image.new("RGB", (8, 8)), path, overwrite=False)
    assert path.read_bytes() == b"the other run's image"
    assert list(tmp_path.iterdir()) == [path]
    _save_atomically(PIL.Image.new("RGB", (8, 8)), tmp_path / "new.png", overwrite=False)
    _save_atomically(PIL.Image.new("RGB", (8, 8)), path, overwrite=True)
    assert PIL.Image.open(path).size == PIL.Image.open(tmp_path / "new.png").size == (8, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png", "new.png"]


def test_out_in_missing_folder(tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "missing" / "img.png"
    assert_clean_error(run(tiny_artifact, tmp_path, "--out", str(out)), "not a writable folder")
    assert not out.parent.exists()


def test_out_under_a_file(tiny_artifact: Path, tmp_path: Path) -> None:
    file = tmp_path / "file.txt"
    file.write_text("mine")
    assert_clean_error(run(tiny_artifact, tmp_path, "--out", str(file / "img.png")), "not a writable folder")
    assert file.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; test_out_under_a_file covers it")
def test_out_in_read_only_folder(tiny_artifact: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert_clean_error(run(tiny_artifact, tmp_path, "--out", str(folder / "img.png")), "not a writable folder")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_existing_output_is_kept(tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "img.png"
    out.write_bytes(b"the user's picture")
    before = out.stat().st_mtime_ns
    assert_clean_error(run(tiny_artifact, tmp_path, "--out", str(out)), "already exists", "--overwrite")
    assert out.read_bytes() == b"the user's picture"
    assert out.stat().st_mtime_ns == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]  # no temp file left either


def test_output_name_taken_by_a_link_to_nothing(tiny_artifact: Path, tmp_path: Path) -> None:
    """Refused up front, as an existing file is, not after the whole generation."""
    (tmp_path / "img.png").symlink_to(tmp_path / "gone" / "img.png")
    assert_clean_error(run(tiny_artifact, tmp_path, "--out", str(tmp_path / "img.png")), "already exists")
    assert [p.name for p in tmp_path.iterdir()] == ["img.png"]


def test_existing_output_among_several_writes_nothing(tiny_artifact: Path, tmp_path: Path) -> None:
    (tmp_path / "img-1.png").write_bytes(b"mine")
    proc = run(tiny_artifact, tmp_path, "--out", str(tmp_path / "img.png"), "--num-images", "3")
    assert_clean_error(proc, "img-1.png already exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-1.png"]
    assert (tmp_path / "img-1.png").read_bytes() == b"mine"


@pytest.mark.parametrize("name", ["img.gif", "img", "img.png.txt"])
def test_bad_out_suffix(tiny_artifact: Path, tmp_path: Path, name: str) -> None:
    assert_clean_error(run(tiny_artifact, tmp_path, "--out", str(tmp_path / name)), "unknown image type", ".png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_run_device_cuda_without_gpu(tiny_artifact: Path, tmp_path: Path) -> None:
    assert_clean_error(run(tiny_artifact, tmp_path, "--device", "cuda"), "no CUDA GPU is visible", "--device cpu")
    assert images_in(tmp_path) == []
    for device in ("cuda", "cuda:1", torch.device("cuda", 0)):
        with pytest.raises(FastDiffError, match="no CUDA GPU is visible"):
            load_pipeline(tiny_artifact, device=device)


def test_run_unknown_device(tiny_artifact: Path, tmp_path: Path) -> None:
    assert_clean_error(run(tiny_artifact, tmp_path, "--device", "tpu"), "unknown device 'tpu'")


@pytest.mark.parametrize(("res", "phrase"), INVALID_RES)
def test_invalid_res_api(tiny_artifact: Path, res: str, phrase: str) -> None:
    with pytest.raises(FastDiffError, match=re.escape(phrase)):
        parse_resolution(res)
    with pytest.raises(FastDiffError, match=re.escape(phrase)):
        load_pipeline(tiny_artifact, device="cpu", resolutions=[res])


def test_run_invalid_res(tiny_artifact: Path, tmp_path: Path) -> None:
    assert_clean_error(run(tiny_artifact, tmp_path, "--res", "100"), "not a multiple of 8", "e.g. 96")
    assert images_in(tmp_path) == []


# fastdiff-export -------------------------------------------------------------------------------------


@pytest.fixture
def exports(tmp_path: Path) -> Path:
    """An empty folder the export targets live in: after a refused export it must hold what it held before."""
    folder = tmp_path / "exports"
    folder.mkdir()
    return folder


def export(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = run_cli("fastdiff-export", *args, env=env) if env else invoke_cli("fastdiff-export", *args)
    return proc, time.perf_counter() - start


def assert_export_refused(proc: subprocess.CompletedProcess, seconds: float, folder: Path, *phrases: str, **kw):
    assert_clean_error(proc, *phrases, **kw)
    # Failed before any compile: the exporter logs each torch.export / AOTInductor phase as it starts.
    assert "torch.export" not in proc.stderr and "AOTInductor" not in proc.stderr, proc.stderr
    assert seconds < 120, f"took {seconds:.0f} s to fail"
    leftovers = [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    assert leftovers == [], leftovers


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


def wait_for_partial_folder(proc: subprocess.Popen, folder: Path) -> None:
    deadline = time.monotonic() + 120
    while not any(".partial-" in p.name and p.is_dir() for p in folder.iterdir()) and proc.poll() is None:
        assert time.monotonic() < deadline, "the export never started writing"
        time.sleep(0.2)
    time.sleep(1)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_export_stopped_midway_leaves_nothing(exports: Path, signum: int) -> None:
    """Stopped while it writes (Ctrl-C, or a service manager's SIGTERM): the partial folder goes, the exit code says
    why."""
    import sys

    out = exports / "a"
    # Ctrl-C as a terminal's foreground process gets it: a test session started as a shell's background job ignores
    # SIGINT, and its children inherit that (Python then leaves it ignored)
    code = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    code += "import sys; from fastdiff.exporter.cli import main; sys.argv[0] = 'fastdiff-export'; main()"
    args = ["tiny-sdxl", "--res", "64", "--device", "cpu", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE, text=True)
    wait_for_partial_folder(proc, exports)
    proc.send_signal(signum)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr and "interrupted: nothing was written" in stderr, stderr
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


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_export_refuses_to_replace_other_things(exports: Path, overwrite: bool) -> None:
    """Into an existing folder that is not an artifact: refused even with --overwrite, and left as it was."""
    folder = exports / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    (folder / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = tree(folder)
    args = ["--overwrite"] if overwrite else []
    proc, seconds = export("tiny-sdxl", "--res", "64", "--device", "cpu", "--out", str(folder), *args)
    assert_export_refused(proc, seconds, exports, str(folder))
    assert "not a fastdiff artifact" in proc.stderr  # not "already exists": --overwrite would not help
    assert tree(folder) == before
    assert sorted(p.name for p in exports.iterdir()) == ["mine"]


def test_export_refuses_existing_artifact_without_overwrite(tiny_artifact: Path, exports: Path) -> None:
    art = Path(shutil.copytree(tiny_artifact, exports / "art"))
    before = tree(art)
    proc, seconds = export("tiny-sdxl", "--res", "64", "--device", "cpu", "--out", str(art))
    assert_export_refused(proc, seconds, exports, "already exists", "--overwrite")
    assert tree(art) == before
    assert sorted(p.name for p in exports.iterdir()) == ["art"]


def test_export_refuses_a_file_target(exports: Path) -> None:
    file = exports / "target"
    file.write_text("mine")
    proc, seconds = export("tiny-sdxl", "--res", "64", "--device", "cpu", "--out", str(file), "--overwrite")
    assert_export_refused(proc, seconds, exports, "not a fastdiff artifact")
    assert file.read_text() == "mine"
    proc, seconds = export("tiny-sdxl", "--res", "64", "--device", "cpu", "--out", str(file / "sub"))
    assert_export_refused(proc, seconds, exports, "cannot write to", f"{file} is a file, not a folder")
    assert sorted(p.name for p in exports.iterdir()) == ["target"]


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


def test_a_scheduler_that_cannot_run_the_steps(tiny_pipeline) -> None:
    """DDIM refuses more steps than the model was trained with: a FastDiffError (fastdiff-run: one line, exit 2)."""
    from diffusers import DDIMScheduler

    scheduler = tiny_pipeline.scheduler
    tiny_pipeline.scheduler = DDIMScheduler.from_config(scheduler.config)
    try:
        with pytest.raises(FastDiffError, match="DDIMScheduler cannot run 2000 steps"):
            tiny_pipeline("a cat", num_inference_steps=2000)
    finally:
        tiny_pipeline.scheduler = scheduler


def test_overwrite_keeps_what_the_user_put_in_an_artifact(tiny_artifact: Path, exports: Path) -> None:
    """An artifact folder that holds files its manifest does not list (an image rendered into it, notes) is not
    replaced, even with --overwrite: before the export starts, nor when the artifact is put in place."""
    from fastdiff.exporter.artifact import ArtifactWriter
    from fastdiff.exporter.export import ExportOptions, export_artifact

    art = Path(shutil.copytree(tiny_artifact, exports / "art"))
    (art / "renders").mkdir()
    (art / "renders" / "cat.png").write_bytes(b"mine")
    before = tree(art)
    options = ExportOptions("tiny-sdxl", [parse_resolution(64)], torch.device("cpu"), out=art, overwrite=True)
    with pytest.raises(FastDiffError, match=r"holds 1 file that its artifact does not list \(e.g. renders/cat.png\)"):
        export_artifact(options)
    with pytest.raises(FastDiffError, match="move them out of the folder"):
        with ArtifactWriter(exports / "other", overwrite=True) as writer:
            writer.path("unet/weights.safetensors").write_bytes(b"new")
            shutil.copytree(art, exports / "other")  # an artifact, with the user's file, appeared meanwhile
            writer.commit(read_manifest(tiny_artifact))
    assert tree(art) == before == tree(exports / "other")
    (art / "renders" / "cat.png").unlink()
    with ArtifactWriter(art, overwrite=True) as writer:  # without it, the artifact (and its empty folder) is replaced
        writer.path("unet/weights.safetensors").write_bytes(b"new")
        writer.commit(read_manifest(tiny_artifact))
    assert sorted(p.name for p in exports.iterdir()) == ["art", "other"]


def test_an_empty_folder_is_replaced_with_overwrite(tiny_artifact: Path, exports: Path) -> None:
    """An --out made beforehand and left empty: --overwrite, as the refusal says, replaces it (nothing is lost)."""
    from fastdiff.exporter.artifact import ArtifactWriter

    out = exports / "made-for-it"
    out.mkdir()
    with pytest.raises(FastDiffError, match=r"already exists \(an empty folder\)\n  fix: pass --overwrite"):
        ArtifactWriter(out)
    with ArtifactWriter(out, overwrite=True) as writer:
        writer.path("unet/weights.safetensors").write_bytes(b"new")
        writer.commit(read_manifest(tiny_artifact))
    assert (out / "unet" / "weights.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in exports.iterdir()) == ["made-for-it"]


def test_an_empty_mount_point_is_refused_before_the_export(exports: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A volume mounted at --out: the artifact, built beside it, could not be renamed onto it minutes later."""
    from fastdiff.exporter import artifact

    out = exports / "volume"
    out.mkdir()
    monkeypatch.setattr(artifact.os.path, "ismount", lambda path: Path(path) == out)
    for overwrite in (False, True):
        with pytest.raises(FastDiffError, match=r"volume is a mount point\n  fix: export into a folder inside it"):
            artifact.ArtifactWriter(out, overwrite=overwrite)
        (out / "lost+found").mkdir(exist_ok=True)  # and one that holds something, even an artifact
    assert list(exports.iterdir()) == [out]


def test_targets_that_only_look_free_are_refused(exports: Path) -> None:
    """A link to nothing (os.path.exists says no) and a folder whose manifest.json is too deeply nested to parse."""
    from fastdiff.exporter.artifact import ArtifactWriter

    (exports / "link").symlink_to(exports / "gone")
    deep = exports / "deep"
    deep.mkdir()
    (deep / "manifest.json").write_text("[" * 100_000)
    for target in ("link", "deep"):
        with pytest.raises(FastDiffError, match="exists and is not a fastdiff artifact"):
            ArtifactWriter(exports / target, overwrite=True)
    assert sorted(p.name for p in exports.iterdir()) == ["deep", "link"]


def test_safetensors_write_errors_are_os_errors(exports: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In the wording of every safetensors the requirement allows, so the CLI's one-line message applies."""
    from safetensors import SafetensorError

    from fastdiff.exporter import artifact

    for message in (
        "Error while serializing: I/O error: No space left on device (os error 28)",  # safetensors >= 0.5
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })',
    ):

        def fail(*args, message: str = message, **kwargs) -> None:
            raise SafetensorError(message)

        monkeypatch.setattr(artifact, "save_file", fail)
        with artifact.ArtifactWriter(exports / "a") as writer, pytest.raises(OSError) as info:
            writer.save_weights("unet/weights.safetensors", {"w": torch.zeros(4)})
        assert info.value.errno == errno.ENOSPC and info.value.filename.endswith("unet/weights.safetensors")


def test_a_target_made_during_the_export_is_kept(tiny_artifact: Path, exports: Path) -> None:
    """The target is checked again when the artifact is put in place: what appeared there meanwhile is not
    replaced (without --overwrite), nor is something that is not an artifact (with it)."""
    from fastdiff.exporter.artifact import ArtifactWriter

    for overwrite in (False, True):
        out = exports / f"out-{overwrite}"
        with pytest.raises(FastDiffError, match="not a fastdiff artifact"):
            with ArtifactWriter(out, overwrite=overwrite) as writer:
                writer.path("unet/weights.safetensors").write_bytes(b"new")
                out.mkdir()
                (out / "mine.txt").write_text("made meanwhile")
                writer.commit(read_manifest(tiny_artifact))
        assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in exports.iterdir()) == ["out-False", "out-True"]  # no partial folder left


def test_the_next_export_removes_what_an_export_killed_outright_left(
    exports: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL (the OOM killer, a power cut) leaves no chance to clean up: the partial folder stays, beside its lock
    file, until the next export to the same --out finds that no process holds the lock."""
    import sys

    from fastdiff.exporter.artifact import ArtifactWriter

    code = "import sys; from fastdiff.exporter.cli import main; sys.argv[0] = 'fastdiff-export'; main()"
    args = ["tiny-sdxl", "--res", "64", "--device", "cpu", "--out", str(exports / "a")]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.DEVNULL)
    wait_for_partial_folder(proc, exports)
    proc.kill()
    proc.wait()
    left = sorted(p.name for p in exports.iterdir())
    assert len(left) == 2 and left[1] == left[0] + ".lock", left
    with ArtifactWriter(exports / "b"):  # another target's export leaves it
        pass
    assert sorted(p.name for p in exports.iterdir()) == left
    with ArtifactWriter(exports / "a"):
        pass
    assert list(exports.iterdir()) == []
    assert f"removed {left[0]}, left beside a by an export that was killed" in capsys.readouterr().err


def test_partial_folders_of_running_exports_are_kept(exports: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fastdiff.exporter.artifact import ArtifactWriter

    unlocked = exports / ".a.partial-1-0123abcd"  # no lock file: another tool's, or an older fastdiff's
    unlocked.mkdir()
    other_host = exports / ".a.partial-elsewhere-1-0123abcd"  # its lock may be one this host cannot see (NFS)
    other_host.mkdir()
    other_host.with_name(other_host.name + ".lock").touch()
    with ArtifactWriter(exports / "a") as running:
        (running.root / "unet").mkdir()
        with ArtifactWriter(exports / "a"):
            assert (running.root / "unet").is_dir()
    left = sorted(p.name for p in exports.iterdir())
    assert left == sorted([unlocked.name, other_host.name, other_host.name + ".lock"])
    assert "removed" not in capsys.readouterr().err


def test_lock_file_of_an_export_killed_before_it_took_its_lock_goes(exports: Path) -> None:
    """An export makes its lock file under a `.new` name, locks it, then renames it: killed in between, it leaves the
    `.new` file (and no folder yet), which the next export removes once the process named in it is gone."""
    import socket

    from fastdiff.exporter.artifact import ArtifactWriter

    gone = subprocess.Popen(["true"])
    gone.wait()
    prefix = f".a.partial-{socket.gethostname()}-"
    killed = exports / f"{prefix}{gone.pid}-0123abcd.lock.new"
    starting = exports / f"{prefix}{os.getpid()}-4567cdef.lock.new"  # a running export, about to lock it
    not_processes = [exports / f"{prefix}{pid}-89abcdef.lock.new" for pid in (0, 10**30)]
    for path in (killed, starting, *not_processes):
        path.touch()
    with ArtifactWriter(exports / "a"):
        pass
    assert sorted(p.name for p in exports.iterdir()) == [starting.name]


KILLED_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from fastdiff.exporter import artifact
from fastdiff.runtime import read_manifest

out, manifest = Path(sys.argv[1]), read_manifest(sys.argv[2])
artifact._rename2 = lambda source, target, flag: False  # a filesystem without renameat2's flags
rename = Path.rename


def killed_before_the_second(self, target):
    if Path(target) == out:
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(self, target)


Path.rename = killed_before_the_second
with artifact.ArtifactWriter(out, overwrite=True) as writer:
    writer.path("unet/weights.safetensors").write_bytes(b"new")
    writer.commit(manifest)
"""


def test_an_artifact_moved_aside_by_a_killed_overwrite_is_put_back(
    tiny_artifact: Path, exports: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where --overwrite needs two renames, an export killed between them has moved the old artifact aside: the next
    export to that --out puts it back before it checks the target."""
    import sys

    from fastdiff.exporter.artifact import ArtifactWriter

    art = copy_artifact(tiny_artifact, exports)
    before = tree(art)
    proc = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(art), str(tiny_artifact)])
    assert proc.returncode == -signal.SIGKILL
    assert not art.exists() and len(list(exports.glob(".art.partial-*.old"))) == 1
    with pytest.raises(FastDiffError, match="already exists"):
        ArtifactWriter(art)
    assert tree(art) == before and list(exports.iterdir()) == [art]
    assert "put back art, which an export had moved aside to replace it" in capsys.readouterr().err


@pytest.mark.parametrize("one_step", [True, False], ids=["exchange", "two-renames"])
def test_overwrite_replaces_the_artifact_and_leaves_nothing_beside_it(
    tiny_artifact: Path, exports: Path, monkeypatch: pytest.MonkeyPatch, one_step: bool
) -> None:
    from fastdiff.exporter import artifact

    if one_step and not _swaps_in_one_step(exports):
        pytest.skip("this filesystem cannot swap two folders in one step (renameat2 RENAME_EXCHANGE)")
    calls = []
    rename2 = artifact._rename2 if one_step else lambda source, target, flag: False
    monkeypatch.setattr(artifact, "_rename2", lambda *a: calls.append((a[2], rename2(*a))) or calls[-1][1])
    art = copy_artifact(tiny_artifact, exports)
    with artifact.ArtifactWriter(art, overwrite=True) as writer:
        writer.path("unet/weights.safetensors").write_bytes(b"new")
        writer.commit(read_manifest(tiny_artifact))
    assert calls == [(artifact.RENAME_EXCHANGE, one_step)]
    assert tree(art) == {"unet/weights.safetensors": b"new", MANIFEST_NAME: (art / MANIFEST_NAME).read_bytes()}
    assert list(exports.iterdir()) == [art]


def _swaps_in_one_step(folder: Path) -> bool:
    from fastdiff.exporter.artifact import RENAME_EXCHANGE, _rename2

    a, b = folder / "a", folder / "b"
    a.mkdir()
    b.mkdir()
    try:
        return _rename2(a, b, RENAME_EXCHANGE)
    finally:
        a.rmdir()
        b.rmdir()


def test_a_target_made_just_before_the_rename_is_kept(
    tiny_artifact: Path, exports: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --overwrite, a folder made at --out after the last check, just before the artifact is put in place, is
    not replaced (renameat2 RENAME_NOREPLACE where the filesystem has it)."""
    from fastdiff.exporter import artifact

    out = exports / "out"
    check_target = artifact.check_target

    def then_made(target: Path, overwrite: bool) -> None:
        check_target(target, overwrite)
        if target == out and not target.exists() and any(exports.glob(".out.partial-*/manifest.json")):
            target.mkdir()
            (target / "mine.txt").write_text("made meanwhile")

    monkeypatch.setattr(artifact, "check_target", then_made)
    with pytest.raises(FastDiffError, match="exists and is not a fastdiff artifact"):
        with artifact.ArtifactWriter(out) as writer:
            writer.path("unet/weights.safetensors").write_bytes(b"new")
            writer.commit(read_manifest(tiny_artifact))
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and list(exports.iterdir()) == [out]


def test_session_artifact_untouched(tiny_artifact: Path) -> None:
    """The damage above was done to copies."""
    manifest = read_manifest(tiny_artifact)
    for rel in (UNET_WEIGHTS, "unet/96x64.pt2", "vae_decoder/64x64.pt2"):
        assert sha256_file(tiny_artifact / rel) == manifest.files[rel]["sha256"], rel
