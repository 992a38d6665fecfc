"""The denoise loop and decode: prompt -> text conditioning -> latents -> compiled UNet steps -> compiled VAE decode.

Mirrors the family's diffusers pipeline (StableDiffusionXLPipeline, StableDiffusionPipeline, PixArtAlphaPipeline)
step for step (same initial latents from the same generator, same guidance arithmetic, same scheduler calls), so that
swapping one for the other changes nothing but speed. A pipeline serves one call at a time: threads that share one
take turns (a lock), and each gets what it would get alone.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from .compat import on_device
from .errors import FastDiffError
from .format import Manifest, Resolution, micro_conditioning, parse_resolution, torch_dtype
from .packages import CompiledModule, CUDAGraphModule, bound_weights
from .text import TextConditioner

OUTPUT_TYPES = ("pil", "np", "latent")
LORA_FAMILIES = ("sdxl", "sd")  # whose diffusers pipelines take cross_attention_kwargs (and load LoRAs)
# What callback_on_step_end can be given and return (diffusers' pipelines offer their conditioning tensors too).
CALLBACK_TENSOR_INPUTS = ("latents",)
# What a call does, in order, each under torch.profiler.record_function("fastdiff::" + phase): a profile of a call
# then says how long each took on the host and which GPU work it launched (bench/common.py timeline).
PHASES = ("encode_prompt", "denoise", "decode", "to_image")


def _on_own_device(method: Callable) -> Callable:
    """Run the method with the pipeline's GPU current (see compat.on_device), one call at a time: the scheduler's
    state and the CUDA graphs' input buffers are the pipeline's own, so callers on other threads wait their turn."""

    @functools.wraps(method)
    def wrapper(self: FastDiffPipeline, *args: Any, **kwargs: Any) -> Any:
        with self._turn, on_device(self.device):
            return method(self, *args, **kwargs)

    return wrapper


@dataclass
class FastDiffPipelineOutput:
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class FastDiffPipeline:
    """A text-to-image pipeline over compiled artifacts; call it like diffusers' StableDiffusionXLPipeline (or
    StableDiffusionPipeline, PixArtAlphaPipeline, for those families' artifacts)."""

    def __init__(
        self,
        manifest: Manifest,
        device: torch.device,
        conditioner: TextConditioner,
        scheduler: Any,
        unets: dict[str, CompiledModule | CUDAGraphModule],
        vae_decoders: dict[str, CompiledModule],
        digest: str | None = None,
        turn: threading.RLock | None = None,
    ) -> None:
        self.manifest = manifest
        self.digest = digest  # the artifact's (format.manifest_digest), as loaded
        self.device = device
        self.dtype = torch_dtype(manifest.dtype)
        self.vae_dtype = torch_dtype(manifest.vae_decoder.dtype)
        self.conditioner = conditioner
        self.scheduler = scheduler
        self.unets = unets
        self.vae_decoders = vae_decoders
        self._unet_weights = bound_weights(next(iter(unets.values())))  # one weight file for every resolution
        self._progress: dict[str, Any] = {}
        self._interrupt = False
        self._num_timesteps = 0
        # One call at a time, shared with the other pipelines that bind the same weights (`turn`, their lock);
        # reentrant: a step callback may call the pipeline's methods.
        self._turn = turn or threading.RLock()

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (in a callback_on_step_end, as with diffusers) to skip the remaining steps."""
        return self._interrupt

    @property
    def num_timesteps(self) -> int:
        """The steps of the current (or last) call, as diffusers' pipelines have it for callbacks."""
        return self._num_timesteps

    @property
    def resolutions(self) -> list[Resolution]:
        # the VAE decoder's: load_pipeline loads both components at the same resolutions, the decoder's first
        return sorted(parse_resolution(k) for k in self.vae_decoders)

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for the tqdm bar of the denoise loop, e.g. disable=True (as in diffusers)."""
        self._progress = kwargs

    @torch.no_grad()
    @_on_own_device
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        latents: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> FastDiffPipelineOutput:
        """As diffusers' pipelines: `latents` are the initial noise (one row per image, before the scheduler's
        scaling), `cross_attention_kwargs={"scale": s}` scales the LoRA adapters that are not fused by s for this call
        (SDXL and SD; its only key here), `callback_on_step_end(pipe, step, timestep, {name: tensor})` is called after
        each step with the tensors named in `callback_on_step_end_tensor_inputs` (default and only: latents) and may
        return replacements; setting `pipe._interrupt = True` skips the remaining steps."""
        # Deferred so that load_pipeline can overlap diffusers' slow import with loading; loaded by now.
        from diffusers.utils.torch_utils import randn_tensor

        facts = self.manifest.model
        if guidance_scale is None:
            guidance_scale = facts.default_guidance_scale  # diffusers' default for this family
        prompts = _prompt_list(prompt, "prompt")
        negatives = _negative_prompts(negative_prompt, len(prompts))
        _check_call(num_inference_steps, guidance_scale, num_images_per_prompt, generator, output_type)
        lora_scale = _lora_scale(cross_attention_kwargs, facts.family)
        guidance_scale = float(guidance_scale)  # a numpy number or a 0-d tensor too, as diffusers takes them
        res = self._resolution(height, width)
        guidance = guidance_scale > 1.0
        tensor_inputs = _callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._interrupt = False  # as diffusers, before the prompt's encoding: an interrupt set during it counts

        n = len(prompts) * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != n:
            raise FastDiffError(
                f"{len(generator)} generators for {n} image{'s' * (n != 1)}",
                "give one generator, or one per image (prompt-major)",
            )
        shape = (n, *self.manifest.model.latent_shape(res))
        if latents is not None:
            latents = _as_latents(latents, shape, self.device, self.dtype, "latents")
        # The scheduler's tables and timesteps stay on the CPU: indexing them with a device timestep would wait for
        # the GPU at every step (PNDM's alphas_cumprod[t]). The denoiser gets the timesteps in one copy per call.
        try:
            self.scheduler.set_timesteps(num_inference_steps, device="cpu")
        except ValueError as e:  # DDIM's, for one: more steps than the model was trained with
            raise FastDiffError(
                f"{type(self.scheduler).__name__} cannot run {num_inference_steps} steps: {e}", "choose fewer steps"
            ) from None
        unet, vae = self.unets[res.key], self.vae_decoders[res.key]
        adapters = getattr(self._unet_weights, "lora_adapters", None)  # none until a LoRA is loaded (lora.py)
        if adapters is not None:
            adapters.scale_for_call(lora_scale)  # before the text encoders, which LoRAs change too
        with record_function("fastdiff::encode_prompt"):  # the phases, named in profiles (PHASES)
            chunks = denoiser_conditioning(
                self.conditioner, self.manifest, self.device, prompts, negatives, guidance, res, num_images_per_prompt
            )
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)  # so step() never searches the timesteps
        unet_timesteps = self.scheduler.timesteps.to(self.device, torch.float32)  # the package takes float32 scalars
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        self._num_timesteps = len(self.scheduler.timesteps)

        step_kwargs = self._step_kwargs(generator)
        with record_function("fastdiff::denoise"):
            latents = self._denoise(
                unet, latents, unet_timesteps, chunks, guidance_scale, step_kwargs, callback_on_step_end, tensor_inputs
            )
        if output_type == "latent":
            return FastDiffPipelineOutput(images=latents)
        with record_function("fastdiff::decode"):
            out = torch.cat([vae(latents[chunk].to(self.vae_dtype)) for chunk, _ in chunks])
        if not bool(torch.isfinite(out).all()):  # one wait, after the loop: the images cross to the host next anyway
            raise FastDiffError(
                "the generation gave NaN or infinite values (a black image)",
                "check the artifact with fastdiff-inspect --verify; in fp16, a VAE that overflows needs its fp16-fix "
                "(--vae madebyollin/sdxl-vae-fp16-fix for SDXL) or a bf16 export",
            )
        with record_function("fastdiff::to_image"):
            return FastDiffPipelineOutput(images=_images(out, output_type))

    @torch.no_grad()
    @_on_own_device
    def warm_up(self) -> None:
        """Run every compiled module at the shapes of a default request (one image, the default resolution and
        guidance): their kernels load, cuDNN and cuBLAS pick their algorithms, and the CUDA graphs of the UNet step
        and the text encoders are captured, before the first request. load_pipeline warms up by default, in the same
        parts (warm_up_decoder, warm_up_conditioning, warm_up_denoiser), each beside another part of the load.

        cuDNN keeps its plans per thread: the VAE decoder, which is not replayed as a graph, pays for its plans again
        on its first call from another thread."""
        res = self._resolution(None, None)
        warm_up_decoder(self.vae_decoders[res.key], self.manifest, res, self.device)
        chunks = warm_up_conditioning(self.conditioner, self.manifest, res, self.device)
        warm_up_denoiser(self.unets[res.key], self.manifest, res, self.device, chunks)

    # LoRAs, with diffusers' names (runtime/lora.py does the work; docs/finetunes-and-loras.md).

    @_on_own_device
    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        scale: float = 1.0,
        *,
        weight_name: str | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
    ) -> str:
        """Load a LoRA (a file, a folder, a hub id or a state dict, in the formats diffusers' load_lora_weights reads
        for the family: diffusers/PEFT, kohya/A1111) for the denoiser and the compiled text encoders, and make it the
        one active adapter, at weight `scale` (as diffusers does: set_adapters combines adapters). Returns its name
        (default: default_N).

        Unlike diffusers, nothing is injected: the adapter is merged into the bound weights in place, from a pristine
        copy of the base kept on the host, so the compiled code and CUDA graphs run unchanged, at the same speed.
        A LoRA whose layer the artifact lacks, or of another shape, is refused by name and changes nothing.
        Pipelines of this process over the same artifact and device share the weights, and so the adapters. Call it
        between generations, not during one."""
        return self._lora_adapters().load(
            pretrained_model_name_or_path_or_dict,
            adapter_name,
            scale,
            weight_name=weight_name,
            subfolder=subfolder,
            revision=revision,
        )

    @_on_own_device
    def set_adapters(
        self,
        adapter_names: str | list[str],
        adapter_weights: float | dict[str, float] | list[float | dict[str, float] | None] | None = None,
    ) -> None:
        """Merge exactly these loaded adapters: W = W_base + sum of weight * scaling * B @ A over them (the weight per
        adapter, 1.0 by default, or a dict by part such as {"unet": 0.8, "text_encoder": 1.0}); [] leaves the base.
        Exact: every switch starts from the pristine base."""
        self._lora_adapters().set_adapters(adapter_names, adapter_weights)

    @_on_own_device
    def fuse_lora(
        self,
        components: Sequence[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
    ) -> None:
        """As diffusers: the active adapters (or those named) are fused into the parts `components` (default: all),
        at `lora_scale` times their weights, a scale they keep once unfused, as in diffusers. A call's
        cross_attention_kwargs scale skips fused parts; set_adapters is refused until unfuse_lora; unload_lora_weights
        and delete_adapters leave fused adapters in the weights (fuse_lora + unload_lora_weights makes a LoRA the
        base of every pipeline sharing these weights, until none is left and the artifact loads again). `safe_fusing`
        refuses NaN or infinite weights, changing nothing. fastdiff merges every adapter anyway: fusing gains no
        speed."""
        self._lora_adapters().fuse(components, lora_scale, safe_fusing, adapter_names)

    @_on_own_device
    def unfuse_lora(self, components: Sequence[str] | None = None) -> None:
        """The fused adapters' parts `components` (default: all) back to adapters that set_adapters and a call's
        scale change, at the weights they were fused with (the images stay the same)."""
        self._lora_adapters().unfuse(components)

    @_on_own_device
    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """Drop these loaded adapters: those of them merged leave the weights (exactly), the other active ones stay."""
        self._lora_adapters().delete(adapter_names)

    @_on_own_device
    def unload_lora_weights(self) -> None:
        """Drop every adapter: the base weights are back, bit for bit, and the host copies freed."""
        self._lora_adapters().unload()

    def get_active_adapters(self) -> list[str]:
        """The adapters merged now (diffusers' name for it)."""
        return list(self._lora_adapters().active)

    def _lora_adapters(self) -> Any:
        if getattr(self, "_loras", None) is None:
            from .lora import shared_adapters  # diffusers' LoRA conversions load with a LoRA, not with the pipeline

            self._loras = shared_adapters(self)
        return self._loras

    def _denoise(
        self,
        unet: CompiledModule | CUDAGraphModule,
        latents: torch.Tensor,
        unet_timesteps: torch.Tensor,
        chunks: list[tuple[slice, tuple[torch.Tensor, ...]]],
        guidance_scale: float,
        step_kwargs: dict[str, Any],
        callback: Callable[..., Any] | None = None,
        tensor_inputs: list[str] | tuple[str, ...] = (),
    ) -> torch.Tensor:
        """All steps over the scheduler's timesteps (set by the caller; `unet_timesteps` are the same on the device):
        nothing here waits for the device (unless the caller's callback does)."""
        guidance = guidance_scale > 1.0
        for i, t in enumerate(tqdm(self.scheduler.timesteps, **self._progress)):
            if self._interrupt:
                break
            scaled = self.scheduler.scale_model_input(latents, t)  # elementwise: the same as on the CFG batch
            noise = []
            for chunk, cond in chunks:
                model_in = torch.cat([scaled[chunk]] * 2) if guidance else scaled[chunk]
                out = unet(model_in, unet_timesteps[i], *cond)
                if guidance:
                    uncond, text = out.chunk(2)
                    out = uncond + guidance_scale * (text - uncond)
                noise.append(out)
            noise = noise[0] if len(noise) == 1 else torch.cat(noise)
            latents = self.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
            if callback is not None:
                returned = callback(self, i, t, {"latents": latents} if "latents" in tensor_inputs else {})
                if isinstance(returned, dict) and "latents" in returned:
                    what = "the latents callback_on_step_end returned"
                    latents = _as_latents(returned["latents"], latents.shape, latents.device, latents.dtype, what)
        return latents

    def _step_kwargs(self, generator: Any) -> dict[str, Any]:
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs: dict[str, Any] = {}
        if "eta" in accepted:
            kwargs["eta"] = 0.0
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    def _resolution(self, height: int | None, width: int | None) -> Resolution:
        exported = self.resolutions
        if height is None and width is None:
            return default_resolution(self.manifest, exported)
        if height is None or width is None:
            raise FastDiffError("give both height and width, or neither", "e.g. height=1024, width=1024")
        if not (_is_size(height) and _is_size(width)):
            raise FastDiffError(f"height and width must be positive integers, got {height!r} and {width!r}")
        res = Resolution(int(width), int(height))
        if res not in exported:
            raise FastDiffError(
                f"resolution {res} (width x height) was not exported; "
                f"this artifact has {', '.join(map(str, exported))}",
                f"pick one of those, or export it: fastdiff-export ... --res {res}",
            )
        return res


Chunks = list[tuple[slice, tuple[torch.Tensor, ...]]]  # (images of the chunk, the denoiser's inputs after timestep)


def default_resolution(manifest: Manifest, exported: list[Resolution]) -> Resolution:
    """A call's resolution when it names none: the model's default, if it was exported, else the smallest."""
    default = Resolution(*manifest.model.default_resolution)
    return default if default in exported else min(exported)


def denoiser_conditioning(
    conditioner: TextConditioner,
    manifest: Manifest,
    device: torch.device,
    prompts: list[str],
    negatives: list[str] | None,
    guidance: bool,
    res: Resolution,
    per_prompt: int,
) -> Chunks:
    """The denoiser's inputs after the latents and timestep, in its input order, one row per image (the text
    conditioning, and the micro-conditioning of SDXL or PixArt-α's 1024² models), split into the chunks of at most
    `batch_size` images the UNet was compiled for; with guidance each chunk is [negative rows, rows]."""
    text, neg_text = conditioner(prompts, negatives, guidance)
    micro = micro_conditioning(res, len(prompts), text["encoder_hidden_states"].dtype)
    names = manifest.unet.inputs[2:]

    def rows(conditioning: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [_per_image({**conditioning, **micro}[name], per_prompt, device) for name in names]

    cond = rows(text)
    neg_cond = rows(neg_text) if guidance else None
    chunks = []
    for chunk in _chunks(len(prompts) * per_prompt, manifest.batch_size):
        if guidance:
            chunks.append((chunk, tuple(torch.cat([u[chunk], c[chunk]]) for u, c in zip(neg_cond, cond, strict=True))))
        else:
            chunks.append((chunk, tuple(c[chunk] for c in cond)))
    return chunks


# The warm-up's parts: FastDiffPipeline.warm_up runs them in order; load_pipeline runs each beside another part of the
# load (the decoder and the text encoders while the UNet's weights stream in, the UNet while the scheduler imports).


@torch.no_grad()
def warm_up_decoder(decoder: CompiledModule, manifest: Manifest, res: Resolution, device: torch.device) -> None:
    """The VAE decoder's first call, at `res`, for one image."""
    with on_device(device):
        decoder(_warm_up_latents(manifest, res, device).to(torch_dtype(manifest.vae_decoder.dtype)))


@torch.no_grad()
def warm_up_conditioning(
    conditioner: TextConditioner, manifest: Manifest, res: Resolution, device: torch.device
) -> Chunks:
    """The default request's conditioning (through the text encoders: their first calls, or their CUDA graphs'
    capture if they are replayed as such), which warm_up_denoiser takes."""
    with on_device(device):
        guidance = manifest.model.default_guidance_scale > 1.0
        return denoiser_conditioning(conditioner, manifest, device, [""], None, guidance, res, 1)


@torch.no_grad()
def warm_up_denoiser(
    unet: CompiledModule | CUDAGraphModule, manifest: Manifest, res: Resolution, device: torch.device, chunks: Chunks
) -> None:
    """The denoiser's first call (its CUDA graph's capture, if it is replayed as one), at `res`, for one image."""
    with on_device(device):
        latents = _warm_up_latents(manifest, res, device)
        guidance = manifest.model.default_guidance_scale > 1.0
        timestep = torch.tensor(999.0, device=device)
        for chunk, cond in chunks:
            unet(torch.cat([latents[chunk]] * 2) if guidance else latents[chunk], timestep, *cond)


def _warm_up_latents(manifest: Manifest, res: Resolution, device: torch.device) -> torch.Tensor:
    return torch.zeros((1, *manifest.model.latent_shape(res)), device=device, dtype=torch_dtype(manifest.dtype))


def _images(decoded: torch.Tensor, output_type: str) -> list[PIL.Image.Image] | np.ndarray:
    from diffusers.image_processor import VaeImageProcessor

    if output_type == "np":
        return VaeImageProcessor.pt_to_numpy(decoded)
    if decoded.device.type == "cpu":  # numpy rounds faster than torch on the CPU
        return VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(decoded))
    return [PIL.Image.fromarray(p) for p in uint8_pixels(decoded).cpu().numpy()]


def uint8_pixels(images: torch.Tensor) -> torch.Tensor:
    """diffusers' numpy_to_pil arithmetic ((x * 255).round() in float32, as uint8, NHWC), bit for bit, computed where
    the images are: on a GPU a quarter of the bytes then cross to the host and the CPU does no per-pixel work."""
    return (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # NHWC where computed


def _negative_prompts(negative_prompt: str | list[str] | None, batch: int) -> list[str] | None:
    if negative_prompt is None:
        return None
    negatives = _prompt_list(negative_prompt, "negative_prompt")
    negatives = negatives * batch if isinstance(negative_prompt, str) else negatives
    if len(negatives) != batch:
        raise FastDiffError(
            f"{len(negatives)} negative prompts for {batch} prompts",
            "give one negative prompt, or one per prompt",
        )
    return negatives


def _prompt_list(value: Any, name: str) -> list[str]:
    """A prompt argument as a list: one string, or a non-empty list (or tuple) of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise FastDiffError(f"{name} must be a string or a non-empty list of strings, got {value!r:.80}")


def _is_count(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _is_size(value: Any) -> bool:  # an integer, or a float without a fraction (diffusers takes 1024.0)
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return real and math.isfinite(value) and float(value).is_integer() and value >= 1


def _check_call(steps: Any, guidance_scale: Any, per_prompt: Any, generator: Any, output_type: str) -> None:
    if not _is_count(steps):
        raise FastDiffError(f"num_inference_steps must be a positive integer, got {steps!r}", "use e.g. 30 steps")
    try:
        number = not isinstance(guidance_scale, bool | str) and math.isfinite(float(guidance_scale))
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several values
        number = False
    if not number:
        raise FastDiffError(f"guidance_scale must be a finite number, got {guidance_scale!r}", "use e.g. 5.0")
    if not _is_count(per_prompt):
        raise FastDiffError(f"num_images_per_prompt must be a positive integer, got {per_prompt!r}")
    generators = generator if isinstance(generator, list) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
        raise FastDiffError(f"generator must be a torch.Generator or a list of them, got {generator!r:.80}")
    if output_type not in OUTPUT_TYPES:
        raise FastDiffError(f"output_type {output_type!r} is not supported", f"use one of {', '.join(OUTPUT_TYPES)}")


def _lora_scale(kwargs: Any, family: str) -> float:
    """The LoRA scale a call asks for with diffusers' cross_attention_kwargs={"scale": s} (its only key here)."""
    if kwargs is None:
        return 1.0
    if family not in LORA_FAMILIES:  # diffusers' pipeline for it has no such argument
        raise FastDiffError(f"a {family} pipeline takes no cross_attention_kwargs", "leave it out")
    if not isinstance(kwargs, Mapping):
        raise FastDiffError(f"cross_attention_kwargs must be a dict, got {kwargs!r:.80}", 'e.g. {"scale": 0.8}')
    if unknown := [key for key in kwargs if key != "scale"]:
        raise FastDiffError(
            f"cross_attention_kwargs {unknown[0]!r:.80} is not supported: fastdiff takes only 'scale' (the LoRA scale)",
            "leave the other keys out",
        )
    scale = kwargs.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise FastDiffError(f"cross_attention_kwargs' scale must be a finite number, got {scale!r:.80}", "e.g. 0.8")
    return float(scale)


def _callback_inputs(callback: Any, names: list[str] | None) -> list[str]:
    """The tensors callback_on_step_end is given: those named, or a diffusers PipelineCallback's own."""
    if callback is None:
        return []
    if not callable(callback):
        raise FastDiffError(f"callback_on_step_end must be callable, got {callback!r:.80}")
    own = getattr(callback, "tensor_inputs", None)  # a diffusers PipelineCallback names its own
    names = own if own is not None else ["latents"] if names is None else names
    if unknown := [name for name in names if name not in CALLBACK_TENSOR_INPUTS]:
        asked = "callback_on_step_end (its tensor_inputs)" if own is not None else "callback_on_step_end_tensor_inputs"
        raise FastDiffError(
            f"{asked} asks for {unknown[0]!r}; this pipeline offers only {', '.join(CALLBACK_TENSOR_INPUTS)}",
            "use a callback that needs only those",
        )
    return list(names)


def _as_latents(
    given: Any, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, what: str
) -> torch.Tensor:
    """`given` on the pipeline's device and in its dtype, if it is a tensor of the call's latent shape."""
    if not isinstance(given, torch.Tensor) or tuple(given.shape) != tuple(shape):
        got = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
        raise FastDiffError(f"{what} must be a tensor of shape {tuple(shape)} for this call, got {got}")
    return given.to(device, dtype).contiguous()  # as the compiled code reads them


def _per_image(t: torch.Tensor, per_prompt: int, device: torch.device) -> torch.Tensor:
    """One row per image: each prompt's row repeated for its images, in diffusers' order (prompt-major)."""
    return t.repeat_interleave(per_prompt, dim=0).to(device)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]
