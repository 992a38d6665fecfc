"""Reading a LoRA as diffusers' `load_lora_weights` reads it: one low-rank update per layer of each part of the model
(`unet`, `text_encoder`, `text_encoder_2`), named as diffusers names the layers, with PEFT's scaling.

The conversions are diffusers' own functions (kohya/A1111 `lora_unet_*` keys, SDXL's original SGM block layout,
older diffusers keys, all to PEFT's), imported when a LoRA is read. Not `lora_state_dict` itself: its module imports
peft, transformers and diffusers' model code (2.7 s, and torchao where it is installed), none of which the runtime
needs; the few lines of it that choose a conversion are mirrored here, and tests/test_lora.py checks them against it.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .errors import FastDiffError

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE, what save_lora_weights writes
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY: the LoraConfig of each part, as JSON
KOHYA_PREFIXES = ("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")
# The parts of each family that diffusers loads LoRA layers into (its pipelines' _lora_loadable_modules). PixArt-α's
# pipeline loads none.
PARTS = {"sdxl": ("unet", "text_encoder", "text_encoder_2"), "sd": ("unet", "text_encoder")}
_LAYER_KEY = re.compile(r"^(.+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class LoraLayer:
    """One layer's low-rank update: weight += scaling * up @ down (for a convolution, over its flattened kernel)."""

    down: torch.Tensor  # lora_A: (rank, in) for a linear, (rank, in, kh, kw) for a convolution
    up: torch.Tensor  # lora_B: (out, rank), or (out, rank, 1, 1)
    scaling: float  # lora_alpha / rank (lora_alpha / sqrt(rank) with rsLoRA), as PEFT scales it

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight it updates."""
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self) -> torch.Tensor:
        """The update at adapter weight 1, in float32."""
        return (self.up.flatten(1).float() @ self.down.flatten(1).float()).mul_(self.scaling).view(self.shape)

    def to(self, device: torch.device) -> LoraLayer:
        return LoraLayer(self.down.to(device), self.up.to(device), self.scaling)


Lora = dict[str, dict[str, LoraLayer]]  # part -> module name -> its update


def read_lora(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    family: str,
    layers_per_block: int,
    weight_name: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
) -> Lora:
    """A LoRA file (or a folder holding one, a hub id, or a state dict) as `family`'s diffusers pipeline loads it.
    `layers_per_block` is the UNet's, which SDXL's SGM-layout conversion needs. Raises FastDiffError."""
    if family not in PARTS:
        raise FastDiffError(
            f"this is a {family} artifact, and diffusers loads no LoRA into a {family} pipeline",
            "LoRAs load into SDXL and Stable Diffusion 1.x artifacts",
        )
    state_dict, metadata = fetch(source, weight_name, subfolder, revision)
    state_dict, network_alphas = normalise(state_dict, family, layers_per_block)
    return split_parts(state_dict, network_alphas, metadata, family)


def fetch(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    weight_name: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The LoRA's tensors and diffusers' adapter metadata (None if it has none), from a state dict, a file, a folder
    (its `weight_name`, else pytorch_lora_weights.safetensors, else its one .safetensors file) or a hub id."""
    if isinstance(source, Mapping):
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in source.items()):
            raise FastDiffError("a LoRA state dict maps names to tensors", "pass a dict of str -> torch.Tensor")
        return dict(source), None
    if not isinstance(source, str | os.PathLike):
        raise FastDiffError(f"a LoRA is a path, a hub id or a state dict, not {type(source).__name__}")
    path = Path(source).expanduser() / (subfolder or "")
    if path.is_dir():
        return read_file(_file_in(path, weight_name))
    if path.exists():
        return read_file(path)
    if _looks_like_path(os.fspath(source)):
        raise FastDiffError(f"LoRA file {path} does not exist", "check the path")
    return read_file(_download(os.fspath(source), weight_name, subfolder, revision))


def _looks_like_path(text: str) -> bool:
    """A hub id is OWNER/NAME: anything else (an absolute or relative path, a file name) names a local file."""
    suffix = Path(text).suffix.lower()
    return os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") != 1 or suffix in SUFFIXES


SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _file_in(folder: Path, weight_name: str | None) -> Path:
    if weight_name is not None:
        if not (folder / weight_name).is_file():
            raise FastDiffError(f"{folder} has no LoRA file {weight_name}", "check weight_name")
        return folder / weight_name
    if (folder / LORA_FILE).is_file():
        return folder / LORA_FILE
    found = sorted(folder.glob("*.safetensors"))
    if len(found) != 1:
        raise FastDiffError(
            f"{folder} holds {len(found)} .safetensors files and no {LORA_FILE}",
            "name the LoRA file: load_lora_weights(folder, weight_name=...)",
        )
    return found[0]


def _download(repo_id: str, weight_name: str | None, subfolder: str | None, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        name = weight_name or _hub_file_name(repo_id, subfolder, revision)
        return Path(hf_hub_download(repo_id, name, subfolder=subfolder, revision=revision))
    except FastDiffError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FastDiffError(
            f"cannot fetch LoRA {repo_id} from the Hugging Face hub: {first}",
            "check the path or hub id (and weight_name); without network a hub LoRA must already be in the cache",
        ) from None


def _hub_file_name(repo_id: str, subfolder: str | None, revision: str | None) -> str:
    """As diffusers guesses a hub LoRA's file: pytorch_lora_weights.safetensors, else the repository's one
    .safetensors file (in `subfolder`); where the repository cannot be listed (offline), the former."""
    from huggingface_hub import list_repo_files

    try:
        files = list_repo_files(repo_id, revision=revision)
    except Exception:
        return LORA_FILE  # the download then says what is wrong, or finds the file in the cache
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    found = sorted(
        name
        for f in files
        if f.startswith(prefix) and (name := f.removeprefix(prefix)).endswith(".safetensors") and "/" not in name
    )
    if LORA_FILE in found or not found:
        return LORA_FILE
    if len(found) > 1:
        raise FastDiffError(
            f"hub LoRA {repo_id} holds {len(found)} .safetensors files ({', '.join(found[:4])}) and no {LORA_FILE}",
            "name the LoRA file: load_lora_weights(hub_id, weight_name=...)",
        )
    return found[0]


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A LoRA file's tensors (safetensors, or a pickled state dict read without running code) and metadata."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
                header = f.metadata() or {}
            metadata = json.loads(header[METADATA_KEY]) if header.get(METADATA_KEY) else None
            return tensors, metadata
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FastDiffError(f"cannot read LoRA file {path}: {e}", "the file is damaged, or not a LoRA") from None
    if not isinstance(state, dict):
        raise FastDiffError(f"{path} holds a {type(state).__name__}, not a state dict", "pass a LoRA file")
    return state, None


def normalise(
    state_dict: dict[str, torch.Tensor], family: str, layers_per_block: int
) -> tuple[dict[str, torch.Tensor], dict[str, float] | None]:
    """(state dict in diffusers' keys, kohya's network alphas or None), as diffusers' lora_state_dict makes them."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    if any("dora_scale" in key for key in state_dict):
        log.warning("the LoRA's DoRA scales are dropped, as diffusers drops them")
        state_dict = {k: v for k, v in state_dict.items() if "dora_scale" not in k}
    network_alphas = None
    if state_dict and all(key.startswith(KOHYA_PREFIXES) for key in state_dict):
        if family == "sdxl":  # diffusers passes the UNet's config (SDXL's pipeline only) to remap SGM block numbers
            config = SimpleNamespace(layers_per_block=layers_per_block)
            state_dict = _maybe_map_sgm_blocks_to_diffusers(state_dict, config)
        try:
            state_dict, network_alphas = _convert_non_diffusers_lora_to_diffusers(state_dict)
        except (ValueError, KeyError) as e:
            raise FastDiffError(f"cannot convert the kohya LoRA: {e}", "load a LoRA for this model's family") from None
    if not state_dict:
        raise FastDiffError("the LoRA holds no tensors", "pass a LoRA file")
    if not_lora := next((key for key in state_dict if "lora" not in key), None):
        raise FastDiffError(f"not a LoRA: its tensor {not_lora!r} is no LoRA layer's", "pass a LoRA file")
    return state_dict, network_alphas


def split_parts(
    state_dict: dict[str, torch.Tensor],
    network_alphas: dict[str, float] | None,
    metadata: dict[str, Any] | None,
    family: str,
) -> Lora:
    """The layers of each part, in PEFT's module names, converted as diffusers' load_lora_into_unet and
    load_lora_into_text_encoder convert them."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if metadata is not None and not isinstance(metadata, dict):
        raise FastDiffError(
            f"the LoRA's adapter metadata is a {type(metadata).__name__}, not the object diffusers writes",
            "the LoRA is damaged",
        )
    by_part: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        part, _, name = key.partition(".")
        if part not in PARTS[family]:
            raise FastDiffError(
                f"LoRA tensor {key!r} belongs to no part of a {family} model ({', '.join(PARTS[family])})",
                f"load a LoRA made for this model's architecture ({family})",
            )
        by_part.setdefault(part, {})[name] = tensor
    lora = {}
    for part, tensors in by_part.items():
        try:
            if part == "unet":
                peft = tensors if "lora_A" in next(iter(tensors)) else convert_unet_state_dict_to_peft(tensors)
            else:
                peft = convert_state_dict_to_peft(convert_state_dict_to_diffusers(tensors))
        except ValueError as e:
            raise FastDiffError(
                f"cannot convert the LoRA's {part} layers: {e}", "pass a LoRA diffusers loads"
            ) from None
        alphas = _part_alphas(network_alphas, part)
        config = {k.removeprefix(f"{part}."): v for k, v in (metadata or {}).items() if k.startswith(f"{part}.")}
        lora[part] = _layers(peft, part, alphas, config or None)
    return lora


def _part_alphas(network_alphas: dict[str, float] | None, part: str) -> dict[str, float]:
    """Kohya's alphas of one part by module name (diffusers keys them `<part>.<module>.alpha`, a text encoder's
    `<part>.<module>.lora_linear_layer.down.weight.alpha`)."""
    alphas = {}
    for key, alpha in (network_alphas or {}).items():
        if key.startswith(f"{part}."):
            name = key.removeprefix(f"{part}.").removesuffix(".alpha")
            alphas[re.sub(r"\.(lora_linear_layer|lora)\.down\.weight$", "", name)] = float(alpha)
    return alphas


def _layers(
    tensors: dict[str, torch.Tensor], part: str, alphas: dict[str, float], config: dict[str, Any] | None
) -> dict[str, LoraLayer]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            raise FastDiffError(
                f"LoRA tensor {part}.{key} is {_kind(key)}, which fastdiff does not merge",
                "load a plain LoRA (lora_A and lora_B factors per layer)",
            )
        pairs.setdefault(match[1], {})[match[2]] = tensor
    common_alpha = collections.Counter(alphas.values()).most_common(1)[0][0] if alphas else None
    layers = {}
    for module, factors in pairs.items():
        # a linear's factors are matrices; a conv's are a kernel (A) and a 1x1 conv (B), as PEFT makes them
        shapes_fit = set(factors) == {"A", "B"} and all(f.dim() in (2, 4) for f in factors.values())
        if shapes_fit:
            down, up = factors["A"], factors["B"]
            shapes_fit = down.dim() == up.dim() and up.shape[2:] in ((), (1, 1)) and down.shape[0] == up.shape[1]
        if not shapes_fit:
            raise FastDiffError(
                f"LoRA layer {part}.{module} lacks one of its two factors, or their shapes or ranks do not fit",
                "the LoRA is damaged",
            )
        rank = factors["A"].shape[0]
        if config is not None:  # diffusers' adapter metadata: the LoraConfig the LoRA was made with
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank), part)
            scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        elif alphas:  # kohya's: a module's own alpha, else the most common one (diffusers' LoraConfig.lora_alpha)
            scaling = alphas.get(module, common_alpha) / rank
        else:  # diffusers' default: alpha = rank
            scaling = 1.0
        layers[module] = LoraLayer(down=factors["A"], up=factors["B"], scaling=float(scaling))
    return layers


def _kind(key: str) -> str:
    """What a tensor of a LoRA variant is, for the refusal."""
    if "lora_magnitude_vector" in key:
        return "a DoRA magnitude"
    if ".lora_B." in key:
        return "a LoRA bias"
    if ".lokr_" in key:
        return "a LoKr factor"
    return "not a LoRA factor"


def _pattern_value(patterns: Any, module: str, default: Any, part: str) -> float:
    """PEFT's get_pattern_key: the first pattern that matches the module name at a module boundary. Refused: metadata
    that is not what PEFT writes (a pattern that is no regular expression, an alpha that is no number)."""
    try:
        value = next((v for pattern, v in patterns.items() if re.match(rf"(.*\.)?({pattern})$", module)), default)
    except (AttributeError, TypeError, re.error) as e:
        raise FastDiffError(f"the LoRA's metadata for {part} is malformed ({e})", "the LoRA is damaged") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FastDiffError(f"the LoRA's metadata for {part} gives alpha {value!r:.40}", "the LoRA is damaged")
    return value
