"""Where fastdiff-run writes its images (--out): a path it cannot write, or one taken by a folder or the user's own
file, is refused before generating; nothing is replaced without --overwrite, nor left half-written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import assert_clean_error, run

from fastdiff.runtime import FastDiffError


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
