"""Writing an artifact: built in a hidden temporary folder beside the target and renamed into place when complete.

A failed or interrupted export leaves nothing behind, and an existing artifact is only replaced (with
`overwrite`) once its replacement is complete. An export killed outright (SIGKILL, the OOM killer, a power cut) cannot
clean up: its hidden folder keeps an exclusive lock file beside it while the export runs, and the next export to the
same target removes the folders whose lock no process holds.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

from fastdiff.runtime.errors import FastDiffError
from fastdiff.runtime.files import set_default_mode
from fastdiff.runtime.manifest import MANIFEST_NAME, Manifest, describe_files, is_artifact
from fastdiff.runtime.weights import to_storage_layout

from .progress import log


def check_target(out: Path, overwrite: bool) -> None:
    """An export may write `out` if it does not exist, or replace it with --overwrite if it is an artifact and holds
    nothing its manifest does not list. Checked
    before the export starts and again before the artifact is put in place: the target may have appeared, or
    changed, in the minutes between."""
    if not out.exists():
        return
    if not overwrite:
        raise FastDiffError(f"{out} already exists", "pass --overwrite to replace it, or choose another --out")
    if not out.is_dir() or not is_artifact(out):
        raise FastDiffError(
            f"{out} exists and is not a fastdiff artifact; refusing to replace it", "choose another --out"
        )
    if foreign := _files_not_in_manifest(out):
        raise FastDiffError(
            f"{out} holds {len(foreign)} file{'s' if len(foreign) > 1 else ''} that its artifact does not list (e.g. "
            f"{foreign[0]}), which replacing it would delete",
            "move them out of the folder, or choose another --out",
        )


def _files_not_in_manifest(root: Path) -> list[str]:
    """Files under an artifact folder that its manifest does not list (a user's images or notes put there)."""
    try:
        listed = json.loads((root / MANIFEST_NAME).read_text()).get("files")
    except (OSError, ValueError):
        listed = None
    listed = set(listed) if isinstance(listed, dict) else set()
    present = (p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir())
    return sorted(rel for rel in present if rel != MANIFEST_NAME and rel not in listed)


class ArtifactWriter:
    def __init__(self, out: Path, overwrite: bool = False) -> None:
        self.out = Path(out).absolute()
        self.overwrite = overwrite
        _remove_killed_exports(self.out)  # first: one may have moved the artifact at `out` aside
        check_target(self.out, self.overwrite)
        missing = [p for p in (self.out.parent, *self.out.parent.parents) if not p.exists()]
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            # Not mkdtemp, which makes the folder private: the artifact keeps the umask's permissions.
            self.root = self.out.with_name(f".{self.out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            self._lock = _create_locked(_lock_path(self.root))  # before the folder: no folder without a held lock
            self.root.mkdir()
        except OSError as e:
            _remove_empty(missing)
            raise FastDiffError(
                f"cannot write to {self.out.parent}: {e.strerror}", "choose an --out in a writable folder"
            ) from None
        self._created = missing  # folders made for --out, removed again if the export fails

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _discard(self.root, self.out)  # after commit() it no longer exists, or holds the old artifact
        _unlock(self._lock, _lock_path(self.root))
        if exc_type is not None:
            _remove_empty(self._created)

    def path(self, rel: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def save_weights(self, rel: str, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Write tensors to one safetensors file; returns the names stored NHWC (see runtime.weights)."""
        stored, nhwc = {}, []
        for name, tensor in tensors.items():
            stored[name], is_nhwc = to_storage_layout(tensor.detach().cpu())
            if is_nhwc:
                nhwc.append(name)
        path = self.path(rel)
        save_file(stored, path, metadata={"format": "pt"})
        set_default_mode(path)
        return sorted(nhwc)

    def commit(self, manifest: Manifest) -> Path:
        manifest.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest.files = describe_files(self.root)
        manifest.write(self.root)
        check_target(self.out, self.overwrite)
        if not self.out.exists():
            self.root.rename(self.out)
        elif not _exchange(self.root, self.out):  # --overwrite: the old artifact is now at self.root, removed on exit
            # Where the filesystem cannot swap two folders in one step: two renames, the old artifact moved aside
            # under this export's lock, so an export killed between them leaves it to be put back (_discard).
            self.out.rename(_old_path(self.root))
            self.root.rename(self.out)
            shutil.rmtree(_old_path(self.root), ignore_errors=True)
        return self.out


def _lock_path(root: Path) -> Path:
    return root.with_name(root.name + ".lock")


def _old_path(root: Path) -> Path:
    return root.with_name(root.name + ".old")


def _create_locked(path: Path) -> int | None:
    """Create the file `path` with an exclusive lock on it, held until _unlock: made under another name and renamed,
    so that no other export can take the lock first. None where the filesystem has no locks (nothing is cleaned)."""
    new = path.with_name(path.name + ".new")
    fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        new.unlink()
        return None
    new.rename(path)
    return fd


def _lock(path: Path) -> int | None:
    """An exclusive lock on the existing file `path`; None if another process holds it, it is gone or not ours."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int | None, path: Path) -> None:
    path.unlink(missing_ok=True)  # while still locked: no other export takes a lock on a file about to go
    if fd is not None:
        os.close(fd)


def _discard(root: Path, out: Path) -> bool:
    """Remove an export's partial folder `root`; if it had moved the artifact it replaces aside and did not put its own
    in place (killed, or failed, between the two renames), put the old one back. True if anything was there."""
    old = _old_path(root)
    if old.is_dir() and not out.exists():
        old.rename(out)
        log(f"put back {out.name}, which an export had moved aside to replace it")
    found = False
    for folder in (root, old):
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            found = True
    return found


def _remove_killed_exports(out: Path) -> None:
    """Remove what exports to `out` killed outright left beside it (the folders whose lock no process holds)."""
    for lock_path in out.parent.glob(glob.escape(f".{out.name}.partial-") + "*.lock"):
        fd = _lock(lock_path)
        if fd is None:  # an export still running
            continue
        root = lock_path.with_name(lock_path.name.removesuffix(".lock"))
        if _discard(root, out):
            log(f"removed {root.name}, left beside {out.name} by an export that was killed")
        _unlock(fd, lock_path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux's renameat2 RENAME_EXCHANGE); False where the C library or the filesystem
    cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) that are still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
