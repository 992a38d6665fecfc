"""Writing an artifact: built in a hidden temporary folder beside the target and renamed into place when complete.

A failed or interrupted export leaves nothing behind, and an existing artifact is only replaced (with
`overwrite`) once its replacement is complete.
"""

from __future__ import annotations

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
        check_target(self.out, self.overwrite)
        missing = [p for p in (self.out.parent, *self.out.parent.parents) if not p.exists()]
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            # Not mkdtemp, which makes the folder private: the artifact keeps the umask's permissions.
            self.root = self.out.with_name(f".{self.out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
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
        shutil.rmtree(self.root, ignore_errors=True)  # after commit() it no longer exists
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
        if self.out.exists():  # --overwrite: swap, then drop the old one
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            self.out.rename(old)
            self.root.rename(self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.root.rename(self.out)
        return self.out


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) that are still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
