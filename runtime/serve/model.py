"""What the server serves: a pipeline called with diffusers' arguments (a FastDiffPipeline, or for the benchmark's
baseline a diffusers pipeline) and the facts that batching needs about it."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import FastDiffError
from ..format import Resolution


@dataclass(frozen=True)
class Adapter:
    """A loaded LoRA as a request asks for it: its name, at a weight."""

    name: str
    scale: float = 1.0


@dataclass
class ServedModel:
    pipe: Any  # called like diffusers' pipelines: prompt lists, latents, callback_on_step_end, output_type="pil"
    name: str
    resolutions: list[Resolution]
    default_resolution: Resolution
    batch_size: int  # images one pipeline call runs together
    default_guidance_scale: float
    latent_shape: Callable[[Resolution], tuple[int, ...]]  # one image's initial noise
    device: torch.device
    dtype: torch.dtype
    rows_independent: bool  # the scheduler draws no noise of its own: each image depends only on its own inputs
    loras: tuple[str, ...] = ()  # the adapters loaded, by name: what a request's `lora` may ask for
    merged: Adapter | None = None  # the adapter merged into the weights now (None: the base)

    def use_adapter(self, adapter: Adapter | None) -> None:
        """On the worker thread, between calls: merge `adapter` (None: the base) in place of the one merged now. Exact
        either way: every merge starts from the pristine base (runtime/lora.py)."""
        self.merged = None  # a merge that fails leaves the base (lora.py restores it)
        if adapter is None:
            self.pipe.set_adapters([])
        else:
            self.pipe.set_adapters([adapter.name], [adapter.scale])
        self.merged = adapter

    def initial_noise(self, seed: int, n: int, res: Resolution) -> torch.Tensor:
        """A request's initial latents, drawn as the pipeline draws them alone for `generator=Generator().manual_seed(
        seed)` and n images (the same randn_tensor call), so a request's images do not depend on its batch."""
        from diffusers.utils.torch_utils import randn_tensor

        generator = torch.Generator().manual_seed(seed)
        return randn_tensor((n, *self.latent_shape(res)), generator=generator, device=self.device, dtype=self.dtype)


def scheduler_draws_noise(scheduler: Any) -> bool:
    """Whether the scheduler's step adds noise from the call's generator (ancestral and SDE samplers): then an image
    depends on which generator draws for which row, and a request cannot share a call with others and stay what it is
    alone. Found by running one step on copies of the scheduler with two seeds."""
    if "generator" not in inspect.signature(scheduler.step).parameters:
        return False
    outputs = []
    for seed in (0, 1):
        probe = copy.deepcopy(scheduler)
        probe.set_timesteps(4, device="cpu")
        sample = torch.zeros(1, 4, 8, 8)
        t = probe.timesteps[0]
        probe.scale_model_input(sample, t)  # some schedulers track their state from it
        generator = torch.Generator().manual_seed(seed)
        outputs.append(probe.step(torch.zeros_like(sample), t, sample, generator=generator, return_dict=False)[0])
    return not torch.equal(outputs[0], outputs[1])


def fastdiff_model(pipe: Any, name: str, loras: tuple[str, ...] = ()) -> ServedModel:
    """A loaded FastDiffPipeline (with the adapters `loras` loaded, the base merged), served."""
    from ..pipeline import default_resolution

    manifest = pipe.manifest
    return ServedModel(
        pipe=pipe,
        name=name,
        resolutions=pipe.resolutions,
        default_resolution=default_resolution(manifest, pipe.resolutions),
        batch_size=manifest.batch_size,
        default_guidance_scale=manifest.model.default_guidance_scale,
        latent_shape=manifest.model.latent_shape,
        device=pipe.device,
        dtype=pipe.dtype,
        rows_independent=not scheduler_draws_noise(pipe.scheduler),
        loras=loras,
    )


def load_fastdiff(
    artifact: str | Path,
    device: str | None = None,
    expected_digest: str | None = None,
    name: str | None = None,
    loras: Mapping[str, str | Path] | None = None,
) -> ServedModel:
    """Load an artifact and warm it up (also on a CPU: readiness means the first request is as fast as the next), then
    each of `loras` (adapter name -> LoRA file or folder) as that adapter; the base is merged at the end."""
    from ..loader import load_pipeline

    name = name or Path(artifact).name
    loras = dict(loras or {})
    if name in loras:  # GET /v1/models lists the base and the adapters by these ids, and `model` may name either
        raise FastDiffError(f"the LoRA name {name!r} is the model's own", "give the LoRA or the model another name")
    pipe = load_pipeline(artifact, device=device, warmup=True, expected_digest=expected_digest)
    pipe.set_progress_bar_config(disable=True)
    for adapter, source in loras.items():
        try:
            pipe.load_lora_weights(source, adapter_name=adapter)
        except FastDiffError as e:
            raise FastDiffError(f"LoRA {adapter}={source}: {e.problem}", e.fix) from None
    if loras:  # each load merged its adapter: the base until a request asks for one
        pipe.set_adapters([])
    return fastdiff_model(pipe, name, tuple(loras))
