"""What the refusal tests share: bad input gets a clear error, never a traceback, a crash or a half-written artifact;
nothing the user had is lost.

Every case runs through the console scripts (`error: ...` on stderr, non-zero exit) and, where the Python API has the
same entry point, through it (a FastDiffError). Damaged artifacts are copies of the session artifact, which is never
modified.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import invoke_cli, run_cli

from fastdiff.runtime.format import MANIFEST_NAME, describe_files

INVALID_RES = [  # --res values every command refuses, and the phrase its error names
    ("100", "not a multiple of 8"),
    ("abc", "invalid resolution 'abc'"),
    ("8x8", "between 64 and 4096"),
    ("99999", "between 64 and 4096"),
    ("0", "between 64 and 4096"),
]


def assert_clean_error(proc: subprocess.CompletedProcess, *phrases: str, usage: bool = False) -> None:
    """Non-zero exit, `error: ...` on stderr naming the problem, no traceback anywhere.

    usage: click rejected an option value itself; it prints `Error: Invalid value for ...` after a usage line.
    """
    both = proc.stdout + proc.stderr
    assert proc.returncode != 0, both
    assert "Traceback" not in both, both
    assert "error:" in (proc.stderr.lower() if usage else proc.stderr), proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr, f"{phrase!r} not in:\n{proc.stderr}"


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its content, to check that a refused command changed nothing."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def copy_artifact(artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "art"))


def edit_manifest(root: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    path = root / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def run(artifact: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """fastdiff-run with a cheap request (1 step), writing into tmp_path unless --out is given."""
    out = [] if "--out" in args else ["--out", str(tmp_path / "img.png")]
    return invoke_cli("fastdiff-run", str(artifact), "-p", "a cat", "--steps", "1", "--device", "cpu", *out, *args)


def images_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".png", ".jpg", ".webp"))


def export(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = run_cli("fastdiff-export", *args, env=env) if env else invoke_cli("fastdiff-export", *args)
    return proc, time.perf_counter() - start


def assert_export_refused(proc: subprocess.CompletedProcess, seconds: float, folder: Path, *phrases: str, **kw):
    assert_clean_error(proc, *phrases, **kw)
    # Failed before any compile: the exporter logs each torch.export / AOTInductor phase as it starts.
    assert "torch.export" not in proc.stderr and "AOTInductor" not in proc.stderr, proc.stderr
    assert seconds < 120, f"took {seconds:.0f} s to fail"
    leftovers = [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    assert leftovers == [], leftovers


def reseal(root: Path, edit: Callable[[dict], object] | None = None) -> None:
    """Rewrite the manifest to match the folder's files (sizes and hashes), after `edit` changed it: a consistent
    tamper, as whoever can write the artifact can make it."""
    path = root / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    if edit is not None:
        edit(manifest)
    listed = describe_files(root)
    manifest["files"] = {**{k: v for k, v in manifest["files"].items() if k not in listed}, **listed}
    path.write_text(json.dumps(manifest, indent=2))
