"""The export's target folder (--out): what is there and is not an artifact is never replaced, an artifact only with
--overwrite; the artifact is put in place by a rename, so a stopped or killed export leaves nothing half-written, and
the next export cleans up what a killed one left (its partial folder, lock files, an artifact it had moved aside)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_export_refused, copy_artifact, export, tree

from fastdiff.runtime import FastDiffError, parse_resolution, read_manifest
from fastdiff.runtime.format import MANIFEST_NAME


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


def wait_for_partial_folder(proc: subprocess.Popen, folder: Path) -> None:
    deadline = time.monotonic() + 120
    while not any(".partial-" in p.name and p.is_dir() for p in folder.iterdir()) and proc.poll() is None:
        assert time.monotonic() < deadline, "the export never started writing"
        time.sleep(0.2)
    time.sleep(1)


@pytest.mark.slow  # fastdiff-export runs until it writes
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


def test_a_ctrl_c_swallowed_where_it_landed_still_stops_the_export(
    tiny_artifact: Path, exports: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python drops an exception raised in a finalizer (a KeyboardInterrupt landing in `__del__`, seen once in
    torch.export): the export went on and put its artifact in place, exit 0. The signal is remembered, and the next
    phase or the commit stops the export."""
    from fastdiff.exporter.artifact import ArtifactWriter
    from fastdiff.exporter.progress import phase
    from fastdiff.runtime import errors

    monkeypatch.setattr(errors, "_stop_signal", None)

    class Finalized:
        def __del__(self) -> None:
            errors._stop(signal.SIGINT, None)  # as the handler runs when Ctrl-C arrives here

    Finalized()  # the KeyboardInterrupt raised in __del__ is printed and dropped
    with pytest.raises(KeyboardInterrupt):
        with phase("the next phase"):
            pass
    with pytest.raises(KeyboardInterrupt):
        with ArtifactWriter(exports / "a") as writer:
            writer.path("unet/weights.safetensors").write_bytes(b"new")
            writer.commit(read_manifest(tiny_artifact))
    assert list(exports.iterdir()) == []


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


@pytest.mark.slow  # fastdiff-export runs until it writes
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
