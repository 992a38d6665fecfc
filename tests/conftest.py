"""Shared fixtures. CPU exports are slow (a tiny UNet package takes 30-60 s on 2 cores): build each once a session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXPORT_RESOLUTIONS = ["64", "96x64"]  # width x height; the tiny VAE scales by 8
EXPORT_CONSOLE = "tiny-export-console.txt"  # what the tiny artifact's export printed, in the session's temp folder


ENTRY_POINTS = {
    "fastdiff-export": "fastdiff.exporter.cli:main",
    "fastdiff-run": "fastdiff.runtime.cli:run_main",
    "fastdiff-inspect": "fastdiff.runtime.cli:inspect_main",
}


def run_cli(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run one of the installed console scripts' entry points in a fresh interpreter."""
    module, func = ENTRY_POINTS[args[0]].split(":")
    code = f"import sys; from {module} import {func}; sys.argv[0] = {args[0]!r}; {func}()"
    return subprocess.run(
        [sys.executable, "-c", code, *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def invoke_cli(*args: str) -> subprocess.CompletedProcess:
    """The same command run in this process by click's test runner: what a refusal test checks (exit status, stderr,
    no traceback) without a fresh interpreter's seconds of imports. run_cli for what needs a process of its own
    (signals, an environment read at import, what the command imports)."""
    import importlib
    import signal
    import traceback

    from click.testing import CliRunner

    module, func = ENTRY_POINTS[args[0]].split(":")
    command = getattr(importlib.import_module(module), func)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}  # the commands install their own
    try:
        result = CliRunner().invoke(command, list(args[1:]), prog_name=args[0])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))  # as the console script would print it
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, stderr)


# Loads an artifact and generates (output_type "latent": the GPU may still be busy at exit) in a pipeline that Python
# does not destroy at exit: reachable from builtins, through an import hook's globals. Prints the folders that the
# packages' libraries were loaded from: where torch extracted them (under $TMPDIR in torch 2.13, a folder of /tmp
# whatever $TMPDIR says in torch 2.11).
EXIT_PROBE = """
import builtins, json, os, sys
from fastdiff.runtime import load_pipeline
_import = builtins.__import__
builtins.__import__ = lambda *args, **kwargs: _import(*args, **kwargs)
pipe = load_pipeline(sys.argv[1], device=sys.argv[2])
pipe.set_progress_bar_config(disable=True)
pipe("a cat", num_inference_steps=2, output_type="latent")
maps = open("/proc/self/maps").read().split()
print(json.dumps(sorted({os.path.dirname(p) for p in maps if "/data/aotinductor/" in p and p.endswith(".so")})))
"""


def assert_no_packages_left_at_exit(artifact: Path, device: str, tmp_path: Path) -> None:
    """Each package is extracted into a temp folder while it is loaded; the process exits cleanly and leaves none."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE, str(artifact), device], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    extracted = [Path(p) for p in json.loads(proc.stdout.splitlines()[-1])]
    assert extracted  # the packages' libraries were seen loaded from the folders they were extracted into
    assert [p for p in extracted if p.exists()] == []
    assert list(tmp.iterdir()) == []


def assert_matches_diffusers(mine, reference, **kwargs) -> None:
    """A fastdiff pipeline and diffusers' own give the same latents and images for the same request and seed
    (a 64x64 image of a cat in 4 steps, unless `kwargs` say otherwise)."""
    import torch

    args = {"prompt": "a photo of a cat", "num_inference_steps": 4, "height": 64, "width": 64, **kwargs}
    for output_type, tol in (("latent", 1e-4), ("np", 1e-5)):
        a = mine(**args, output_type=output_type, generator=torch.Generator().manual_seed(3)).images
        b = reference(**args, output_type=output_type, generator=torch.Generator().manual_seed(3)).images
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-4, atol=tol)


@pytest.fixture(scope="session", autouse=True)
def fastdiff_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the tiny checkpoint out of the user's ~/.cache, and the hub offline."""
    cache = tmp_path_factory.mktemp("fastdiff-cache")
    os.environ["FASTDIFF_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return cache


@pytest.fixture(scope="session")
def tiny_checkpoint(fastdiff_cache: Path) -> Path:
    from fastdiff.exporter.random_models import build_tiny_sdxl, default_tiny_path

    return build_tiny_sdxl(default_tiny_path())


@pytest.fixture(scope="session")
def tiny_artifact(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 CPU artifact of the tiny model at two resolutions, batch size 2 (UNet batch up to 4), via the CLI."""
    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    res_args = [a for r in EXPORT_RESOLUTIONS for a in ("--res", r)]
    proc = run_cli("fastdiff-export", "tiny-sdxl", *res_args, "--batch-size", "2", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    (tmp_path_factory.getbasetemp() / EXPORT_CONSOLE).write_text(proc.stderr)  # for tests of what the export prints
    return out


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_artifact: Path):
    from fastdiff.runtime import load_pipeline

    pipe = load_pipeline(tiny_artifact, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def reference_pipeline(tiny_checkpoint: Path):
    """diffusers' own StableDiffusionXLPipeline on the same checkpoint, with the same passes (SDPA, fused QKV)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe
