"""The console scripts' happy paths: fastdiff-run writes the images asked for, fastdiff-inspect describes and verifies
an artifact, and every command documents its options."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import EXPORT_CONSOLE, run_cli

from fastdiff.runtime import read_manifest
from fastdiff.runtime.format import MANIFEST_NAME

PROMPT = "a photo of a cat"


def pixels(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def generate(artifact: Path, out: Path, *args: str) -> None:
    proc = run_cli(
        "fastdiff-run", str(artifact), "-p", PROMPT, "--res", "96x64", "--steps", "2", "--out", str(out), *args
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def seeded_image(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "x.png"
    generate(tiny_artifact, out, "--seed", "3")
    return out


def test_run_writes_png(seeded_image: Path) -> None:
    with PIL.Image.open(seeded_image) as image:
        assert image.format == "PNG"
        assert image.size == (96, 64)  # width x height
        assert image.mode == "RGB"
    assert pixels(seeded_image).std() > 0  # not a blank image
    assert sorted(p.name for p in seeded_image.parent.iterdir()) == ["x.png"]  # no temp file left


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_written_files_get_the_umask_modes(tiny_artifact: Path, seeded_image: Path) -> None:
    """Not the private 0600/0700 of temporary files: an artifact built by one user is served by another."""
    mask = _umask()
    assert stat.S_IMODE(seeded_image.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(tiny_artifact.stat().st_mode) == 0o777 & ~mask
    for path in tiny_artifact.rglob("*"):
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="Linux shows the umask in /proc")
def test_the_umask_is_read_without_being_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting the umask to read it, even back at once, would change the mode of files other threads create
    meanwhile."""
    from fastdiff.runtime import format as artifact_format

    own = os.umask(0o027)
    try:

        def no_umask(mask: int) -> int:
            raise AssertionError("os.umask called")

        monkeypatch.setattr(artifact_format.os, "umask", no_umask)
        assert artifact_format._umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(own)


def test_run_same_seed_same_pixels(tiny_artifact: Path, seeded_image: Path, tmp_path: Path) -> None:
    generate(tiny_artifact, tmp_path / "again.png", "--seed", "3")
    np.testing.assert_array_equal(pixels(tmp_path / "again.png"), pixels(seeded_image))


def test_run_matches_python_api(tiny_pipeline, seeded_image: Path) -> None:
    """The CLI's defaults (guidance 5.0, no negative prompt) and seeding are the API's; another seed differs."""

    def api(seed: int) -> np.ndarray:
        image = tiny_pipeline(
            PROMPT,
            num_inference_steps=2,
            guidance_scale=5.0,
            height=64,
            width=96,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        return np.asarray(image.convert("RGB"))

    np.testing.assert_array_equal(api(3), pixels(seeded_image))
    assert not np.array_equal(api(4), pixels(seeded_image))


def test_run_num_images(tiny_artifact: Path, tmp_path: Path) -> None:
    """3 images with a UNet compiled for batch 2 (two chunks); an existing one is replaced with --overwrite."""
    (tmp_path / "x-1.png").write_bytes(b"old")
    generate(tiny_artifact, tmp_path / "x.png", "--seed", "5", "--num-images", "3", "--overwrite", "--quiet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-0.png", "x-1.png", "x-2.png"]
    images = [pixels(tmp_path / f"x-{i}.png") for i in range(3)]
    assert all(image.shape == (64, 96, 3) for image in images)
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])


def test_run_jpeg(tiny_artifact: Path, tmp_path: Path) -> None:
    generate(tiny_artifact, tmp_path / "x.jpg", "--seed", "1", "--steps", "1", "-n", "blurry", "--guidance", "1.0")
    with PIL.Image.open(tmp_path / "x.jpg") as image:
        assert (image.format, image.size) == ("JPEG", (96, 64))


def test_export_console_has_no_warnings_of_the_exporters_own_calls(
    tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    console = (tmp_path_factory.getbasetemp() / EXPORT_CONSOLE).read_text()
    assert "[fastdiff-export] hashing files and writing the manifest: done" in console
    assert "torch_dtype" not in console  # diffusers 0.42's rename of the argument the export passes
    assert "should be kept in float32" not in console  # diffusers' warning at any .to(dtype) of a model
    assert "LeafSpec" not in console  # torch's FutureWarning about its own pytree code, at each compile


def test_inspect(tiny_artifact: Path) -> None:
    proc = run_cli("fastdiff-inspect", str(tiny_artifact))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    manifest = read_manifest(tiny_artifact)
    assert re.search(r"^source\s+tiny-sdxl\b", out, re.M), out
    assert re.search(r"^dtype\s+fp32 \(VAE decoder fp32\), batch size 2$", out, re.M), out
    assert re.search(r"^resolutions\s+64x64, 96x64$", out, re.M), out
    assert re.search(r"^family\s+sdxl, default 128x128, guidance 5.0$", out, re.M), out
    assert re.search(r"^text encoders\s+compiled$", out, re.M), out
    assert re.search(rf"^device\s+cpu \({manifest.device['cpu_isa']}\)$", out, re.M), out
    assert re.search(rf"^files\s+{len(manifest.files)}, ", out, re.M), out
    for rel in manifest.files:
        if rel.endswith((".pt2", ".safetensors")):
            assert re.search(rf"^\s+{re.escape(rel)}\s+[\d.]+ MB$", out, re.M), rel
    assert re.search(r"^passes\s+sdpa, fuse_qkv, channels_last$", out, re.M), out
    assert re.search(r"^loads here\s+yes$", out, re.M), out
    assert "verified" not in out  # hashing only with --verify


def test_inspect_names_the_quantized_linears(tiny_artifact: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifact, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["options"].update(passes=["sdpa", "fp8"], quantize_linears=["ff.net.0.proj", "attn1.to_qkv"])
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    proc = run_cli("fastdiff-inspect", str(copy))
    assert proc.returncode == 0, proc.stderr
    expected = r"^passes\s+sdpa, fp8 \(quantized linears: ff\.net\.0\.proj, attn1\.to_qkv\)$"
    assert re.search(expected, proc.stdout, re.M), proc.stdout


def test_inspect_verify(tiny_artifact: Path) -> None:
    proc = run_cli("fastdiff-inspect", str(tiny_artifact), "--verify")
    assert proc.returncode == 0, proc.stderr
    count = len(read_manifest(tiny_artifact).files)
    assert f"all {count} files match their sha256" in proc.stdout
    assert "FAILED" not in proc.stderr and "error:" not in proc.stderr


HELP_OPTIONS = {
    "fastdiff-export": [
        "--res",
        "--out",
        "--device",
        "--dtype",
        "--batch-size",
        "--passes",
        "--quantize",
        "--max-autotune",
        "--inductor-config",
        "--overwrite",
    ],
    "fastdiff-run": [
        "--prompt",
        "--negative-prompt",
        "--res",
        "--steps",
        "--guidance",
        "--seed",
        "--device",
        "--out",
        "--num-images",
        "--overwrite",
    ],
    "fastdiff-inspect": ["--verify"],
}


def test_export_command_imports_no_model_code_before_it_runs() -> None:
    """fastdiff-export --help (and a refused option, and Ctrl-C in the first seconds) need not wait for diffusers'
    and transformers' model classes: the export machinery is imported when the command runs."""
    import subprocess
    import sys

    code = "import sys; import fastdiff.exporter.cli; print(sorted({'diffusers', 'transformers'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def run_interrupted_at_import(entry_point: str, module_name: str, *args: str, record: str = "") -> str:
    """Run a console script's function in a fresh interpreter, with Ctrl-C raised once where `module_name`'s import
    starts (an import finder), as a real Ctrl-C would raise it anywhere in there, after running the code `record` there;
    asserts the command ended as on a Ctrl-C later (a line, exit 130, no traceback) and returns that line."""
    import subprocess
    import sys
    import textwrap

    module, function = entry_point.split(":")
    code = (
        "import sys\n"
        "class CtrlC:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {module_name!r}:\n"
        f"{textwrap.indent(record, ' ' * 12)}\n"
        "            sys.meta_path.remove(self)  # once, as a Ctrl-C\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, CtrlC())\n"
        f"from {module} import {function}\n"
        f"sys.exit({function}())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


@pytest.mark.parametrize(
    ("entry_point", "interrupted_import", "message"),
    [
        ("fastdiff.exporter.cli:main", "torch", "interrupted: nothing was written"),
        ("fastdiff.exporter.cli:main", "numpy", "interrupted: nothing was written"),  # which torch's own import drops
        ("fastdiff.exporter.cli:main", "fastdiff.exporter.passes", "interrupted: nothing was written"),
    ],
)
def test_ctrl_c_while_the_export_command_imports(entry_point: str, interrupted_import: str, message: str) -> None:
    """Ctrl-C in the seconds fastdiff-export spends importing torch and the rest, before it runs: the console
    script's own first line (`from MODULE import FUNCTION`) is what gets interrupted, so the command's module must
    import torch inside its own handling."""
    assert run_interrupted_at_import(entry_point, interrupted_import, "--help") == f"{message}\n"


@pytest.mark.parametrize(
    ("entry_point", "args"),
    [("fastdiff.runtime.cli:run_main", ["-p", PROMPT, "--out", "x.png"]), ("fastdiff.runtime.cli:inspect_main", [])],
)
def test_ctrl_c_while_a_runtime_command_imports_torch(
    entry_point: str, args: list[str], tiny_artifact: Path, tmp_path: Path
) -> None:
    """fastdiff-run and fastdiff-inspect import torch when they run, once they have read the manifest (fastdiff-run
    also starts reading the artifact from disk first): a Ctrl-C there ends them as one later does."""
    args = [str(tiny_artifact), *(str(tmp_path / a) if a.endswith(".png") else a for a in args)]
    assert run_interrupted_at_import(entry_point, "torch", *args) == "interrupted\n"
    # torch's C extension imports numpy and drops any exception raised there: the command went on, or broke later
    assert run_interrupted_at_import(entry_point, "numpy", *args) == "interrupted\n"


def test_run_reads_the_artifact_from_disk_while_it_imports_torch(tiny_artifact: Path, tmp_path: Path) -> None:
    """Where the page cache does not hold the artifact, its files come in while fastdiff-run imports torch."""
    record = "import threading; print([t.name for t in threading.enumerate()], file=sys.stderr)"
    args = [str(tiny_artifact), "-p", PROMPT, "--res", "64", "--out", str(tmp_path / "x.png")]
    # numpy: the first of torch's imports (import_torch), a few milliseconds after the read started
    stderr = run_interrupted_at_import("fastdiff.runtime.cli:run_main", "numpy", *args, record=record)
    assert "'fastdiff-prefetch'" in stderr.splitlines()[0], stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["tiny-sdxl", "--res", "100"], id="resolution"),
        pytest.param(["no-such-model", "--res", "64"], id="model"),
        pytest.param(["tiny-sdxl", "--res", "64", "--passes", "sdpa,bogus"], id="pass"),
        pytest.param(["tiny-sdxl", "--res", "64", "--batch-size", "0"], id="batch-size"),
        pytest.param(["tiny-sdxl", "--res", "64", "--inductor-config", "vae:max_autotune=1"], id="inductor-config"),
    ],
)
def test_export_refuses_bad_options_before_importing_model_code(args: list[str], tmp_path: Path) -> None:
    """A refused option costs the user seconds, not the import of diffusers' and transformers' models."""
    import subprocess
    import sys

    code = (
        "import atexit, sys; atexit.register(lambda: print(sorted({'diffusers', 'transformers'} & set(sys.modules))))"
        "; from fastdiff.exporter.cli import main; sys.argv[0] = 'fastdiff-export'; main()"
    )
    out = ["--device", "cpu", "--out", str(tmp_path / "a")]
    proc = subprocess.run([sys.executable, "-c", code, *args, *out], capture_output=True, text=True)
    assert proc.returncode == 2 and "error:" in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_presets_built_offline_name_their_builders() -> None:
    from fastdiff.exporter import random_models
    from fastdiff.exporter.presets import PRESETS

    for preset in PRESETS.values():
        assert (preset.builder is None) == bool(preset.model), preset.name  # a hub checkpoint, or built offline
        assert preset.builder is None or callable(getattr(random_models, preset.builder)), preset.name


@pytest.mark.parametrize("command", list(HELP_OPTIONS))
def test_help(command: str) -> None:
    proc = run_cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Usage: {command} "), proc.stdout
    for option in HELP_OPTIONS[command]:
        assert re.search(rf"(^|[\s,/]){re.escape(option)}\b", proc.stdout), f"{option} missing from {command} --help"


def test_out_of_device_memory_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    from fastdiff.runtime.errors import clean_errors

    @clean_errors()
    def load_too_much() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has ...\n(details)")

    with pytest.raises(SystemExit) as exit_info:
        load_too_much()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory on the device: CUDA out of memory. Tried to allocate 20.00 GiB.")
    assert "fix: free memory there" in err and "(details)" not in err

    @clean_errors()
    def other_bug() -> None:
        raise RuntimeError("not a memory problem")

    with pytest.raises(RuntimeError, match="not a memory problem"):  # real bugs keep their traceback
        other_bug()


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["sigterm", "ctrl-c"])
def test_a_stop_turned_into_another_error_still_stops(signum: int, code: int, capsys: pytest.CaptureFixture) -> None:
    """A signal landing inside torch's tracing came out as an error of torch's own (exit 1 and a traceback in CI): once
    the command was told to stop, whatever error ends it ends it as that stop. The next command starts unstopped."""
    from fastdiff.runtime.errors import FastDiffError, clean_errors

    @clean_errors()
    def traced(wrap_as: type[Exception]) -> None:
        try:
            signal.raise_signal(signum)
            time.sleep(5)  # the handler raises here
        except BaseException as e:
            raise wrap_as("while executing the traced graph") from e

    # Ctrl-C as a terminal's foreground process gets it (a shell's background job, as CI may be, ignores SIGINT)
    ctrl_c = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for wrap_as in (RuntimeError, FastDiffError):
            with pytest.raises(SystemExit) as exit_info:
                traced(wrap_as)
            assert exit_info.value.code == code
            assert capsys.readouterr().err.startswith("interrupted")
    finally:
        signal.signal(signal.SIGINT, ctrl_c)

    @clean_errors()
    def fails() -> None:
        raise FastDiffError("bad input")

    with pytest.raises(SystemExit) as exit_info:
        fails()
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: bad input\n"


def _fails_with(error: Exception, cause: BaseException | None = None) -> None:
    raise error from cause


@pytest.mark.parametrize(
    ("error", "cause", "message"),
    [
        (
            PermissionError(errno.EACCES, "Permission denied", "/a/manifest.json"),
            None,
            "Permission denied: /a/manifest.json",
        ),
        (
            RuntimeError("InductorError: compile failed"),
            OSError(errno.ENOSPC, "No space left on device"),
            "No space left on device",
        ),
        (OSError(errno.EROFS, "Read-only file system", "/ro/x.png"), None, "Read-only file system: /ro/x.png"),
    ],
    ids=["unreadable", "disk-full-in-a-compile", "read-only"],
)
def test_unreadable_or_unwritable_files_are_clear_errors(
    error: Exception, cause: OSError | None, message: str, capsys: pytest.CaptureFixture
) -> None:
    """A permission or a full disk is the machine's problem, not a bug: one line, exit 2, also when a compile wraps
    it in an error of its own."""
    from fastdiff.runtime.errors import clean_errors

    with pytest.raises(SystemExit) as exit_info:
        clean_errors()(_fails_with)(error, cause)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}\n") and "fix: check the path's permissions and the free space" in err
    missing_tool = FileNotFoundError(errno.ENOENT, "No such file or directory", "g++")
    with pytest.raises(RuntimeError):  # a wrapped error of another kind keeps its traceback
        clean_errors()(_fails_with)(RuntimeError("compile failed"), missing_tool)


FULL_DISK_EXPORT = """
import resource, signal, sys, torch
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail (EFBIG), as on a full disk (ENOSPC)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
from fastdiff.exporter.artifact import ArtifactWriter
from fastdiff.runtime.errors import clean_errors

@clean_errors()
def export():
    with ArtifactWriter(Path(sys.argv[1])) as writer:
        writer.save_weights("unet/weights.safetensors", {"w": torch.zeros(100_000)})

export()
"""


def test_weights_that_do_not_fit_on_the_disk_are_a_clear_error(tmp_path: Path) -> None:
    """safetensors reports a failed write as its own error, not an OSError: the export still ends in one line."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", FULL_DISK_EXPORT, str(tmp_path / "a")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: File too large: "), proc.stderr
    assert "unet/weights.safetensors" in proc.stderr.splitlines()[0] and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing left beside the target
