"""What a user installs: the wheel carries every file the packages read, and a missing one is reported as fastdiff's
fault. (.ci/run builds the wheel, installs it into a fresh environment and runs the demo outside the checkout.)"""

from __future__ import annotations

import fnmatch
import subprocess
from pathlib import Path

import pytest

from fastdiff.runtime.errors import FastDiffError

ROOT = Path(__file__).parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def test_every_data_file_of_the_packages_is_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    data = config.get("package-data", {})
    for package, folder in config["package-dir"].items():
        tracked = subprocess.run(
            ["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
        for rel in tracked:
            inside = Path(rel).relative_to(folder)
            if inside.suffix == ".py":
                continue
            # the file belongs to the deepest listed package that holds it; its package-data is relative to that one
            parts = inside.parent.parts
            depth = max(n for n in range(len(parts) + 1) if ".".join((package, *parts[:n])) in config["packages"])
            owner = ".".join((package, *parts[:depth]))
            name = Path(*inside.parts[depth:]).as_posix()
            patterns = data.get(owner, [])
            assert any(fnmatch.fnmatch(name, p) for p in patterns), f"{rel} is not in {owner}'s package-data"


def test_a_file_the_package_should_ship_is_reported_as_a_bug(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fastdiff.exporter import random_models

    monkeypatch.setattr(random_models, "__file__", str(tmp_path / "random_models.py"))
    with pytest.raises(FastDiffError) as raised:
        random_models.sdxl_base_arch()
    assert "sdxl-base-1.0.json" in raised.value.problem and "bug" in raised.value.fix
    assert "disk" not in str(raised.value)
