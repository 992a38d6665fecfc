"""manifest -> checks -> weights -> compiled packages -> a ready pipeline. Nothing is compiled here."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import sys
import types
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .compat import check_compatible, resolve_device
from .errors import FastDiffError
from .manifest import TEXT_PARTS, CompiledComponent, Manifest, check_files, read_manifest, torch_dtype
from .packages import CompiledModule, CUDAGraphModule
from .pipeline import FastDiffPipeline
from .resolution import Resolution, parse_resolution
from .text import TextConditioner, compiled_text_encoder, load_stock_text_encoder, load_tokenizer
from .weights import Weights, shared_weights

LOAD_SWITCH_INTERVAL = 0.0005  # seconds; Python's default is 0.005


def load_pipeline(
    artifact_dir: str | Path,
    device: str | torch.device | None = None,
    resolutions: Iterable[str | int | Resolution] | None = None,
    verify: bool = False,
    cuda_graphs: bool = True,
    warmup: bool | None = None,
) -> FastDiffPipeline:
    """Load an artifact written by fastdiff-export.

    device: where to run (default: the device kind the artifact was compiled for).
    resolutions: which exported resolutions to load (default: all of them); their packages share one copy of
        the weights.
    verify: re-hash every file against the manifest first (slow for large models; sizes are always checked).
    cuda_graphs: on a GPU, replay each UNet step as a CUDA graph (captured on the first call at each batch size).
    warmup: run each compiled module once at a default request's shapes before returning (FastDiffPipeline.warm_up),
        beside the scheduler import; default: on a GPU, where the first call would otherwise pay for kernel
        loading, algorithm selection and the CUDA-graph capture.
    """
    root = Path(artifact_dir)
    manifest = read_manifest(root)
    device = resolve_device(device, manifest)
    check_compatible(manifest, device)
    problems = check_files(root, manifest, full_hash=verify)
    if problems:
        raise FastDiffError(
            f"artifact {root} is damaged: {'; '.join(problems[:3])}" + (" ..." if len(problems) > 3 else ""),
            "export the model again",
        )
    keys = _resolution_keys(manifest.unet, resolutions)
    # Importing diffusers (for its scheduler classes) takes ~1 s even without dynamo and scipy.stats (see
    # _import_schedulers): it runs in a thread while the packages load and warm up. The two overlap little: an
    # AOTInductor package's run() holds the GIL for the whole call (pytorch/pytorch#197516; a spinning Python
    # thread kept 2 % of its rate through it on the CPU machine, bench/probe_gil.py), and the import thread holds
    # the GIL for whole switch intervals each time the main thread lets go of it: ~0.6 s lost on the H200
    # (bench/results/2026-11-30-h200-e). A short interval keeps the main thread's many short waits short; measured
    # for streamed weights beside a busy Python thread: 1 GB in 1.77 s at the default 5 ms interval, 0.62 s at
    # 0.5 ms (0.43 s alone; CPU machine).
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(LOAD_SWITCH_INTERVAL)
    try:
        return _load(root, manifest, device, keys, cuda_graphs, warmup)
    finally:
        sys.setswitchinterval(switch_interval)


def _load(
    root: Path, manifest: Manifest, device: torch.device, keys: list[str], cuda_graphs: bool, warmup: bool | None
) -> FastDiffPipeline:
    stock = {name: root / rel for name, rel in manifest.stock.items()}
    # The weights first, before the scheduler's import starts: beside it, every tensor's copy waited for the GIL and
    # SDXL's 6.9 GB moved at 1.9 GB/s instead of 10 GB/s on the H200 (bench/results/2026-11-30-h200-d).
    weights = {
        c.weights: shared_weights(root / c.weights, device, c.channels_last)
        for c in (manifest.unet, manifest.vae_decoder, *manifest.text_encoders)
    }
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastdiff-scheduler") as pool:
        scheduler = pool.submit(load_scheduler, stock["scheduler"])
        if not manifest.text_encoders:
            scheduler.result()  # stock encoders import transformers below: keep the two big imports apart
        unets = _load_packages(root, manifest.unet, keys, device, weights)
        if cuda_graphs and device.type == "cuda":
            unets = {key: CUDAGraphModule(module) for key, module in unets.items()}
        vae_decoders = _load_packages(root, manifest.vae_decoder, keys, device, weights)
        conditioner = _load_conditioner(root, manifest, stock, device, weights)
        pipeline = FastDiffPipeline(
            manifest=manifest,
            device=device,
            conditioner=conditioner,
            scheduler=None,  # set below, once the thread has imported it
            unets=unets,
            vae_decoders=vae_decoders,
        )
        if warmup is None:
            warmup = device.type == "cuda"
        if warmup:
            pipeline.warm_up()
        pipeline.scheduler = scheduler.result()
        return pipeline


def _load_conditioner(
    root: Path, manifest: Manifest, stock: dict[str, Path], device: torch.device, weights: dict[str, Weights]
) -> TextConditioner:
    parts = TEXT_PARTS[manifest.model.family]
    if manifest.text_encoders:
        encoders = [
            compiled_text_encoder(
                next(iter(_load_packages(root, c, list(c.packages), device, weights).values())), c.inputs
            )
            for c in manifest.text_encoders
        ]
    else:
        dtype = torch_dtype(manifest.dtype)
        encoders = [load_stock_text_encoder(stock[encoder], dtype, device) for _, encoder in parts]
    return TextConditioner(
        tokenizers=[load_tokenizer(stock[tokenizer], manifest.model.text_max_length) for tokenizer, _ in parts],
        encoders=encoders,
        force_zeros_for_empty_prompt=manifest.model.force_zeros_for_empty_prompt,
        device=device,
        max_batch=min([c.max_batch for c in manifest.text_encoders], default=manifest.batch_size),
        pooled="text_embeds" in manifest.unet.inputs,
        masked="encoder_attention_mask" in manifest.unet.inputs,
        lowercase=manifest.model.lowercase_prompts,
    )


def _import_schedulers(name: str, needs_scipy: bool = False) -> type:
    """diffusers' scheduler class `name`, imported without torch._dynamo where possible, and without scipy.stats
    unless `needs_scipy` (the config uses beta sigmas).

    diffusers.utils imports torch._dynamo when it is first imported (all of dynamo: seconds, the largest part of a
    cold start once the weights are in the page cache) for a torch.compile decorator that its schedulers never use,
    and falls back to a no-op decorator when that import fails. The runtime compiles nothing, so on a first import
    it lets that import fail: dynamo is blocked for the duration of the import only, and imports normally afterwards.

    The Euler-family scheduler modules import scipy.stats (1.2 s of the scheduler's 2.6 s import on the H200) for
    beta sigmas alone. While they import, a stand-in takes its place; once it is removed, `scipy.stats` (through
    scipy's lazy submodules) and `import scipy.stats` give the real module, imported on first use.
    """
    block = "diffusers" not in sys.modules and "torch._dynamo" not in sys.modules
    if block:
        sys.modules["torch._dynamo"] = None  # an import of it raises ImportError while this is set
    stand_in = None
    if not needs_scipy and "scipy.stats" not in sys.modules and importlib.util.find_spec("scipy") is not None:
        stand_in = sys.modules["scipy.stats"] = _StandIn("scipy.stats")
    try:
        import diffusers.schedulers

        scheduler_class = getattr(diffusers.schedulers, name, None)  # imports the class's own module (lazily)
    except ImportError as e:
        raise FastDiffError(f"the runtime needs diffusers for its schedulers: {e}", "pip install diffusers") from None
    finally:
        if block and sys.modules.get("torch._dynamo", 0) is None:
            del sys.modules["torch._dynamo"]
        if stand_in is not None and sys.modules.get("scipy.stats") is stand_in:
            del sys.modules["scipy.stats"]
    if scheduler_class is None:
        raise FastDiffError(
            f"the artifact's scheduler {name} is not in the installed diffusers {diffusers.__version__}",
            "install the diffusers version the artifact was exported with (fastdiff-inspect shows it)",
        )
    return scheduler_class


class _StandIn(types.ModuleType):
    """Holds a module's place in sys.modules; the real module is imported when one of its attributes is used."""

    def __getattr__(self, attr: str):
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attr)


def load_scheduler(path: Path):
    """The checkpoint's own scheduler class and config."""
    try:
        config = json.loads((path / "scheduler_config.json").read_text())
        name = config["_class_name"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FastDiffError(f"cannot read the scheduler config in {path}: {e}", "export the model again") from None
    scheduler_class = _import_schedulers(name, needs_scipy=bool(config.get("use_beta_sigmas")))
    # Built as from_pretrained builds it, from the class's own keys, with the other keys kept in its config (for a
    # swap to another scheduler class), but without importing every compatible scheduler class to sort the keys (13
    # modules and scipy.integrate: 0.4-0.5 s on the CPU machine).
    params = inspect.signature(scheduler_class.__init__).parameters
    own = {k: v for k, v in config.items() if k in params and k != "self"}
    try:
        scheduler = scheduler_class(**own)
        scheduler.register_to_config(**{k: v for k, v in config.items() if k not in own and not k.startswith("_")})
        return scheduler
    except Exception as e:  # diffusers raises several types for a config it cannot use
        raise FastDiffError(f"cannot load scheduler {name} from {path}: {e}", "export the model again") from None


def _resolution_keys(component: CompiledComponent, wanted: Iterable | None) -> list[str]:
    if wanted is None:
        return list(component.packages)
    keys = [parse_resolution(r).key for r in wanted]
    missing = [k for k in keys if k not in component.packages]
    if missing:
        raise FastDiffError(
            f"resolution {', '.join(missing)} was not exported; this artifact has {', '.join(component.packages)}",
            "pick from those, or export the missing resolution",
        )
    return keys


def _load_packages(
    root: Path, component: CompiledComponent, keys: list[str], device: torch.device, weights: dict[str, Weights]
) -> dict[str, CompiledModule]:
    """The component's packages for `keys`, bound to its loaded weights (`weights`: by weight file)."""
    return {key: CompiledModule(root / component.packages[key], weights[component.weights], device) for key in keys}
