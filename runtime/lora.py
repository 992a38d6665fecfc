"""LoRAs merged into an artifact's bound weights at run time: no compile, no new buffers.

The compiled packages use the runtime's weight tensors in place (user-managed constants), so an adapter written into
those tensors (`copy_`) changes what the next call computes, and a CUDA graph captured on them stays valid. Every
merge starts from a pristine copy of the base weights, so that switching adapters and unloading them are exact: the
weights never drift, and after `unload` they are the artifact's, bit for bit.

A LoRA layer lands where the export passes put its layer: `to_q`/`to_k`/`to_v` in their rows of the fused `to_qkv`
(`to_kv` in cross-attention), a 1x1 convolution in the linear that conv1x1_to_linear made of it, a channels_last
convolution through its NHWC storage, and a quantized linear (int8 or fp8) quantized again from its dequantized base
plus the update, the way the export quantized it (requantize.py).

Memory: the pristine copies of the tensors that loaded adapters touch live on the host (page-locked on a GPU), one
host byte per byte of those tensors (SDXL, every attention and feed-forward linear of the UNet in bf16: 4.4 GB); the
adapters' factors live on the device. Pipelines of one process over the same artifact share its weights, and so
share one set of adapters.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import FastDiffError
from .format import TEXT_PARTS, torch_dtype
from .lora_files import PARTS, LoraLayer, read_lora
from .packages import bound_weights
from .requantize import dequantize, requantize

log = logging.getLogger(__name__)

# How the export names a part's weights: the wrapper's attribute (exporter/wrappers.py: UNetStep.unet,
# CLIPTextEncode.encoder) before the diffusers or transformers module's own names.
PREFIXES = {"unet": "unet.", "text_encoder": "encoder.", "text_encoder_2": "encoder."}
# diffusers' fuse_projections (the fuse_qkv pass): each fused projection and the projections whose rows it stacks.
FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v")}
# A quantized weight as the export stores it (exporter/compile.py: plain_constants): torchao's inner tensors.
QDATA, SCALE = "parametrizations.weight.original0", "parametrizations.weight.original1"


@dataclass(frozen=True)
class Target:
    """A bound tensor that LoRA layers update: a weight, or a quantized weight's qdata and its scale."""

    part: str
    tensor: str
    scale: str | None = None


@dataclass(frozen=True)
class Update:
    """One LoRA layer and where it lands: its target's rows `rows` (a fused projection's), or all of them."""

    target: Target
    rows: tuple[int, int] | None
    layer: LoraLayer


@dataclass(frozen=True)
class Part:
    weights: Mapping[str, torch.Tensor]  # what the part's packages bind
    dtype: torch.dtype  # the part's precision, which a quantized weight was quantized from


class HostCopies:
    """The tensors that adapters touch, as they were before any adapter: on the host, one buffer per load,
    page-locked on a GPU (with cudaHostRegister: torch's pinned allocator rounds each allocation up to a power of
    two) so that restoring one is an asynchronous copy."""

    ALIGN = 64  # bytes; every copy starts at a multiple of it, so any dtype can view it

    def __init__(self, device: torch.device) -> None:
        self.pinned = device.type == "cuda"
        self.nbytes = 0
        self._copies: dict[tuple[str, str], torch.Tensor] = {}
        self._buffers: list[torch.Tensor] = []
        self._release = weakref.finalize(self, _release_buffers, self._buffers, device if self.pinned else None)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._copies

    def __getitem__(self, key: tuple[str, str]) -> torch.Tensor:
        return self._copies[key]

    def keep(self, tensors: Mapping[tuple[str, str], torch.Tensor]) -> None:
        """Copy the tensors not kept yet (by key), with their strides (a channels_last weight's NHWC storage)."""
        new = {key: t for key, t in tensors.items() if key not in self._copies}
        sizes = {key: t.numel() * t.element_size() for key, t in new.items()}
        total = sum(-(-n // self.ALIGN) * self.ALIGN for n in sizes.values())
        if not total:
            return
        buffer = torch.empty(total, dtype=torch.uint8)
        if self.pinned and not _register(buffer):
            log.warning("the LoRA base copies could not be page-locked: restoring them will wait for the host")
        self._buffers.append(buffer)
        offset = 0
        for key, t in new.items():
            copy = buffer[offset : offset + sizes[key]].view(t.dtype).as_strided(t.shape, t.stride())
            copy.copy_(t, non_blocking=self.pinned)  # before any merge on the same stream writes the tensor
            self._copies[key] = copy
            offset += -(-sizes[key] // self.ALIGN) * self.ALIGN
        self.nbytes += total

    def close(self) -> None:
        self._copies.clear()
        self._release()


def _register(buffer: torch.Tensor) -> bool:
    return int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)) == 0


def _release_buffers(buffers: list[torch.Tensor], device: torch.device | None) -> None:
    """Unregister the page-locked buffers (`device`: the GPU whose copies use them; None: not page-locked)."""
    if device is not None and buffers:
        torch.cuda.synchronize(device)  # copies out of them may still be queued
        for buffer in buffers:
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
    buffers.clear()


class LoraAdapters:
    """The adapters loaded into one set of bound weights (a pipeline's, shared by the pipelines over the same
    artifact and device) and which of them are merged, at what weights."""

    def __init__(self, parts: dict[str, Part], stock: Sequence[str], family: str, device: torch.device) -> None:
        self.parts = parts
        self.stock = tuple(stock)  # text encoders shipped as transformers models: none of their weights are bound
        self.family = family
        self.device = device
        self.adapters: dict[str, list[Update]] = {}
        self.active: dict[str, dict[str, float]] = {}  # adapter -> part -> weight
        self.fused: dict[str, frozenset[str]] = {}  # adapter -> the parts fuse_lora fused it into
        self.call_scale = 1.0  # the LoRA scale of the call merged now, for the adapters not fused
        self._base = HostCopies(device)
        self._dirty: set[Target] = set()  # the targets that differ from their pristine base now
        self._lock = threading.Lock()

    @property
    def host_bytes(self) -> int:
        """Host memory held by the pristine copies."""
        return self._base.nbytes

    def load(
        self,
        source: str | os.PathLike | Mapping[str, torch.Tensor],
        adapter_name: str | None = None,
        scale: float = 1.0,
        **fetch: Any,
    ) -> str:
        """Read, check and merge a LoRA as the one active adapter, at weight `scale`; its name. Nothing changes if it
        is refused."""
        weight = _weight(scale, "scale")
        with self._lock:
            if adapter_name is None:
                adapter_name = next(
                    f"default_{i}" for i in range(len(self.adapters) + 1) if f"default_{i}" not in self.adapters
                )
            if not isinstance(adapter_name, str) or not adapter_name:
                raise FastDiffError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
            if adapter_name in self.adapters:
                raise FastDiffError(
                    f"an adapter named {adapter_name!r} is loaded already",
                    "choose another adapter_name, or unload first",
                )
            lora = read_lora(source, self.family, self._layers_per_block(), **fetch)
            updates = self._place(lora)
            self._base.keep(
                {
                    (u.target.part, name): self.parts[u.target.part].weights[name]
                    for u in updates
                    for name in _tensors(u.target)
                }
            )
            self.adapters[adapter_name] = [Update(u.target, u.rows, u.layer.to(self.device)) for u in updates]
            try:  # the new adapter alone; fused ones are unfused, as PEFT unmerges to add an adapter
                self._merge({adapter_name: dict.fromkeys(self.parts, weight)})
            except BaseException:
                del self.adapters[adapter_name]
                raise
            return adapter_name

    def set_adapters(
        self,
        adapter_names: str | Sequence[str],
        adapter_weights: float | Mapping[str, float] | Sequence[float | Mapping[str, float] | None] | None = None,
    ) -> None:
        """Merge exactly these adapters, at these weights (one for all, or one per adapter; a weight may be a dict by
        part, e.g. {"unet": 0.8, "text_encoder": 1.0}, where a part left out gets 1.0, as in diffusers)."""
        names = self._loaded(adapter_names)
        with self._lock:
            if self.fused:  # diffusers ignores the call then, and unfuses with the new weights: they drift
                raise FastDiffError(
                    f"adapters {', '.join(map(repr, self.fused))} are fused (fuse_lora): their weights are set",
                    "unfuse_lora() first, or unload_lora_weights() to keep them fused without their adapters",
                )
            if len(set(names)) != len(names):
                raise FastDiffError(f"adapter_names names an adapter twice: {names}")
            if adapter_weights is None or not isinstance(adapter_weights, Sequence) or isinstance(adapter_weights, str):
                adapter_weights = [adapter_weights] * len(names)
            if len(adapter_weights) != len(names):
                raise FastDiffError(
                    f"{len(adapter_weights)} adapter weights for {len(names)} adapters", "give one per adapter"
                )
            self._merge({name: self._part_weights(w) for name, w in zip(names, adapter_weights, strict=True)})

    def delete(self, adapter_names: str | Sequence[str]) -> None:
        """Drop these adapters; those of them merged leave the weights, the other active ones stay as they were. An
        adapter fused (fuse_lora) stays in the weights it was fused into, as in diffusers."""
        names = set(self._loaded(adapter_names))
        with self._lock:
            active = {name: weights for name, weights in self.active.items() if name not in names}
            fused = {name: parts for name, parts in self.fused.items() if name not in names}
            call_scale = self.call_scale
            if baked := {name: parts for name, parts in self.fused.items() if name in names}:
                self._bake(baked)
            self._merge(active, fused, call_scale)
            for name in names:
                del self.adapters[name]

    def fuse(
        self,
        components: str | Sequence[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: str | Sequence[str] | None = None,
    ) -> None:
        """Fuse the active adapters (or those named, which must be active) into the parts `components` (default:
        all), at `lora_scale` times their weights: the scale stays with them, unfused too, as in diffusers. A call's
        LoRA scale does not apply to fused parts. `safe_fusing` refuses weights that would not be finite."""
        scale = _weight(lora_scale, "lora_scale")
        parts = self._parts_named(components)
        names = list(self.active) if adapter_names is None else self._loaded(adapter_names)
        with self._lock:
            if inactive := [name for name in names if name not in self.active]:
                raise FastDiffError(
                    f"adapter {inactive[0]!r} is not active: there is nothing of it to fuse",
                    "make it active with set_adapters first",
                )
            active = {name: dict(weights) for name, weights in self.active.items()}
            fused = dict(self.fused)
            for name in names:
                for part in parts - fused.get(name, frozenset()):  # a part fused already keeps its weight
                    active[name][part] *= scale
                fused[name] = fused.get(name, frozenset()) | parts
            self._merge(active, fused, check_finite=safe_fusing)

    def unfuse(self, components: str | Sequence[str] | None = None) -> None:
        """The fused adapters' parts `components` (default: all) back to adapters a call's LoRA scale applies to, at
        the weights they were fused with (the images do not change)."""
        parts = self._parts_named(components)
        with self._lock:
            fused = {name: fused - parts for name, fused in self.fused.items() if fused - parts}
            self._merge(self.active, fused)

    def scale_for_call(self, scale: float) -> None:
        """Merge the active adapters' parts that are not fused at `scale` times their weights: a call's LoRA scale
        (diffusers' cross_attention_kwargs={"scale": ...}), kept until a call asks for another."""
        with self._lock:
            if scale == self.call_scale:
                return
            if all(
                part in self.fused.get(name, ()) or not weight
                for name, weights in self.active.items()
                for part, weight in weights.items()
            ):  # nothing merged would change
                self.call_scale = scale
                return
            self._merge(self.active, self.fused, scale)

    def _loaded(self, adapter_names: str | Sequence[str]) -> list[str]:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if unknown := [n for n in names if n not in self.adapters]:
            loaded = ", ".join(map(repr, self.adapters)) or "none"
            raise FastDiffError(f"no adapter named {unknown[0]!r} is loaded (loaded: {loaded})", "load it first")
        return names

    def unload(self) -> None:
        """The base weights back, bit for bit; every adapter and pristine copy dropped. Fused adapters stay in the
        weights (as in diffusers: fuse_lora and unload_lora_weights make a LoRA the pipeline's own)."""
        with self._lock:
            if self.fused:
                self._merge(*self._fused_only(self.fused))
            else:
                for target in self._dirty:
                    self._restore(target)
            self._dirty.clear()
            self.adapters.clear()
            self.active.clear()
            self.fused.clear()
            self.call_scale = 1.0
            self._base.close()
            self._base = HostCopies(self.device)

    def _fused_only(self, fused: dict[str, frozenset[str]]) -> tuple[dict[str, dict[str, float]], dict]:
        """What _merge takes to merge only these adapters' fused parts."""
        active = {
            name: {part: weight if part in parts else 0.0 for part, weight in self.active[name].items()}
            for name, parts in fused.items()
        }
        return active, fused

    def _bake(self, fused: dict[str, frozenset[str]]) -> None:
        """Make these adapters' fused parts part of the base: the weights with only them merged become the
        pristine copies that every later merge starts from."""
        self._merge(*self._fused_only(fused))
        for target in self._dirty:
            for name in _tensors(target):
                self._base[target.part, name].copy_(self.parts[target.part].weights[name])
        self._dirty, self.active, self.fused, self.call_scale = set(), {}, {}, 1.0  # the weights are the base now

    def _parts_named(self, components: str | Sequence[str] | None) -> frozenset[str]:
        """The parts of the artifact among `components` (diffusers' part names; None: all of them)."""
        if components is None:
            return frozenset(self.parts)
        names = [components] if isinstance(components, str) else list(components)
        if unknown := [c for c in names if c not in PARTS[self.family]]:
            raise FastDiffError(
                f"components names {unknown[0]!r}, which is no part of a {self.family} model",
                f"name some of {', '.join(PARTS[self.family])}",
            )
        return frozenset(c for c in names if c in self.parts)

    def _part_weights(self, weight: float | Mapping[str, float] | None) -> dict[str, float]:
        if not isinstance(weight, Mapping):
            return dict.fromkeys(self.parts, 1.0 if weight is None else _weight(weight, "adapter weight"))
        if unknown := [p for p in weight if p not in PARTS[self.family]]:
            raise FastDiffError(
                f"adapter weights name {unknown[0]!r}, which is no part of a {self.family} model",
                f"name some of {', '.join(PARTS[self.family])}",
            )
        return {p: _weight(weight.get(p, 1.0), f"the adapter weight of {p}") for p in self.parts}

    def _layers_per_block(self) -> int:
        """The UNet's layers per block, which the SGM-layout conversion needs: resnets in its first down block."""
        found = {
            m[1]
            for name in self.parts["unet"].weights
            if (m := re.match(r"unet\.down_blocks\.0\.resnets\.(\d+)\.", name))
        }
        return len(found)

    def _place(self, lora: dict[str, dict[str, LoraLayer]]) -> list[Update]:
        """Every layer's target in the bound weights; refused, naming the layer, if one has none or another shape."""
        updates = []
        for part, layers in lora.items():
            if part in self.stock:
                raise FastDiffError(
                    f"the LoRA has {part} layers, but this artifact ships its text encoders as transformers models, "
                    "into which fastdiff merges nothing",
                    "export the model with compiled text encoders (the default), or load a LoRA without text-encoder "
                    "layers",
                )
            weights = self.parts[part].weights
            for module, layer in layers.items():
                found = locate(weights, PREFIXES[part], module, text_encoder=part != "unet")
                if found is None:
                    raise FastDiffError(
                        f"LoRA layer {part}.{module}: this artifact's {part} has no such layer",
                        f"load a LoRA made for this model's architecture ({self.family})",
                    )
                target, rows = Target(part, *found[:2]), found[2]
                shape = _rows(weights[target.tensor], rows).shape
                if not _fits(layer.shape, shape):
                    raise FastDiffError(
                        f"LoRA layer {part}.{module} updates a weight of shape {list(layer.shape)}; this artifact's "
                        f"{target.tensor} is {list(shape)}",
                        f"load a LoRA made for this model's architecture ({self.family})",
                    )
                updates.append(Update(target, rows, layer))
        return updates

    def _merge(
        self,
        active: dict[str, dict[str, float]],
        fused: dict[str, frozenset[str]] | None = None,
        call_scale: float = 1.0,
        check_finite: bool = False,
        rollback: bool = True,
    ) -> None:
        """Write base + the weighted updates of `active` (times `call_scale` in the parts not `fused`) into every
        target they touch, and the base back into those that only earlier adapters touched. If that fails, the
        adapters merged before are merged again (`rollback`), else the base stays."""
        previous = (self.active, self.fused, self.call_scale)
        fused = fused or {}
        updates: dict[Target, list[tuple[Update, float]]] = {}
        for name, weights in active.items():
            for update in self.adapters[name]:
                part = update.target.part
                if weight := weights[part] * (1.0 if part in fused.get(name, ()) else call_scale):
                    updates.setdefault(update.target, []).append((update, weight))
        try:
            for target in self._dirty - updates.keys():
                self._restore(target)
            for target, weighted in updates.items():
                self._write(target, weighted, check_finite)
        except BaseException:  # never leave weights half merged: the base everywhere, no adapter active
            for target in self._dirty | updates.keys():
                self._restore(target)
            self._dirty, self.active, self.fused, self.call_scale = set(), {}, {}, 1.0
            if rollback:
                self._merge(*previous, rollback=False)
            raise
        self._dirty, self.active, self.fused, self.call_scale = set(updates), active, fused, call_scale

    def _write(self, target: Target, weighted: list[tuple[Update, float]], check_finite: bool = False) -> None:
        weights = self.parts[target.part].weights
        tensor = weights[target.tensor]
        if target.scale is None:
            # copied in its own dtype and widened on the device (a copy that converts would convert on the host);
            # a copy, never the base itself, even where both are on the CPU
            merged = self._base[target.part, target.tensor].to(tensor.device, non_blocking=True, copy=True).float()
            for update, weight in weighted:
                _add(merged, update, weight)
            _check_finite(merged, target, check_finite)
            tensor.copy_(merged)
            return
        scale = weights[target.scale]
        self._restore(target)  # per-row quantization: rows no update touches now keep their base, exactly
        merged = dequantize(tensor, scale)
        for update, weight in weighted:
            _add(merged, update, weight)
        _check_finite(merged, target, check_finite)
        dtype = self.parts[target.part].dtype
        for start, stop in sorted({u.rows or (0, tensor.shape[0]) for u, _ in weighted}):
            requantize(tensor[start:stop], scale[start:stop], merged[start:stop].to(dtype))

    def _restore(self, target: Target) -> None:
        for name in _tensors(target):
            self.parts[target.part].weights[name].copy_(self._base[target.part, name], non_blocking=True)


def _tensors(target: Target) -> list[str]:
    return [target.tensor] if target.scale is None else [target.tensor, target.scale]


def _rows(tensor: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    return tensor if rows is None else tensor[rows[0] : rows[1]]


def _add(merged: torch.Tensor, update: Update, weight: float) -> None:
    view = _rows(merged, update.rows)
    view.add_(update.layer.delta().reshape(view.shape), alpha=weight)


def _check_finite(merged: torch.Tensor, target: Target, check: bool) -> None:
    if check and not bool(torch.isfinite(merged).all()):
        raise FastDiffError(
            f"fusing gives NaN or infinite weights in {target.part} {target.tensor}",
            "fuse at a smaller lora_scale or adapter weight, or check the LoRA file",
        )


def _fits(layer: tuple[int, ...], weight: torch.Size) -> bool:
    """Same shape, or a 1x1 convolution's update for the linear that conv1x1_to_linear made of it."""
    return tuple(layer) == tuple(weight) or (
        len(layer) == 4 and layer[2:] == (1, 1) and tuple(layer[:2]) == tuple(weight)
    )


def _weight(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise FastDiffError(f"{what} must be a finite number, got {value!r}", "e.g. 1.0")
    return float(value)


def locate(
    weights: Mapping[str, torch.Tensor], prefix: str, module: str, text_encoder: bool = False
) -> tuple[str, str | None, tuple[int, int] | None] | None:
    """(tensor, scale tensor or None, rows or None) that a LoRA layer of `module` updates in a part's bound weights,
    after the export passes; None if there is none. A text encoder's LoRA may name its layers with transformers'
    `text_model.` or without (transformers 5 dropped it from CLIPTextModel); the artifact has one of them."""
    spellings = [module]
    if text_encoder:
        spellings += [module.removeprefix("text_model."), f"text_model.{module}"]
    for spelling in dict.fromkeys(spellings):
        name = prefix + spelling
        for base in (name, f"{name}.linear"):  # the module, or the linear conv1x1_to_linear made of it
            if found := _stored(weights, base):
                return (*found, None)
        parent, _, leaf = name.rpartition(".")
        for fused, members in FUSED.items():
            if leaf in members and (found := _stored(weights, f"{parent}.{fused}")):
                size, remainder = divmod(weights[found[0]].shape[0], len(members))
                if remainder:
                    return None
                i = members.index(leaf)
                return (*found, (i * size, (i + 1) * size))
    return None


def _stored(weights: Mapping[str, torch.Tensor], module: str) -> tuple[str, str | None] | None:
    if f"{module}.weight" in weights:
        return f"{module}.weight", None
    if f"{module}.{QDATA}" in weights and f"{module}.{SCALE}" in weights:
        return f"{module}.{QDATA}", f"{module}.{SCALE}"
    return None


_shared_lock = threading.Lock()


def shared_adapters(pipe: Any) -> LoraAdapters:
    """The adapters of the pipeline's bound weights, the same object for every pipeline that shares them. The UNet's
    weights hold it: merged adapters and their pristine copies live exactly as long as the weights they changed."""
    manifest = pipe.manifest
    unet_weights = bound_weights(next(iter(pipe.unets.values())))
    with _shared_lock:
        adapters = getattr(unet_weights, "lora_adapters", None)
        if adapters is None:
            # a proxy: the weights hold their adapters, and a reference back would keep both alive past the last
            # pipeline, until the cyclic garbage collector happened to run (gigabytes of device and pinned memory)
            parts = {"unet": Part(weakref.proxy(unet_weights), torch_dtype(manifest.unet.dtype))}
            names = [encoder for _, encoder in TEXT_PARTS[manifest.model.family]]
            if manifest.text_encoders:  # compiled ones: their packages bind weights
                compiled = zip(names, manifest.text_encoders, pipe.conditioner.encoders, strict=True)
                for name, component, encoder in compiled:
                    parts[name] = Part(bound_weights(encoder), torch_dtype(component.dtype))
            stock = [name for name in names if name not in parts]
            adapters = unet_weights.lora_adapters = LoraAdapters(parts, stock, manifest.model.family, pipe.device)
    return adapters
