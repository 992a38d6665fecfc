"""manifest -> checks -> weights -> compiled packages -> a ready pipeline. Nothing is compiled here."""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from .compat import check_compatible, on_device
from .errors import FastDiffError
from .folder import ArtifactFolder
from .format import (
    PENULTIMATE_CLIP_FAMILIES,
    TEXT_PARTS,
    CompiledComponent,
    Manifest,
    Resolution,
    parse_resolution,
    resolve_device,
    torch_dtype,
)
from .packages import CompiledModule, CUDAGraphModule, PackageInputs, load_module
from .pipeline import (
    FastDiffPipeline,
    default_resolution,
    warm_up_conditioning,
    warm_up_decoder,
    warm_up_denoiser,
)
from .scheduler import load_scheduler
from .text import (
    CompiledTextEncoder,
    TextConditioner,
    check_vocabulary,
    embedding_rows,
    load_stock_text_encoder,
    load_tokenizer,
)
from .weights import Weights, shared_weights

LOAD_SWITCH_INTERVAL = 0.0005  # seconds; Python's default is 0.005


def load_pipeline(
    artifact_dir: str | Path,
    device: str | torch.device | None = None,
    resolutions: Iterable[str | int | Resolution] | None = None,
    verify: bool = False,
    cuda_graphs: bool = True,
    warmup: bool | None = None,
    expected_digest: str | None = None,
) -> FastDiffPipeline:
    """Load an artifact written by fastdiff-export.

    Loading runs the artifact's compiled code: load only artifacts your own build produced, and pin their digest
    (`expected_digest`). Whatever is pinned, the compiled packages are hashed against the manifest before any is
    opened, every file must lie inside the folder, and the weights must be what the packages declare (dtype, size).

    device: where to run (default: the device kind the artifact was compiled for).
    resolutions: which exported resolutions to load (default: all of them); their packages share one copy of
        the weights.
    verify: re-hash every file against the manifest first (slow for large models; sizes are always checked).
    cuda_graphs: on a GPU, replay each UNet step and compiled text encoder call as a CUDA graph (captured on the
        first call at each batch size).
    warmup: run each compiled module at a default request's shapes before returning (FastDiffPipeline.warm_up, in
        parts: beside the UNet's weights' loading, then beside the scheduler import); default: on a GPU, where the
        first call would otherwise pay for kernel loading, algorithm selection and the CUDA-graph capture.
    expected_digest: refuse any artifact but the one with this digest ("sha256:...", as fastdiff-inspect prints it).
    """
    with ArtifactFolder(artifact_dir, expected_digest) as folder:
        manifest = folder.manifest
        device = resolve_device(device, manifest)
        check_compatible(manifest, device)
        problems = folder.check_files(full_hash=verify)
        if problems:
            raise FastDiffError(
                f"artifact {folder.root} is damaged: {'; '.join(problems[:3])}" + (" ..." if len(problems) > 3 else ""),
                "export the model again",
            )
        keys = _resolution_keys(manifest.unet, resolutions)
        # The scheduler's import runs in a thread beside the warm-up and holds the GIL for whole switch intervals each
        # time the main thread lets go of it: a short interval keeps the main thread's many short waits short.
        with _short_switch_interval(), on_device(device):
            pipeline = _load(folder, device, keys, cuda_graphs, warmup)
        folder.check_unchanged()
        return pipeline


_loads = 0  # load_pipeline calls in progress (threads may load several artifacts at once)
_loads_lock = threading.Lock()
_switch_interval = sys.getswitchinterval()


@contextmanager
def _short_switch_interval() -> Iterator[None]:
    """LOAD_SWITCH_INTERVAL while any load runs; the process's own interval back once the last one is done."""
    global _loads, _switch_interval
    with _loads_lock:
        if _loads == 0:
            _switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(LOAD_SWITCH_INTERVAL)
        _loads += 1
    try:
        yield
    finally:
        with _loads_lock:
            _loads -= 1
            if _loads == 0:
                sys.setswitchinterval(_switch_interval)


def _load(
    folder: ArtifactFolder, device: torch.device, keys: list[str], cuda_graphs: bool, warmup: bool | None
) -> FastDiffPipeline:
    manifest = folder.manifest
    stock = {name: folder.path(rel) for name, rel in manifest.stock.items()}
    graphed = cuda_graphs and device.type == "cuda"
    if warmup is None:
        warmup = device.type == "cuda"
    warm_res = default_resolution(manifest, [parse_resolution(k) for k in keys])
    # The packages are hashed before they are opened, on a thread beside the weights, in the order they are opened.
    encoders = [rel for c in manifest.text_encoders for rel in c.packages.values()]
    folder.verify_ahead(
        [manifest.vae_decoder.packages[k] for k in keys] + encoders + [manifest.unet.packages[k] for k in keys]
    )
    # The small components' weights first: their packages, loaded next, bind them.
    weights = {
        c.weights: shared_weights(folder.path(c.weights), device, c.channels_last, digest=folder.digest)
        for c in (manifest.vae_decoder, *manifest.text_encoders)
    }
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    stop = threading.Event()

    def load_unet_weights() -> Weights:
        # on the caller's device and stream (both are per thread), so that what it runs next comes after the copies
        with on_device(device), torch.cuda.stream(stream):
            path = folder.path(manifest.unet.weights)
            return shared_weights(path, device, manifest.unet.channels_last, stop, digest=folder.digest)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastdiff-weights") as pool:
        try:
            # The denoiser's weights, most of the bytes (SDXL's UNet: 5.1 of 6.9 GB), stream in while the text
            # encoders' and VAE decoder's packages load and make their first calls, ungraphed: a CUDA graph's capture
            # fails if another thread makes CUDA calls meanwhile.
            unet_weights = pool.submit(load_unet_weights)
            vae_decoders = _load_packages(folder, manifest.vae_decoder, keys, device, weights)
            conditioner = _load_conditioner(folder, stock, device, weights)
            if warmup:
                warm_up_decoder(vae_decoders[warm_res.key], manifest, warm_res, device)
                warm_up_conditioning(conditioner, manifest, warm_res, device)
            weights[manifest.unet.weights] = unet_weights.result()
        except BaseException:
            stop.set()  # an error or Ctrl-C does not wait for the rest of the UNet's weights
            raise
    unets = _load_packages(folder, manifest.unet, keys, device, weights)
    if graphed:
        unets = {key: CUDAGraphModule(module) for key, module in unets.items()}
        # a CLIP encoder's call is many small kernels for little GPU work: one launch as a graph
        graphed_encoders = [
            CompiledTextEncoder(CUDAGraphModule(e.module), e.masked) if isinstance(e, CompiledTextEncoder) else e
            for e in conditioner.encoders
        ]
        conditioner = dataclasses.replace(conditioner, encoders=graphed_encoders)
    # The scheduler's import (diffusers') runs beside the UNet's warm-up, whose compiled calls let go of the GIL, and
    # after the weights and packages, whose many short GIL hand-overs it would slow.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastdiff-scheduler") as pool:
        scheduler = pool.submit(load_scheduler, stock["scheduler"])
        if warmup:
            chunks = warm_up_conditioning(conditioner, manifest, warm_res, device)  # the encoders' graphs captured
            warm_up_denoiser(unets[warm_res.key], manifest, warm_res, device, chunks)
        return FastDiffPipeline(
            manifest=manifest,
            device=device,
            conditioner=conditioner,
            scheduler=scheduler.result(),
            unets=unets,
            vae_decoders=vae_decoders,
            digest=folder.digest,
            turn=weights[manifest.unet.weights].turn,
        )


def _load_conditioner(
    folder: ArtifactFolder,
    stock: dict[str, Path],
    device: torch.device,
    weights: dict[str, Weights],
) -> TextConditioner:
    manifest = folder.manifest
    parts = TEXT_PARTS[manifest.model.family]
    if manifest.text_encoders:
        encoders, rows = [], []
        for c in manifest.text_encoders:
            module = next(iter(_load_packages(folder, c, list(c.packages), device, weights).values()))
            encoders.append(CompiledTextEncoder(module, masked="attention_mask" in c.inputs))
            rows.append(embedding_rows(weights[c.weights], folder.root / c.weights, _recorded_vocabulary(manifest, c)))
    else:
        dtype = torch_dtype(manifest.dtype)
        penultimate = manifest.model.family in PENULTIMATE_CLIP_FAMILIES
        stock_encoders = [load_stock_text_encoder(stock[encoder], dtype, device, penultimate) for _, encoder in parts]
        encoders, rows = [e for e, _ in stock_encoders], [r for _, r in stock_encoders]
    tokenizers = [load_tokenizer(stock[tokenizer], manifest.model.text_max_length) for tokenizer, _ in parts]
    for tokenizer, embedded, (name, _) in zip(tokenizers, rows, parts, strict=True):
        check_vocabulary(tokenizer, embedded, folder.root / manifest.stock[name])
    return TextConditioner(
        tokenizers=tokenizers,
        encoders=encoders,
        force_zeros_for_empty_prompt=manifest.model.force_zeros_for_empty_prompt,
        device=device,
        max_batch=min([c.max_batch for c in manifest.text_encoders], default=manifest.batch_size),
        pooled="text_embeds" in manifest.unet.inputs,
        masked="encoder_attention_mask" in manifest.unet.inputs,
        vocab_rows=rows,
        lowercase=manifest.model.lowercase_prompts,
    )


def _recorded_vocabulary(manifest: Manifest, component: CompiledComponent) -> int | None:
    """The vocabulary the text encoder's package was compiled for, as the manifest (which a digest pins) records it;
    None for artifacts exported before it recorded the compiled components' configs."""
    name = component.weights.split("/")[0]
    size = (manifest.options.get("architecture") or {}).get(name, {}).get("vocab_size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _resolution_keys(component: CompiledComponent, wanted: Iterable | None) -> list[str]:
    if wanted is None:
        return list(component.packages)
    if isinstance(wanted, (str, int, Resolution)):  # one resolution, not an iterable of them
        wanted = [wanted]
    keys = list(dict.fromkeys(parse_resolution(r).key for r in wanted))
    if not keys:
        raise FastDiffError(
            "no resolution asked for", f"pass some of {', '.join(component.packages)}, or None for all of them"
        )
    missing = [k for k in keys if k not in component.packages]
    if missing:
        raise FastDiffError(
            f"resolution {', '.join(missing)} was not exported; this artifact has {', '.join(component.packages)}",
            "pick from those, or export the missing resolution",
        )
    return keys


def _load_packages(
    folder: ArtifactFolder,
    component: CompiledComponent,
    keys: list[str],
    device: torch.device,
    weights: dict[str, Weights],
) -> dict[str, CompiledModule]:
    """The component's packages for `keys` (each hashed against the manifest first), bound to its loaded weights
    (`weights`: by weight file)."""
    modules = {}
    for key in keys:
        rel = component.packages[key]
        data = folder.read_verified(rel)
        expects = PackageInputs.recorded(component, key)
        modules[key] = load_module(folder.root / rel, weights[component.weights], device, data, expects)
    for key, module in modules.items():
        if module.num_inputs != len(component.inputs):
            raise FastDiffError(
                f"{component.packages[key]} takes {module.num_inputs} inputs; the manifest lists "
                f"{len(component.inputs)} ({', '.join(component.inputs)})",
                "the artifact's files do not belong together: export the model again",
            )
    return modules
