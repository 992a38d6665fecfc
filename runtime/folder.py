"""An artifact folder opened for one load: one folder, whole, and nothing outside it.

The folder is opened once, as a directory handle, and every file of the load is reached through that handle: an
export with --overwrite that renames another folder onto the path meanwhile cannot mix two artifacts' files. Each
path is one the manifest lists, normalised, relative, and resolving (links followed) inside the folder. The manifest's
digest is taken from the bytes that are parsed, and compared again at the end of the load. Compiled packages, which
hold code, are read whole and hashed against the manifest before anything opens them.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .errors import FastDiffError
from .format import (
    MANIFEST_NAME,
    Manifest,
    check_digest_format,
    is_relative_inside,
    manifest_digest,
    parse_manifest,
    read_manifest_bytes,
    sha256_file,
)

HASH_THREADS = 4  # hashlib lets go of the GIL: files hash in parallel, at the disk's speed rather than one core's


class ArtifactFolder:
    """An artifact's folder held open: its manifest, the manifest's digest, and confined paths to its files."""

    def __init__(self, root: str | Path, expected_digest: str | None = None) -> None:
        self.root = Path(root)
        if expected_digest is not None:
            check_digest_format(expected_digest)
        read_manifest_bytes(self.root)  # the folder and its manifest are there (a clear error if not)
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
        self._fd = os.open(self.root, flags)
        try:
            # On Linux, paths through the handle stay in this folder whatever its path comes to name.
            through_handle = Path(f"/proc/self/fd/{self._fd}")
            self.base = through_handle if sys.platform.startswith("linux") and through_handle.is_dir() else self.root
            data = read_manifest_bytes(self.root, dir_fd=self._fd)
            self.digest = manifest_digest(data)
            if expected_digest is not None and self.digest != expected_digest:
                raise FastDiffError(
                    f"artifact {self.root} has digest {self.digest}, not the expected {expected_digest}",
                    "load the artifact your build produced, or pin the digest fastdiff-inspect prints for this one",
                )
            self.manifest: Manifest = parse_manifest(data, self.root / MANIFEST_NAME)
        except BaseException:
            self.close()
            raise

    def path(self, rel: str) -> Path:
        """The path of the artifact's file `rel` (one its manifest lists), through the folder's handle; refused if
        a link in it leads out of the folder."""
        if not is_relative_inside(rel):
            raise FastDiffError(f"artifact {self.root}: path {rel!r} leaves the folder", "export the model again")
        path = self.base / rel
        inside = os.path.realpath(self.base)
        if not os.path.realpath(path).startswith(inside + os.sep):
            raise FastDiffError(
                f"artifact {self.root}: {rel} links to {os.path.realpath(path)}, outside the artifact folder",
                "replace the link with the file itself, or export the model again",
            )
        return path

    def read_verified(self, rel: str) -> bytes:
        """The whole file `rel`, checked against its size and sha256 in the manifest (for the packages: the code
        that is opened is the code that was hashed)."""
        entry = self.manifest.files.get(rel)
        if entry is None:
            raise FastDiffError(f"artifact {self.root}: {rel} is not listed in its manifest", "export the model again")
        try:
            with open(self.path(rel), "rb") as f:
                data = f.read(entry["size"] + 1)
        except OSError as e:
            raise FastDiffError(f"artifact {self.root}: cannot read {rel}: {e.strerror or e}", "export again") from None
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise FastDiffError(
                f"artifact {self.root} is damaged: {rel} does not match the sha256 in its manifest",
                "export the model again (fastdiff-inspect --verify lists every file that differs)",
            )
        return data

    def check_files(self, full_hash: bool = False) -> list[str]:
        """Every listed file present inside the folder as a regular file of its recorded size; with `full_hash`,
        its content hashed too (files in parallel). One line per problem."""
        problems, to_hash = [], []
        for rel, entry in self.manifest.files.items():
            try:
                path = self.path(rel)
            except FastDiffError as e:
                problems.append(f"{rel}: {e.problem.split(': ', 1)[-1]}")
                continue
            try:
                info = os.stat(path)
            except OSError:
                problems.append(f"{rel}: missing")
                continue
            if not stat.S_ISREG(info.st_mode):
                problems.append(f"{rel}: not a regular file")
            elif info.st_size != entry["size"]:
                problems.append(
                    f"{rel}: size {info.st_size} bytes, manifest says {entry['size']} (truncated or replaced)"
                )
            elif full_hash:
                to_hash.append((rel, path, entry))
        with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="fastdiff-hash") as pool:
            digests = pool.map(lambda job: sha256_file(job[1]), to_hash)
            for (rel, _, entry), digest in zip(to_hash, digests, strict=True):
                if digest != entry["sha256"]:
                    problems.append(f"{rel}: sha256 differs from the manifest (corrupted or replaced)")
        return problems

    def check_unchanged(self) -> None:
        """Refuse a load whose folder's manifest changed while it ran (files rewritten in place)."""
        if manifest_digest(read_manifest_bytes(self.root, dir_fd=self._fd)) != self.digest:
            raise FastDiffError(
                f"artifact {self.root} changed while it was loading", "load it again once it is no longer written"
            )

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> ArtifactFolder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
