"""The runtime stays slim: no model or pipeline code, no exporter, no torchao or transformers, no compiling at load
and the packages of several resolutions share one copy of the weights; nothing is left in the temp dir at exit."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from conftest import assert_no_packages_left_at_exit

from fastdiff.exporter.random_models import TINY_ARCH, TINY_PIXART_ARCH, TINY_SD_ARCH
from fastdiff.runtime import FastDiffError, load_pipeline
from fastdiff.runtime import loader as loader_module
from fastdiff.runtime import scheduler as scheduler_module
from fastdiff.runtime import weights as weights_module

FORBIDDEN_PREFIXES = ("fastdiff.exporter", "diffusers.models", "diffusers.pipelines")
COMPILERS = {"gcc", "g++", "cc", "c++", "clang", "clang++", "nvcc"}

# Runs in a fresh interpreter: records who imports torchao and which programs are spawned, makes every compile entry
# point raise, then imports the runtime, loads the artifact and generates one image.
PROBE = textwrap.dedent(
    """
    import builtins, json, os, subprocess, sys

    torchao_importers = []
    _import = builtins.__import__

    def _record_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name.split(".")[0] == "torchao":
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}torchao{os.sep}" not in caller:
                torchao_importers.append(caller)
        return _import(name, globals, locals, fromlist, level)

    builtins.__import__ = _record_import

    commands = []
    _popen_init = subprocess.Popen.__init__

    def _record_popen(self, args, *a, **k):
        commands.append([args] if isinstance(args, (str, bytes, os.PathLike)) else [str(x) for x in args])
        return _popen_init(self, args, *a, **k)

    subprocess.Popen.__init__ = _record_popen

    import torch
    import torch._inductor
    import torch._inductor.cpp_builder

    _aoti_load_package = torch._inductor.aoti_load_package

    def _forbid(name):
        def raiser(*args, **kwargs):
            raise AssertionError(f"{name} was called by the runtime")
        return raiser

    torch.compile = _forbid("torch.compile")
    torch.export.export = _forbid("torch.export.export")
    torch._inductor.compile = _forbid("torch._inductor.compile")
    torch._inductor.aoti_compile_and_package = _forbid("torch._inductor.aoti_compile_and_package")
    torch._inductor.aoti_load_package = _forbid("torch._inductor.aoti_load_package")  # test-compiles C++
    torch._inductor.cpp_builder.CppBuilder.build = _forbid("CppBuilder.build")

    artifact, mode = sys.argv[1], sys.argv[2]
    import fastdiff.runtime

    after_import = sorted(sys.modules)
    pipe = fastdiff.runtime.load_pipeline(artifact, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    if mode == "control":  # what the runtime must not do: torch's own package loader compiles a test program
        _aoti_load_package(os.path.join(artifact, pipe.manifest.unet.packages["64x64"]))
    print(json.dumps({
        "after_import": after_import,
        "modules": sorted(m for m, v in sys.modules.items() if v is not None),
        "torchao_importers": torchao_importers,
        "commands": commands,
        "images": [[type(im).__name__, *im.size] for im in images],
    }))
    """
)


def _probe(artifact: Path, mode: str = "plain") -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(artifact), mode],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compiler_runs(commands: list[list[str]]) -> list[list[str]]:
    return [c for c in commands if c and Path(str(c[0]).split()[0]).name in COMPILERS]


@pytest.fixture(scope="module")
def probe(tiny_artifact: Path) -> dict:
    return _probe(tiny_artifact)


def test_generates_an_image(probe: dict) -> None:
    assert probe["images"] == [["Image", 64, 64]]  # the first exported resolution (the default 128 is not)


def test_no_model_pipeline_or_exporter_code(probe: dict) -> None:
    modules = probe["modules"]
    # the listing is real: the runtime and the light diffusers parts it uses are there
    assert {"fastdiff.runtime", "fastdiff.runtime.loader", "diffusers.schedulers", "diffusers.image_processor"} <= set(
        modules
    )
    assert any(m.startswith("diffusers.utils") for m in modules)
    forbidden = [m for m in modules if m.startswith(FORBIDDEN_PREFIXES)]
    assert forbidden == []


def test_no_torchao_or_transformers(probe: dict) -> None:
    """With compiled text encoders and tokenizers run by `tokenizers`, neither torchao nor transformers is imported,
    at import or while loading and generating (transformers 5 would import torchao itself whenever installed)."""
    assert probe["torchao_importers"] == []
    assert not [m for m in probe["modules"] if m.split(".")[0] in ("torchao", "transformers")]


def test_nothing_is_compiled(probe: dict) -> None:
    # the probe made torch.compile, torch.export and Inductor's compile and package-loading functions raise, so
    # getting here means none was called; nor was a C/C++ compiler started
    assert _compiler_runs(probe["commands"]) == []


def test_compile_detection_works(tiny_artifact: Path) -> None:
    """Control for test_nothing_is_compiled: torch's own aoti_load_package does run the compiler, and is seen."""
    assert _compiler_runs(_probe(tiny_artifact, "control")["commands"])


# ---- weights are loaded once per component and bound in place by every resolution's package ----


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Record the weight dicts the loader asks for, the files actually read, and the mapping each compiled package
    is bound to."""
    record: dict = {"weights": [], "reads": [], "packages": []}
    shared_weights, load_weights = loader_module.shared_weights, weights_module.load_weights
    load_module = loader_module.load_module

    def recording_shared_weights(*args, **kwargs):
        weights = shared_weights(*args, **kwargs)
        record["weights"].append(weights)
        return weights

    def recording_load_weights(path, *args, **kwargs):
        record["reads"].append(Path(os.path.realpath(path)))  # through the load's folder handle: the file itself
        return load_weights(path, *args, **kwargs)

    def recording_load_module(path, weights, device, data=None, expects=None):
        record["packages"].append((Path(path), weights))
        return load_module(path, weights, device, data, expects)

    monkeypatch.setattr(loader_module, "shared_weights", recording_shared_weights)
    monkeypatch.setattr(weights_module, "load_weights", recording_load_weights)
    monkeypatch.setattr(loader_module, "load_module", recording_load_module)
    return record


def _unet_call(unet, width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    n, w = 2, width // 8
    return unet(
        torch.randn(n, 4, 8, w, generator=g),
        torch.tensor(500.0),
        torch.randn(n, 77, 64, generator=g),
        torch.randn(n, 32, generator=g),
        torch.tensor([[64, width, 0, 0, 64, width]] * n, dtype=torch.float32),
    )


def test_resolutions_share_weights(tiny_artifact: Path, recorded: dict) -> None:
    pipe = load_pipeline(tiny_artifact, device="cpu")
    assert sorted(pipe.unets) == sorted(pipe.vae_decoders) == ["64x64", "96x64"]
    assert len(recorded["weights"]) == 4  # one set of weights per component, not per package
    by_component: dict[str, list[dict]] = {}
    for path, weights in recorded["packages"]:
        by_component.setdefault(path.parent.name, []).append(weights)
    assert sorted(by_component) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    for component in ("unet", "vae_decoder"):
        bound = by_component[component]
        assert len(bound) == 2, component
        first, second = bound
        assert first.keys() == second.keys()
        for name in first:
            assert first[name].data_ptr() == second[name].data_ptr(), (component, name)

    # The packages use those tensors in place (no copies): zeroing the UNet's output convolution in the shared
    # dict leaves only its bias, a per-channel constant, in the output of both resolutions' packages.
    weight = by_component["unet"][0]["unet.conv_out.weight"]
    before = {w: _unet_call(pipe.unets[f"{w}x64"], w) for w in (64, 96)}
    saved = weight.clone()
    try:
        weight.zero_()
        for w in (64, 96):
            out = _unet_call(pipe.unets[f"{w}x64"], w)
            assert before[w].std(dim=(2, 3)).min() > 1e-3
            assert out.std(dim=(2, 3)).max() == 0, w
    finally:
        weight.copy_(saved)
    torch.testing.assert_close(_unet_call(pipe.unets["64x64"], 64), before[64], rtol=0, atol=0)


def test_resolution_subset(tiny_artifact: Path, tiny_pipeline, recorded: dict) -> None:
    subset = load_pipeline(tiny_artifact, device="cpu", resolutions=["64"])
    subset.set_progress_bar_config(disable=True)
    assert sorted(subset.unets) == sorted(subset.vae_decoders) == ["64x64"]
    resolution_packages = [p for p, _ in recorded["packages"] if p.parent.name in ("unet", "vae_decoder")]
    assert sorted(p.as_posix().split("/")[-2:] for p in resolution_packages) == [
        ["unet", "64x64.pt2"],
        ["vae_decoder", "64x64.pt2"],
    ]
    kwargs = {"prompt": "a cat", "num_inference_steps": 2, "height": 64, "width": 64, "output_type": "latent"}
    mine = subset(**kwargs, generator=torch.Generator().manual_seed(0)).images
    full = tiny_pipeline(**kwargs, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(mine, full, rtol=0, atol=0)


def test_pipelines_share_weights(tiny_artifact: Path, tmp_path: Path, recorded: dict) -> None:
    """A second pipeline over the same artifact (here: its other resolution) reads no weights and adds no copy;
    a weight file changed on disk is read again; weights go with the last pipeline that uses them."""
    art = Path(shutil.copytree(tiny_artifact, tmp_path / "art"))  # no other pipeline of the session holds it
    first = load_pipeline(art, device="cpu", resolutions=["64"])
    assert len(recorded["reads"]) == 4
    second = load_pipeline(art, device="cpu", resolutions=["96x64"])
    assert len(recorded["reads"]) == 4
    first_weights, second_weights = recorded["weights"][:4], recorded["weights"][4:]
    assert all(a is b for a, b in zip(first_weights, second_weights, strict=True))
    unet_first, unet_second = first.unets["64x64"].weights, second.unets["96x64"].weights
    assert all(unet_first[n].data_ptr() == unet_second[n].data_ptr() for n in unet_first)

    kwargs = {"prompt": "a cat", "num_inference_steps": 2, "output_type": "latent"}
    for pipe, (w, h) in ((first, (64, 64)), (second, (96, 64))):
        pipe.set_progress_bar_config(disable=True)
        full = load_pipeline(art, device="cpu")
        full.set_progress_bar_config(disable=True)
        mine = pipe(**kwargs, width=w, height=h, generator=torch.Generator().manual_seed(0)).images
        expected = full(**kwargs, width=w, height=h, generator=torch.Generator().manual_seed(0)).images
        torch.testing.assert_close(mine, expected, rtol=0, atol=0)
    assert len(recorded["reads"]) == 4

    unet_file = art / "unet" / "weights.safetensors"
    os.utime(unet_file, ns=(unet_file.stat().st_atime_ns, unet_file.stat().st_mtime_ns + 10**9))
    load_pipeline(art, device="cpu", resolutions=["64"])
    assert recorded["reads"][4:] == [unet_file.resolve()]

    del first, second, full, pipe, unet_first, unet_second, first_weights, second_weights
    recorded["weights"].clear()
    recorded["packages"].clear()
    gc.collect()
    load_pipeline(art, device="cpu", resolutions=["64"])
    assert len(recorded["reads"]) == 5 + 4


def test_load_shortens_the_switch_interval(tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a load runs (and the scheduler's import thread beside it), Python switches threads more often (less
    GIL convoy); afterwards, and after a failed load, the process's interval is back."""
    before = sys.getswitchinterval()
    seen = []
    shared_weights = loader_module.shared_weights

    def spy(*args, **kwargs):
        seen.append(sys.getswitchinterval())
        return shared_weights(*args, **kwargs)

    monkeypatch.setattr(loader_module, "shared_weights", spy)
    load_pipeline(tiny_artifact, device="cpu")
    assert seen == [pytest.approx(loader_module.LOAD_SWITCH_INTERVAL)] * 4
    assert sys.getswitchinterval() == pytest.approx(before) != pytest.approx(loader_module.LOAD_SWITCH_INTERVAL)

    def failing(*args, **kwargs):
        raise FastDiffError("cannot read weights: test")

    monkeypatch.setattr(loader_module, "shared_weights", failing)
    with pytest.raises(FastDiffError, match="test"):
        load_pipeline(tiny_artifact, device="cpu")
    assert sys.getswitchinterval() == pytest.approx(before)


def test_load_order(tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The small components' weights load first, then the UNet's stream in on a thread while the text encoders' and
    VAE decoder's packages load and make their first calls (SDXL's UNet is 5.1 of its 6.9 GB). The scheduler's
    import (pure Python, seconds) starts only once every weight file and package is loaded: beside it, the weights'
    many small GIL-releasing copies moved at a fifth of their speed on the H200, and the packages' extraction took
    ten times as long; it runs beside the rest of the warm-up (the text encoders' captures, the UNet's first call),
    whose compiled calls let go of the GIL. The VAE decoder runs once."""
    events = []
    first_calls_started = threading.Event()

    def spy(owner, name, event):
        original = getattr(owner, name)

        def recorded(*args, **kwargs):
            component = Path(args[0]).parent.name if event in ("weights", "package") else ""
            if (event, component) == ("weights", "unet"):  # held until the small components' first calls start
                assert first_calls_started.wait(timeout=30), "the UNet's weights were waited for before them"
            events.append((event, component, threading.current_thread().name.split("_")[0]))
            if event == "decoder":
                first_calls_started.set()
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, recorded)

    spy(loader_module, "shared_weights", "weights")
    spy(loader_module, "load_module", "package")
    spy(loader_module, "load_scheduler", "scheduler")
    for part in ("decoder", "conditioning", "denoiser"):
        spy(loader_module, f"warm_up_{part}", part)
    pipe = load_pipeline(tiny_artifact, device="cpu", warmup=True)
    small = ("text_encoder", "text_encoder_2", "vae_decoder")
    assert sorted(events[:3]) == [("weights", c, "MainThread") for c in small]
    assert ("weights", "unet", "fastdiff-weights") in events
    order = [e[:2] for e in events]
    small_packages = [i for i, e in enumerate(order) if e[0] == "package" and e[1] != "unet"]
    unet_packages = [i for i, e in enumerate(order) if e == ("package", "unet")]
    assert len(small_packages) == 4 and len(unet_packages) == 2  # 2 resolutions
    conditioning = [i for i, e in enumerate(order) if e[0] == "conditioning"]
    assert order.count(("decoder", "")) == 1 and len(conditioning) == 2  # first calls, then captures
    decoder = order.index(("decoder", ""))
    assert max(small_packages) < decoder < order.index(("weights", "unet")) < min(unet_packages)
    assert decoder < conditioning[0] < min(unet_packages) < max(unet_packages) < conditioning[1]
    assert conditioning[1] < order.index(("denoiser", ""))
    assert max(unet_packages) < order.index(("scheduler", ""))
    assert pipe.scheduler is not None and set(pipe.unets) == set(pipe.vae_decoders)


def test_a_failed_load_stops_the_unet_weights(tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error (or Ctrl-C) while the small components load tells the UNet's weights to stop (a cold disk reads
    SDXL's 5.1 GB for seconds) and is reported as it was."""
    stopped = []
    shared_weights, load_module = loader_module.shared_weights, loader_module.load_module

    def weights_spy(path, device, channels_last=(), stop=None, **kwargs):
        if Path(path).parent.name == "unet":
            stopped.append(stop.wait(timeout=30))
        return shared_weights(path, device, channels_last, stop, **kwargs)

    def failing_package(path, *args, **kwargs):
        if Path(path).parent.name == "text_encoder_2":
            raise FastDiffError("text_encoder_2/77.pt2 is damaged", "export again")
        return load_module(path, *args, **kwargs)

    monkeypatch.setattr(loader_module, "shared_weights", weights_spy)
    monkeypatch.setattr(loader_module, "load_module", failing_package)
    with pytest.raises(FastDiffError, match="text_encoder_2/77.pt2 is damaged"):
        load_pipeline(tiny_artifact, device="cpu")
    assert stopped == [True]


@pytest.mark.parametrize(
    ("name", "arch"),
    [
        ("EulerDiscreteScheduler", TINY_ARCH),
        ("PNDMScheduler", TINY_SD_ARCH),
        ("DPMSolverMultistepScheduler", TINY_PIXART_ARCH),
        # SDXL's file has PNDM's and DDIM's keys too; diffusers keeps them in the config, and keys it does not know
        ("EulerDiscreteScheduler", {"scheduler": {"use_karras_sigmas": True, "skip_prk_steps": True, "unknown": 1}}),
    ],
    ids=["euler", "pndm", "dpm-solver", "euler-karras-extra-keys"],
)
def test_scheduler_as_diffusers_loads_it(name: str, arch: dict, tmp_path: Path) -> None:
    """Built from its own config keys, the scheduler is the one diffusers' from_pretrained gives: the same config
    and the same timesteps and sigmas."""
    import diffusers

    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": name, **arch["scheduler"]}))
    mine, reference = scheduler_module.load_scheduler(tmp_path), getattr(diffusers, name).from_pretrained(tmp_path)
    assert type(mine) is type(reference)
    configs = [{k: v for k, v in s.config.items() if not k.startswith("_")} for s in (mine, reference)]
    assert configs[0] == configs[1]
    for scheduler in (mine, reference):
        scheduler.set_timesteps(30)
    torch.testing.assert_close(mine.timesteps, reference.timesteps, rtol=0, atol=0)
    if hasattr(reference, "sigmas"):
        torch.testing.assert_close(mine.sigmas, reference.sigmas, rtol=0, atol=0)


def test_scheduler_import_defers_scipy_stats(tiny_artifact: Path) -> None:
    """The Euler scheduler's module imports scipy.stats (a second or more) for beta sigmas only: a load whose config
    has none leaves it unimported, and it still works afterwards, for diffusers' beta sigmas too; a config with beta
    sigmas imports it as usual."""
    probe = textwrap.dedent(
        """
        import sys, types, torch
        from fastdiff.runtime import load_pipeline, loader
        pipe = load_pipeline(sys.argv[1], device="cpu")
        assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
        assert "scipy.stats" not in sys.modules, "scipy.stats was imported"
        from diffusers import EulerDiscreteScheduler
        beta = EulerDiscreteScheduler(use_beta_sigmas=True)
        beta.set_timesteps(4)
        assert type(sys.modules["scipy.stats"]) is types.ModuleType
        import scipy.stats
        assert scipy.stats.beta.ppf(0.5, 2.0, 2.0) == 0.5
        print("OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", probe, str(tiny_artifact)], capture_output=True, text=True)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]

    probe = "import sys, types; from fastdiff.runtime import scheduler; "
    probe += "scheduler.import_scheduler_class('EulerDiscreteScheduler', needs_scipy=True); "
    probe += "assert type(sys.modules['scipy.stats']) is types.ModuleType; print('OK')"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_scheduler_import_defers_the_distribution_scan(tiny_artifact: Path) -> None:
    """diffusers maps every installed package to its distributions when first imported (reading every
    distribution's metadata), for lookups it makes only with a few optional packages installed: a load leaves the
    map unmade until diffusers reads it, then it is the map importlib.metadata makes, and the function is restored."""
    probe = textwrap.dedent(
        """
        import importlib.metadata, sys
        scans = []
        scan = importlib.metadata.packages_distributions
        def counted():
            scans.append(1)
            return scan()
        importlib.metadata.packages_distributions = counted
        from fastdiff.runtime import load_pipeline
        load_pipeline(sys.argv[1], device="cpu")
        from diffusers.utils import import_utils
        assert "diffusers" in sys.modules and not scans, f"{len(scans)} scans"
        assert importlib.metadata.packages_distributions is counted
        assert dict(import_utils._package_map) == scan() and len(scans) == 1
        assert import_utils._is_package_available("torch", get_dist_name=True)[0]
        print("OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", probe, str(tiny_artifact)], capture_output=True, text=True)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_load_does_not_import_dynamo(tiny_artifact: Path) -> None:
    """diffusers imports torch._dynamo when first imported (seconds); the runtime's scheduler import avoids it through
    diffusers' own fallback, and leaves torch._dynamo importable afterwards, and diffusers' models imported later
    marked allow_in_graph as they would have been."""
    probe = textwrap.dedent(
        """
        import sys, torch
        from fastdiff.runtime import load_pipeline
        pipe = load_pipeline(sys.argv[1], device="cpu")
        pipe.set_progress_bar_config(disable=True)
        pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        assert "torch._dynamo" not in sys.modules, "torch._dynamo was imported"
        import torch._dynamo
        allowed = []
        allow_in_graph = torch._dynamo.allow_in_graph
        torch._dynamo.allow_in_graph = lambda cls: allowed.append(cls) or allow_in_graph(cls)
        assert "diffusers.models.attention" not in sys.modules
        from diffusers.models.attention import GatedSelfAttentionDense
        assert GatedSelfAttentionDense in allowed, allowed
        print("OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", probe, str(tiny_artifact)], capture_output=True, text=True)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_other_threads_import_dynamo_during_a_load(tiny_artifact: Path) -> None:
    """The scheduler import keeps torch._dynamo out of its own thread only: another thread of the process that imports
    it meanwhile (a profiler started during the load, say: it imports Inductor) gets it. The other thread imports it
    before the scheduler's module runs, within the scheduler import (finders run under the global import lock: the
    hook waits in the module's loader instead)."""
    probe = textwrap.dedent(
        """
        import importlib.abc, importlib.machinery, sys, threading
        from fastdiff.runtime import load_pipeline
        imported = []
        def import_dynamo():
            try:
                import torch._dynamo
                imported.append(torch._dynamo.allow_in_graph)
            except Exception as e:
                imported.append(e)
        class DuringTheSchedulerImport(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name != "diffusers.schedulers.scheduling_euler_discrete":
                    return None
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                exec_module = spec.loader.exec_module
                def exec_module_after_another_thread_imports_dynamo(module):
                    other = threading.Thread(target=import_dynamo)
                    other.start()
                    other.join()
                    exec_module(module)
                spec.loader.exec_module = exec_module_after_another_thread_imports_dynamo
                return spec
        sys.meta_path.insert(0, DuringTheSchedulerImport())
        pipe = load_pipeline(sys.argv[1], device="cpu")
        assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
        assert len(imported) == 1 and callable(imported[0]), imported
        print("OK")
        """
    )
    args = [sys.executable, "-c", probe, str(tiny_artifact)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)  # a deadlock fails, not hangs
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_extracted_packages_are_removed_at_exit(tiny_artifact: Path, tmp_path: Path) -> None:
    assert_no_packages_left_at_exit(tiny_artifact, "cpu", tmp_path)


def test_prefetch_reads_what_a_load_reads_in_its_order_without_torch(tiny_artifact: Path) -> None:
    """fastdiff.runtime.prefetch, which a server calls before it imports torch, imports no torch and
    reads the weights, the packages of the resolutions to load and the rest in the order the load reads them (the
    UNet's weights and packages after the other components': see test_load_order)."""
    code = textwrap.dedent(
        """
        import json, sys
        from fastdiff.runtime import prefetch
        from fastdiff.runtime.readahead import files_to_prefetch

        order = [p.relative_to(sys.argv[1]).as_posix() for p in files_to_prefetch(sys.argv[1], "64")]
        prefetch(sys.argv[1], ["64"]).join()
        print(json.dumps({"order": order, "torch": "torch" in sys.modules, "none": prefetch(sys.argv[1] + "-x")}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_artifact)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert not result["torch"] and result["none"] is None  # no manifest: nothing to read, the load says why
    weights = ["vae_decoder", "text_encoder", "text_encoder_2", "unet"]
    packages = ["vae_decoder/64x64.pt2", "text_encoder/77.pt2", "text_encoder_2/77.pt2"]
    assert result["order"][:7] == [f"{w}/weights.safetensors" for w in weights] + packages
    assert result["order"][-1] == "unet/64x64.pt2"  # after the tokenizers and the scheduler's config
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    assert sorted(result["order"]) == sorted(rel for rel in manifest["files"] if not rel.endswith("96x64.pt2"))


def test_prefetch_reads_nothing_outside_the_artifact(tiny_artifact: Path, tmp_path: Path) -> None:
    """A damaged manifest (paths out of the folder, values of the wrong type) reads nothing and raises nothing: the
    load reports the damage. A file that links out of the folder is not read."""
    from fastdiff.runtime.readahead import files_to_prefetch

    art = Path(shutil.copytree(tiny_artifact, tmp_path / "art"))
    manifest = json.loads((art / "manifest.json").read_text())
    (tmp_path / "outside").write_bytes(b"x")
    entry = {"size": 1, "sha256": "0" * 64}
    for outside in ("/dev/zero", "../outside", str(tmp_path / "outside")):
        (art / "manifest.json").write_text(json.dumps({**manifest, "files": {**manifest["files"], outside: entry}}))
        assert files_to_prefetch(art) == []
        with pytest.raises(FastDiffError, match="leaves the artifact folder"):
            load_pipeline(art, device="cpu")
    (art / "manifest.json").write_text(json.dumps({**manifest, "unet": {**manifest["unet"], "weights": ["x"]}}))
    assert files_to_prefetch(art) == []
    (art / "manifest.json").write_text(json.dumps(manifest))
    weights = art / "unet" / "weights.safetensors"
    weights.rename(tmp_path / "unet.safetensors")
    weights.symlink_to(tmp_path / "unet.safetensors")
    listed = files_to_prefetch(art)
    assert listed and weights not in listed and all(p.resolve().is_relative_to(art.resolve()) for p in listed)


def test_the_exporter_imports_only_the_format_module_of_the_runtime() -> None:
    """The exporter and the runtime meet at the artifact format: no exporter module imports another runtime module."""
    import ast

    exporter = Path(__file__).parents[1] / "exporter"
    for path in sorted(exporter.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                if name.startswith("fastdiff.runtime"):
                    assert name == "fastdiff.runtime.format", f"{path.name} imports {name}"


def test_the_format_module_imports_no_torch() -> None:
    """readahead and the command-line tools read manifests before torch is imported."""
    code = "import sys; import fastdiff.runtime.format; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
