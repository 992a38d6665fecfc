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
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .errors import FastDiffError
from .format import (
    MANIFEST_NAME,
    Manifest,
    check_digest_format,
    check_files,
    confined_path,
    manifest_digest,
    parse_manifest,
    read_manifest_bytes,
)


class ArtifactFolder:
    """An artifact's folder held open: its manifest, the manifest's digest, and confined paths to its files."""

    def __init__(self, root: str | Path, expected_digest: str | None = None) -> None:
        self.root = Path(root)
        self._verifier: ThreadPoolExecutor | None = None
        self._ahead: dict[str, Future[bytes]] = {}
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
        it leaves the folder."""
        return confined_path(self.base, rel, self.root)

    def verify_ahead(self, rels: list[str]) -> None:
        """Read and hash these files (the packages a load opens) in order on a thread, beside the rest of the load;
        read_verified then takes what it did."""
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix="fastdiff-verify")
        self._ahead = {rel: self._verifier.submit(self._read_checked, rel) for rel in rels}

    def read_verified(self, rel: str) -> bytes:
        """The whole file `rel`, checked against its size and sha256 in the manifest (for the packages: the code
        that is opened is the code that was hashed)."""
        ahead = self._ahead.pop(rel, None)
        return ahead.result() if ahead is not None else self._read_checked(rel)

    def _read_checked(self, rel: str) -> bytes:
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
        """format.check_files through the folder's handle."""
        return check_files(self.base, self.manifest, full_hash, self.root)

    def check_unchanged(self) -> None:
        """Refuse a load whose folder's manifest changed while it ran (files rewritten in place)."""
        if manifest_digest(read_manifest_bytes(self.root, dir_fd=self._fd)) != self.digest:
            raise FastDiffError(
                f"artifact {self.root} changed while it was loading", "load it again once it is no longer written"
            )

    def close(self) -> None:
        if getattr(self, "_verifier", None) is not None:
            self._verifier.shutdown(wait=True, cancel_futures=True)
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> ArtifactFolder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
