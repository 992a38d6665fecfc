"""Shared fixtures. CPU exports are slow (a tiny UNet package takes 30-60 s on 2 cores): each is made once a session,
in the background from the session's start (SessionExports).

Two tiers: a test that uses a session export (SESSION_EXPORTS), directly or through another fixture, or that is marked
`slow` (it exports or compiles by itself) is slow; every other test is marked `fast`. `python -m pytest -m fast` runs
the fast tier alone, and starts no export; `python -m pytest` runs both.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

EXPORT_RESOLUTIONS = ["64", "96x64"]  # width x height; the tiny VAE scales by 8
EXPORT_CONSOLE = "tiny_artifact.console.txt"  # what the tiny artifact's export printed, in the session's temp folder


ENTRY_POINTS = {
    "fastdiff-export": "fastdiff.exporter.cli:main",
    "fastdiff-run": "fastdiff.runtime.cli:run_main",
    "fastdiff-inspect": "fastdiff.runtime.cli:inspect_main",
}


def cli_command(*args: str) -> list[str]:
    """The command line that runs one of the installed console scripts' entry points in a fresh interpreter."""
    module, func = ENTRY_POINTS[args[0]].split(":")
    code = f"import sys; from {module} import {func}; sys.argv[0] = {args[0]!r}; {func}()"
    return [sys.executable, "-c", code, *args[1:]]


def run_cli(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run one of the installed console scripts' entry points in a fresh interpreter."""
    return subprocess.run(
        cli_command(*args), capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
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
# packages' libraries were loaded from: where the runtime extracted them (a folder of $TMPDIR).
EXIT_PROBE = """
import builtins, json, os, sys
from fastdiff.runtime import load_pipeline
_import = builtins.__import__
builtins.__import__ = lambda *args, **kwargs: _import(*args, **kwargs)
pipe = load_pipeline(sys.argv[1], device=sys.argv[2])
pipe.set_progress_bar_config(disable=True)
pipe("a cat", num_inference_steps=2, output_type="latent")
maps = open("/proc/self/maps").read().split()
print(json.dumps(sorted({os.path.dirname(p) for p in maps if "/fastdiff-package-" in p and p.endswith(".so")})))
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
def sd_checkpoint(fastdiff_cache: Path) -> Path:
    from fastdiff.exporter.random_models import tiny_sd

    return tiny_sd()


@pytest.fixture(scope="session")
def pixart_checkpoint(fastdiff_cache: Path) -> Path:
    from fastdiff.exporter.random_models import tiny_pixart

    return tiny_pixart()


DISTILLED_UNET = {  # SSD-1B's kind of UNet, tiny
    # one resnet per down block, two per up block: a depth per layer, deeper on the way up
    "transformer_layers_per_block": [[1], [2]],
    "reverse_transformer_layers_per_block": [[3, 1], [1, 1]],
    "mid_block_type": "UNetMidBlock2D",
}


@pytest.fixture(scope="session")
def distilled_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fastdiff.exporter.random_models import TINY_ARCH, build_random_checkpoint

    arch = {**TINY_ARCH, "unet": {**TINY_ARCH["unet"], **DISTILLED_UNET}}
    return build_random_checkpoint(tmp_path_factory.mktemp("distilled") / "checkpoint", arch, seed=5)


# The session's exports: fixture -> (the checkpoint fixture it exports, fastdiff-export's arguments but --out;
# "{checkpoint}" stands for the checkpoint's folder).
SESSION_EXPORTS = {
    # fp32 CPU artifact of the tiny model at two resolutions, batch size 2 (UNet batch up to 4), its packages compiled
    # in two worker processes
    "tiny_artifact": (
        "tiny_checkpoint",
        ["tiny-sdxl", *(a for r in EXPORT_RESOLUTIONS for a in ("--res", r)), "--batch-size", "2", "--jobs", "2"],
    ),
    # also a local diffusers checkpoint folder given as MODEL (not a preset), and transformers' text encoders shipped;
    # torchao's quantized program through the compile workers
    "int8_artifact": (
        "tiny_checkpoint",
        ["{checkpoint}", "--res", "64", "--quantize", "int8", "--text-encoders", "stock", "--jobs", "2"],
    ),
    # a setting for one component (that leaves its numerics alone: no template kernels on the CPU to fuse into)
    "sd_artifact": (
        "sd_checkpoint",
        ["tiny-sd", "--res", "64", "--batch-size", "2", "--inductor-config", "vae_decoder:epilogue_fusion=false"],
    ),
    "distilled_artifact": ("distilled_checkpoint", ["{checkpoint}", "--res", "64", "--text-encoders", "stock"]),
    "pixart_artifact": ("pixart_checkpoint", ["tiny-pixart", "--res", "64", "--batch-size", "2"]),
    # the transformers T5 encoder shipped as is, at 96x64, with attention compiled as plain matmul + softmax
    "pixart_stock_t5_artifact": (
        "pixart_checkpoint",
        ["tiny-pixart", "--res", "96x64", "--batch-size", "2", "--text-encoders", "stock", "--attention", "math"],
    ),
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: exports or compiles by itself, or uses a session export")
    config.addinivalue_line("markers", "fast: needs no export and no compile of its own (every test not slow)")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks the tests that use a session export (fixturenames: every fixture a test needs, also through others) slow,
    and every test that is not slow fast."""
    for item in items:
        if item.get_closest_marker("slow") is None and SESSION_EXPORTS.keys() & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.fast)


class SessionExports:
    """The session's CPU exports, started together when it starts and waited for by the fixtures that use them.

    An export keeps about one core busy (torch.export, Inductor's code generation, one C++ compile at a time), and
    they were 11 of CI's 16-19 minutes one after another: two run at a time, beside the tests that need none.
    """

    def __init__(self, workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="session-export")
        self._jobs: dict[str, tuple[Path, Future]] = {}
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._closed = False

    def start(self, name: str, args: list[str], out: Path) -> None:
        command = cli_command("fastdiff-export", *args, "--device", "cpu", "--out", str(out))
        self._jobs[name] = (out, self._pool.submit(self._run, command))

    def _run(self, command: list[str]) -> subprocess.CompletedProcess | None:
        with self._lock:
            if self._closed:
                return None
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self._running.add(proc)
        try:
            stdout, stderr = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            stderr += "\n(the test session stopped it after 900 s)"
        finally:
            with self._lock:
                self._running.discard(proc)
        return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)

    def result(self, name: str) -> tuple[Path, subprocess.CompletedProcess]:
        out, job = self._jobs[name]
        return out, job.result()

    def close(self) -> None:
        """Stop what still runs (a session cut short), wait for the threads."""
        with self._lock:
            self._closed = True
            for proc in self._running:
                proc.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session", autouse=True)
def session_exports(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Starts the exports that the session's tests use, those most tests use first."""
    used = [name for item in request.session.items for name in item.fixturenames if name in SESSION_EXPORTS]
    exports = SessionExports()
    for name in sorted(set(used), key=used.count, reverse=True):
        if name == "int8_artifact" and importlib.util.find_spec("torchao") is None:
            continue
        checkpoint_fixture, args = SESSION_EXPORTS[name]
        checkpoint = str(request.getfixturevalue(checkpoint_fixture))  # built first: exports of a preset build it too
        args = [a.replace("{checkpoint}", checkpoint) for a in args]
        exports.start(name, args, tmp_path_factory.mktemp(name) / name.removesuffix("_artifact"))
    yield exports
    exports.close()


def exported(request: pytest.FixtureRequest, name: str) -> Path:
    """The session's export `name`, once it is done; what it printed is kept in the session's temp folder."""
    out, proc = request.getfixturevalue("session_exports").result(name)
    assert proc.returncode == 0, proc.stderr
    (request.getfixturevalue("tmp_path_factory").getbasetemp() / f"{name}.console.txt").write_text(proc.stderr)
    return out


@pytest.fixture(scope="session")
def tiny_artifact(request: pytest.FixtureRequest) -> Path:
    return exported(request, "tiny_artifact")


@pytest.fixture(scope="session")
def int8_artifact(request: pytest.FixtureRequest) -> Path:
    pytest.importorskip("torchao")
    return exported(request, "int8_artifact")


@pytest.fixture(scope="session")
def sd_artifact(request: pytest.FixtureRequest) -> Path:
    return exported(request, "sd_artifact")


@pytest.fixture(scope="session")
def distilled_artifact(request: pytest.FixtureRequest) -> Path:
    return exported(request, "distilled_artifact")


@pytest.fixture(scope="session")
def pixart_artifact(request: pytest.FixtureRequest) -> Path:
    return exported(request, "pixart_artifact")


@pytest.fixture(scope="session")
def pixart_stock_t5_artifact(request: pytest.FixtureRequest) -> Path:
    return exported(request, "pixart_stock_t5_artifact")


@pytest.fixture(scope="module")
def exact_float32():
    """fp32 without TF32 on a GPU, so that two pipelines can be compared as tightly as on the CPU."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_artifact: Path):
    from fastdiff.runtime import load_pipeline

    pipe = load_pipeline(tiny_artifact, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_loras(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> dict[str, Path]:
    """Two random LoRAs of the tiny SDXL model (its UNet and text encoders), by adapter name: the server's."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionXLPipeline
    from lora_helpers import UNET_TARGETS, make_lora

    root = tmp_path_factory.mktemp("tiny-loras")
    return {
        name: make_lora(StableDiffusionXLPipeline, tiny_checkpoint, root / name, seed, UNET_TARGETS, r=4, lora_alpha=8)
        for name, seed in (("pixel", 1), ("ink", 2))
    }


@pytest.fixture(scope="session")
def reference_pipeline(tiny_checkpoint: Path):
    """diffusers' own StableDiffusionXLPipeline on the same checkpoint, with the same passes (SDPA, fused QKV)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def exports(tmp_path: Path) -> Path:
    """An empty folder the export targets live in: after a refused export it must hold what it held before."""
    folder = tmp_path / "exports"
    folder.mkdir()
    return folder
