"""Reading an artifact's files from disk while the process still imports torch.

Where the page cache does not hold the artifact (a fresh node, a new replica), its load reads gigabytes from disk
after seconds of `import torch`; read from the program's first lines, they come in during the import. Imports only
the standard library and the runtime's torch-free modules (the manifest's among them), so that it can run first
(`fastdiff-run` does; a server calls `prefetch` before it imports torch).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

from .errors import FastDiffError
from .format import CompiledComponent, Resolution, confined_path, parse_resolution, read_manifest

CHUNK = 64 << 20  # bytes per read: few enough reads that the thread rarely waits for the GIL


def files_to_prefetch(
    artifact_dir: str | Path, resolutions: Iterable[str | int | Resolution] | None = None
) -> list[Path]:
    """The files a load of `artifact_dir` at `resolutions` (default: all) reads, in the order it reads them: the VAE
    decoder's and text encoders' weights, the UNet's, the VAE decoder's packages for those resolutions, the text
    encoders' packages, the other files (tokenizers, stock text encoders, scheduler), then the UNet's packages for
    those resolutions. Empty if the folder holds no valid artifact (the load reports why)."""
    root = Path(artifact_dir)
    if isinstance(resolutions, (str, int, Resolution)):  # one resolution, not an iterable of them
        resolutions = [resolutions]
    try:
        manifest = read_manifest(root)
        keys = None if resolutions is None else {parse_resolution(r).key for r in resolutions}
    except (FastDiffError, OSError, TypeError):
        return []
    unet, vae, encoders = manifest.unet, manifest.vae_decoder, manifest.text_encoders
    weights = [c.weights for c in (vae, *encoders, unet)]

    def packages_of(c: CompiledComponent) -> list[str]:
        return [rel for key, rel in c.packages.items() if keys is None or key in keys]

    small_packages = packages_of(vae) + [rel for c in encoders for rel in c.packages.values()]
    every_package = {rel for c in (unet, vae, *encoders) for rel in c.packages.values()}
    rest = [rel for rel in manifest.files if rel not in every_package and rel not in weights]
    listed = weights + small_packages + rest + packages_of(unet)
    ordered = [rel for rel in dict.fromkeys(listed) if rel in manifest.files]
    return [path for rel in ordered if (path := _inside(root, rel)) is not None and path.is_file()]


def _inside(root: Path, rel: str) -> Path | None:
    """root/rel if it resolves inside the artifact folder: a link must not send the reads elsewhere (/dev/zero, a
    FIFO); the load reports it."""
    try:
        return confined_path(root, rel)
    except FastDiffError:
        return None


def prefetch(
    artifact_dir: str | Path, resolutions: Iterable[str | int | Resolution] | None = None
) -> threading.Thread | None:
    """Start reading the files a load of `artifact_dir` at `resolutions` will read into the page cache, on a daemon
    thread (returned; None if there is nothing to read). Errors are left to the load."""
    paths = files_to_prefetch(artifact_dir, resolutions)
    if not paths:
        return None
    thread = threading.Thread(target=_read, args=(paths,), name="fastdiff-prefetch", daemon=True)
    thread.start()
    return thread


def _read(paths: list[Path]) -> None:
    buffer = bytearray(CHUNK)
    for path in paths:
        try:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):  # releases the GIL while the disk reads
                    pass
        except OSError:
            pass
