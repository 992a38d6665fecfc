"""manifest -> checks -> weights -> compiled packages -> a ready pipeline. Nothing is compiled here."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import diffusers.schedulers
import torch

from .compat import check_compatible, resolve_device
from .errors import FastDiffError
from .manifest import CompiledComponent, check_files, read_manifest, torch_dtype
from .packages import CompiledModule, CUDAGraphModule
from .pipeline import FastDiffPipeline
from .resolution import Resolution, parse_resolution
from .text import SDXLTextConditioner, load_text_encoder, load_tokenizer
from .weights import load_weights


def load_pipeline(
    artifact_dir: str | Path,
    device: str | torch.device | None = None,
    resolutions: Iterable[str | int | Resolution] | None = None,
    verify: bool = False,
    cuda_graphs: bool = True,
) -> FastDiffPipeline:
    """Load an artifact written by fastdiff-export.

    device: where to run (default: the device kind the artifact was compiled for).
    resolutions: which exported resolutions to load (default: all of them); their packages share one copy of
        the weights.
    verify: re-hash every file against the manifest first (slow for large models; sizes are always checked).
    cuda_graphs: on a GPU, replay each UNet step as a CUDA graph (captured on the first call at each batch size).
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
    unets = _load_packages(root, manifest.unet, keys, device)
    if cuda_graphs and device.type == "cuda":
        unets = {key: CUDAGraphModule(module) for key, module in unets.items()}
    dtype = torch_dtype(manifest.dtype)
    stock = {name: root / rel for name, rel in manifest.stock.items()}

    conditioner = SDXLTextConditioner(
        tokenizers=[load_tokenizer(stock["tokenizer"]), load_tokenizer(stock["tokenizer_2"])],
        encoders=[
            load_text_encoder(stock["text_encoder"], dtype, device),
            load_text_encoder(stock["text_encoder_2"], dtype, device),
        ],
        force_zeros_for_empty_prompt=manifest.model.force_zeros_for_empty_prompt,
    )
    return FastDiffPipeline(
        manifest=manifest,
        device=device,
        conditioner=conditioner,
        scheduler=load_scheduler(stock["scheduler"]),
        unets=unets,
        vae_decoders=_load_packages(root, manifest.vae_decoder, keys, device),
    )


def load_scheduler(path: Path):
    """The checkpoint's own scheduler class and config (diffusers' scheduler classes are light)."""
    try:
        name = json.loads((path / "scheduler_config.json").read_text())["_class_name"]
        return getattr(diffusers.schedulers, name).from_pretrained(path)
    except Exception as e:
        raise FastDiffError(
            f"cannot load scheduler from {path}: {e}", "the artifact is damaged: export again"
        ) from None


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
    root: Path, component: CompiledComponent, keys: list[str], device: torch.device
) -> dict[str, CompiledModule]:
    weights = load_weights(root / component.weights, device, component.channels_last)
    return {key: CompiledModule(root / component.packages[key], weights, device) for key in keys}
