"""Writing an artifact: built in a hidden temporary folder beside the target and renamed into place when complete.

A failed or interrupted export leaves nothing behind, and an existing artifact is only replaced (with
`overwrite`) once its replacement is complete. An export killed outright (SIGKILL, the OOM killer, a power cut) cannot
clean up: its hidden folder keeps an exclusive lock file beside it while the export runs, and the next export from
the same host to the same target removes the folders whose lock no process holds.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import json
import os
import re
import shutil
import socket
import uuid
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from fastdiff.runtime.format import (
    MANIFEST_NAME,
    FastDiffError,
    Manifest,
    describe_files,
    is_artifact,
    raise_if_stopped,
    set_default_mode,
    to_storage_layout,
)

from .progress import log


def check_target(out: Path, overwrite: bool) -> None:
    """An export may write `out` if it does not exist, or replace it with --overwrite if it is an empty folder or an
    artifact that holds nothing its manifest does not list. Checked before the export starts and again before the
    artifact is put in place: the target may have appeared, or changed, in the minutes between."""
    if not os.path.lexists(out):  # a link to nothing exists too: the artifact could not take its name
        return
    if os.path.ismount(out):  # the artifact is built beside --out: it could not be renamed onto a mount
        raise FastDiffError(f"{out} is a mount point", f"export into a folder inside it, e.g. --out {out / 'artifact'}")
    empty = out.is_dir() and not any(out.iterdir())
    if not empty and (not out.is_dir() or not is_artifact(out)):
        raise FastDiffError(
            f"{out} exists and is not a fastdiff artifact; refusing to replace it", "choose another --out"
        )
    if not overwrite:
        what = "an empty folder" if empty else "an artifact"
        raise FastDiffError(f"{out} already exists ({what})", "pass --overwrite to replace it, or choose another --out")
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
    except (OSError, ValueError, RecursionError):
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
        self._lock = None
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            # Not mkdtemp, which makes the folder private: the artifact keeps the umask's permissions.
            self.root = self.out.with_name(f"{_partial_prefix(self.out)}{os.getpid()}-{uuid.uuid4().hex[:8]}")
            self._lock = _create_locked(_lock_path(self.root))  # before the folder: no folder without a held lock
            self.root.mkdir()
        except OSError as e:
            if self._lock is not None:
                _unlock(self._lock, _lock_path(self.root))
            _remove_empty(missing)
            file = next((p for p in self.out.parents if p.exists() and not p.is_dir()), None)
            reason = f"{file} is a file, not a folder" if file else e.strerror
            raise FastDiffError(
                f"cannot write to {self.out.parent}: {reason}", "choose an --out in a writable folder"
            ) from None
        self._created = missing  # folders made for --out, removed again if the export fails

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            _discard(self.root, self.out)  # after commit() it no longer exists, or holds the old artifact
        finally:
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
        try:
            save_file(stored, path, metadata={"format": "pt"})
        except SafetensorError as e:  # its I/O errors are not OSErrors: made one, for the CLI's one-line message
            found = re.search(r"\(os error (\d+)\)|Os \{ code: (\d+)", str(e))  # safetensors >= 0.5, and 0.4
            if found is None:
                raise
            code = int(found[1] or found[2])
            raise OSError(code, os.strerror(code), str(path)) from None
        set_default_mode(path)
        return sorted(nhwc)

    def commit(self, manifest: Manifest) -> Path:
        raise_if_stopped()  # never put in place an artifact whose export was told to stop
        manifest.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest.files = describe_files(self.root)
        manifest.write(self.root)
        check_target(self.out, self.overwrite)
        if not self.overwrite or not self.out.exists():
            if not _rename2(self.root, self.out, RENAME_NOREPLACE):  # a plain rename where the filesystem cannot
                self.root.rename(self.out)
        elif not _rename2(self.root, self.out, RENAME_EXCHANGE):  # --overwrite: the old artifact is now at self.root
            # Where the filesystem cannot swap two folders in one step: two renames, the old artifact moved aside
            # under this export's lock, so an export killed between them leaves it to be put back (_discard).
            self.out.rename(_old_path(self.root))
            self.root.rename(self.out)
            _remove(_old_path(self.root))
        return self.out


def _partial_prefix(out: Path) -> str:
    # The host's name in it: an export cleans up only after its own host's exports, whose locks it can test even where
    # a network filesystem keeps locks local to each host (NFS mounted with local_lock, say).
    return f".{out.name}.partial-{socket.gethostname()}-"


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


def _remove(path: Path) -> bool:
    """Remove a folder, or the link that stands for one (an --out that was a symlink to an artifact); True if there was
    one."""
    if path.is_symlink():
        path.unlink()
        return True
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
        return True
    return False


def _discard(root: Path, out: Path) -> bool:
    """Remove an export's partial folder `root`, and the artifact it replaced if it had moved that aside (killed, or
    failed, between the two renames): put back if nothing is at `out`, kept if something other than an artifact is
    there now. True if anything was there."""
    old = _old_path(root)
    if old.is_dir() and not out.exists():
        old.rename(out)
        log(f"put back {out.name}, which an export had moved aside to replace it")
    elif old.is_dir() and not is_artifact(out):
        log(f"{out} is not the artifact an export replaced; that one is kept at {old}")
        old = None
    return any([_remove(root), old is not None and _remove(old)])


def _remove_killed_exports(out: Path) -> None:
    """Remove what exports from this host to `out` killed outright left beside it (the folders whose lock no process
    holds, and the lock files of exports killed before they renamed them into place)."""
    name = re.compile(re.escape(_partial_prefix(out)) + r"(\d+)-[0-9a-f]{8}\.lock(\.new)?")
    for lock_path in out.parent.glob(glob.escape(_partial_prefix(out)) + "*.lock*"):
        if not (match := name.fullmatch(lock_path.name)):  # another host's
            continue
        if match[2]:  # not yet locked by its export (no folder yet): its process tells whether it still runs
            if not _running(int(match[1])):
                lock_path.unlink(missing_ok=True)
            continue
        if (fd := _lock(lock_path)) is None:  # running
            continue
        root = lock_path.with_name(lock_path.name.removesuffix(".lock"))
        try:
            if _discard(root, out):
                log(f"removed {root.name}, left beside {out.name} by an export that was killed")
        finally:
            _unlock(fd, lock_path)


def _running(pid: int) -> bool:
    if pid <= 0:  # not a process (0 and below name process groups)
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        pass
    return True


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _rename2(source: Path, target: Path, flag: int) -> bool:
    """Linux's renameat2: RENAME_NOREPLACE fails if `target` exists (FastDiffError), RENAME_EXCHANGE swaps the two in
    one step. False where the C library or the filesystem cannot (the caller renames as it can)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), flag) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    if code == errno.EEXIST:
        check_target(target, overwrite=False)  # raises: it appeared since the check
    raise OSError(code, os.strerror(code), str(target))


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) that are still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
