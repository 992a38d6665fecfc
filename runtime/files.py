"""File permissions: what fastdiff writes gets the mode a plain open() or mkdir() would give it (the umask's)."""

from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    """The process's umask, read without setting it where Linux shows it (setting it, even back, would briefly change
    the mode of files other threads create)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_mode(path: Path) -> None:
    """Files made by mkstemp, or by libraries that create them private (safetensors), are 0600: an artifact built by
    one user (a CI job) and served by another (a container's) would not load. Give them 0666 less the umask."""
    os.chmod(path, 0o666 & ~_umask())
