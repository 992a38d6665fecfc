"""The artifact format, the one module the exporter and the runtime share: the manifest's schema (reading, writing,
checking, file hashes), resolutions and their keys, the files' layout in an artifact folder, how weights are stored,
what the denoiser's conditioning inputs hold, the device record, and the errors both report.

Imports no torch at module level (readahead and the command-line tools read manifests before torch is imported);
functions that need torch import it when called.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import sys
import types
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FastDiffError, clean_errors, exit_interrupted, import_torch, raise_if_stopped

if TYPE_CHECKING:
    import torch

__all__ = [  # the names the exporter uses besides the manifest's own
    "FastDiffError",
    "clean_errors",
    "exit_interrupted",
    "import_torch",
    "raise_if_stopped",
]

# Resolutions ----------------------------------------------------------------------------------------------------
MIN_SIDE = 64
MAX_SIDE = 4096


@dataclass(frozen=True, order=True)
class Resolution:
    width: int
    height: int

    @property
    def key(self) -> str:
        return f"{self.width}x{self.height}"

    def __str__(self) -> str:
        return self.key


def parse_resolution(text: str | int | Resolution, multiple_of: int = 8) -> Resolution:
    """Parse "1024" (square) or "WxH" (width x height), checking that each side is sane."""
    if isinstance(text, Resolution):
        res = text
    else:
        parts = str(text).strip().lower().split("x")
        try:
            sides = [int(p) for p in parts]
        except ValueError:
            sides = []
        if len(sides) not in (1, 2):
            raise FastDiffError(
                f"invalid resolution {text!r}",
                "give one number for a square image (1024) or WIDTHxHEIGHT (832x1216)",
            )
        res = Resolution(sides[0], sides[-1])
    for side in (res.width, res.height):  # range first, so the rounding hint below is always a valid size
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise FastDiffError(
                f"invalid resolution {res}: sides must be between {MIN_SIDE} and {MAX_SIDE} pixels",
                "pick a resolution the model was trained for, e.g. 1024 for SDXL",
            )
    for side in (res.width, res.height):
        if side % multiple_of:
            raise FastDiffError(
                f"invalid resolution {res}: {side} is not a multiple of {multiple_of}",
                f"round each side to a multiple of {multiple_of}, e.g. {max(side // multiple_of, 1) * multiple_of}",
            )
    return res


# The manifest ------------------------------------------------------------------------------------------------

FORMAT = "fastdiff-artifact"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

# The artifact's dtype names. The module imports no torch (readahead reads manifests before torch is imported).
DTYPES = ("fp32", "fp16", "bf16")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for an artifact dtype name (fp32, fp16, bf16)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name in DTYPES if torch_dtype(name) == dtype)


# safetensors' dtype names -> torch's (https://github.com/huggingface/safetensors, "Format"): the weights files'
# reader and --packages-from's checks
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


# Each family's text parts: (tokenizer folder, text encoder name), in the order their hidden states are concatenated.
TEXT_PARTS = {
    "sdxl": [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")],
    "sd": [("tokenizer", "text_encoder")],
    "pixart": [("tokenizer", "text_encoder")],
}
# Families whose pipeline conditions on the CLIP encoders' penultimate hidden states (SDXL); SD 1.x takes the final.
PENULTIMATE_CLIP_FAMILIES = frozenset({"sdxl"})


@dataclass
class ModelFacts:
    """What the runtime needs from the model configs, so it needs no diffusers model code, and for the record what
    the compiled packages have built in (scaling_factor, latents_mean and latents_std in the VAE decoder, pooled_dim
    and the time_ids layout in the UNet), which the runtime does not read."""

    # A key of TEXT_PARTS: "sdxl" (StableDiffusionXLPipeline), "sd" (StableDiffusionPipeline) or "pixart"
    # (PixArtAlphaPipeline, whose denoiser, a transformer, is the manifest's `unet` component).
    family: str
    latent_channels: int
    vae_scale_factor: int
    scaling_factor: float
    text_max_length: int
    pooled_dim: int | None  # SDXL: the pooled text embedding the UNet takes; None for SD 1.x
    time_ids: list[str] | None  # SDXL: the layout of the micro-conditioning vector; None for SD 1.x
    force_zeros_for_empty_prompt: bool
    default_resolution: list[int]  # [width, height]
    default_guidance_scale: float
    latents_mean: list[float] | None = None
    latents_std: list[float] | None = None
    lowercase_prompts: bool = False  # PixArt-α's pipeline lowercases and strips prompts before tokenizing

    def latent_shape(self, res: Resolution) -> tuple[int, int, int]:
        """One image's latents at `res`: channels, height, width."""
        f = self.vae_scale_factor
        return self.latent_channels, res.height // f, res.width // f


@dataclass
class CompiledComponent:
    """A compiled component: one package per case (a resolution "WxH", or a text length), all binding one weight
    file; the batch dimension is dynamic up to max_batch."""

    dtype: str
    weights: str  # relative path of the safetensors file
    inputs: list[str]
    max_batch: int
    packages: dict[str, str]  # case key ("WxH", or the token count for text encoders) -> relative .pt2 path
    # Weights whose compiled code expects channels_last strides are stored physically NHWC (see runtime.weights).
    channels_last: list[str] = field(default_factory=list)
    # What each package was exported with: per case key, each input's shape (None: the batch, 1 to max_batch), and
    # each input's torch dtype name (float32, int64...). The runtime checks the model facts and every call against
    # them (a call that does not fit would make the compiled code read out of bounds). Empty in artifacts from before.
    input_shapes: dict[str, list[list[int | None]]] = field(default_factory=dict)
    input_dtypes: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    source: dict[str, Any]
    dtype: str
    batch_size: int
    options: dict[str, Any]
    device: dict[str, Any]  # type, name, capability, cpu_isa
    versions: dict[str, Any]  # torch, cuda, triton, diffusers, transformers, fastdiff
    model: ModelFacts
    unet: CompiledComponent
    vae_decoder: CompiledComponent
    # tokenizer, tokenizer_2, scheduler, and text_encoder, text_encoder_2 when those are not compiled -> folder
    stock: dict[str, str]
    text_encoders: list[CompiledComponent] = field(default_factory=list)  # compiled, in conditioning order
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # relative path -> {size, sha256}
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    created: str = ""

    @property
    def resolutions(self) -> list[Resolution]:
        return sorted(parse_resolution(k) for k in self.unet.packages)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    def write(self, root: Path) -> Path:
        path = Path(root) / MANIFEST_NAME
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        data["model"] = ModelFacts(**data["model"])
        data["unet"] = CompiledComponent(**data["unet"])
        data["vae_decoder"] = CompiledComponent(**data["vae_decoder"])
        data["text_encoders"] = [CompiledComponent(**c) for c in data.get("text_encoders", [])]
        return cls(**data)


def is_artifact(root: Path) -> bool:
    """Whether `root` holds a fastdiff manifest (of any version, valid or damaged otherwise): what --overwrite may
    replace. Other projects name files manifest.json too."""
    try:
        data = json.loads((Path(root) / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def read_manifest(root: str | Path) -> Manifest:
    """Read and validate `root/manifest.json`, raising FastDiffError with a fix for every way it can be wrong."""
    return parse_manifest(read_manifest_bytes(root), Path(root) / MANIFEST_NAME)


def read_manifest_bytes(root: str | Path, dir_fd: int | None = None) -> bytes:
    """The bytes of `root/manifest.json` (through the open folder `dir_fd` if given), checked to be there."""
    root = Path(root)
    if dir_fd is None:
        if not root.exists():
            raise FastDiffError(
                f"artifact folder {root} does not exist", "check the path, or create it with fastdiff-export"
            )
        if not root.is_dir():
            raise FastDiffError(f"{root} is not a folder", "pass the artifact folder that holds manifest.json")
    try:
        # O_NONBLOCK: a FIFO named manifest.json is refused below instead of blocking the open
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(MANIFEST_NAME if dir_fd is not None else root / MANIFEST_NAME, flags, dir_fd=dir_fd)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        fd = None
    if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd is not None:
            os.close(fd)
        raise FastDiffError(
            f"{root} is not a fastdiff artifact: {MANIFEST_NAME} is missing",
            "pass a folder written by fastdiff-export, or export the model again",
        )
    with os.fdopen(fd, "rb") as f:
        return f.read(MAX_MANIFEST_BYTES + 1)


MAX_MANIFEST_BYTES = 16 << 20  # a manifest lists a few dozen files: anything this large is not one


def manifest_digest(data: bytes) -> str:
    """An artifact's digest: the sha256 of its manifest's bytes. The manifest holds every file's sha256, so the
    digest names the artifact's exact contents: pin it where artifacts are deployed."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def artifact_digest(root: str | Path) -> str:
    """The digest (manifest_digest) of the artifact at `root`."""
    return manifest_digest(read_manifest_bytes(root))


DIGEST_FORMAT = re.compile(r"sha256:[0-9a-f]{64}")


def check_digest_format(digest: str) -> str:
    """`digest` if it has an artifact digest's form (sha256:<64 hex digits>), else FastDiffError."""
    if not isinstance(digest, str) or not DIGEST_FORMAT.fullmatch(digest):
        raise FastDiffError(
            f"{digest!r:.80} is not an artifact digest", "give it as fastdiff-inspect prints it: sha256:<64 hex digits>"
        )
    return digest


def parse_manifest(data: bytes, path: Path) -> Manifest:
    """The manifest in `data` (the bytes of the file at `path`, named in errors), validated."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise FastDiffError(f"{path} is larger than a manifest can be", "the artifact is damaged: export it again")
    try:
        parsed = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FastDiffError(f"{path} is not valid JSON ({e})", "the artifact is damaged: export it again") from None
    if not isinstance(parsed, dict) or parsed.get("format") != FORMAT:
        raise FastDiffError(f"{path} is not a fastdiff manifest", "export the model again with fastdiff-export")
    version = parsed.get("format_version")
    if not isinstance(version, int):
        raise FastDiffError(f"{path} has no valid format_version", "the artifact is damaged: export it again")
    if version > FORMAT_VERSION:
        raise FastDiffError(
            f"{path.parent} uses artifact format v{version}, newer than this fastdiff reads (v{FORMAT_VERSION})",
            "upgrade fastdiff, or export the model with this version",
        )
    try:
        manifest = Manifest.from_dict(parsed)
    except KeyError as e:
        raise FastDiffError(f"{path} is incomplete: key {e} is missing", "export the model again") from None
    except (TypeError, ValueError, FastDiffError) as e:
        raise FastDiffError(f"{path} is incomplete or malformed ({e})", "export the model again") from None
    _check_consistency(manifest, path)
    return manifest


def is_relative_inside(rel: str) -> bool:
    """Whether `rel` is a normalised relative POSIX path that stays inside the folder it is relative to: a manifest
    must not send a load elsewhere ("../x", "/etc/x", "a/./b", "a//b", "a\\b")."""
    parts = rel.split("/")
    return bool(rel) and "\\" not in rel and "\0" not in rel and all(p not in ("", ".", "..") for p in parts)


def _check_structure(manifest: Manifest) -> list[str]:
    """Every field of the declared type, and the nested fields the runtime indexes directly, so that a damaged
    manifest fails here, not with a KeyError or TypeError later."""
    problems = _type_problems(manifest, "")
    if problems:
        return problems
    if not isinstance(manifest.device.get("type"), str):
        problems.append("device.type is missing")
    if not isinstance(manifest.versions.get("torch"), str):
        problems.append("versions.torch is missing")
    if isinstance(manifest.batch_size, bool) or not isinstance(manifest.batch_size, int) or manifest.batch_size < 1:
        problems.append(f"batch_size {manifest.batch_size!r} is not a positive integer")
    if manifest.model.family not in TEXT_PARTS:
        problems.append(f"unknown model family {manifest.model.family!r}")
        return problems
    parts = TEXT_PARTS[manifest.model.family]
    if manifest.text_encoders and len(manifest.text_encoders) != len(parts):
        problems.append(
            f"text_encoders lists {len(manifest.text_encoders)}; a {manifest.model.family} model has {len(parts)}"
        )
    needed = ["scheduler"]
    for tokenizer, encoder in parts:
        needed += [tokenizer] if manifest.text_encoders else [tokenizer, encoder]
    missing = [name for name in needed if not isinstance(manifest.stock.get(name), str)]
    if missing:
        problems.append(f"stock lacks {', '.join(missing)}")
    for rel, entry in manifest.files.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or "sha256" not in entry:
            problems.append(f"files entry {rel} lacks its size or sha256")
            break
    for name, comp in _named_components(manifest):
        if comp.dtype not in DTYPES:
            problems.append(f"{name}.dtype {comp.dtype!r} is not one of {', '.join(DTYPES)}")
    width_height = manifest.model.default_resolution
    if len(width_height) != 2 or min(width_height) < 1:
        problems.append(f"model.default_resolution {width_height} is not [width, height]")
    return problems + _meaning_problems(manifest)


def _meaning_problems(manifest: Manifest) -> list[str]:
    """Numbers that have their types but not a meaning the runtime can use, and paths that leave the folder."""
    problems = []
    model = manifest.model
    for name in ("latent_channels", "text_max_length"):
        if getattr(model, name) < 1:
            problems.append(f"model.{name} {getattr(model, name)} is not positive")
    factor = model.vae_scale_factor
    if factor < 1 or factor & (factor - 1):
        problems.append(f"model.vae_scale_factor {factor} is not a power of two")
    if model.pooled_dim is not None and model.pooled_dim < 1:
        problems.append(f"model.pooled_dim {model.pooled_dim} is not positive")
    for name in ("scaling_factor", "default_guidance_scale"):
        if not math.isfinite(getattr(model, name)):
            problems.append(f"model.{name} is not a finite number")
    n = manifest.batch_size
    expected_batch = {"unet": 2 * n, "vae_decoder": n} | {
        f"text_encoders[{i}]": n for i in range(len(manifest.text_encoders))
    }
    for name, comp in _named_components(manifest):
        if comp.max_batch != expected_batch[name]:
            problems.append(
                f"{name}.max_batch {comp.max_batch} does not fit batch_size {n} (expected {expected_batch[name]})"
            )
    paths = [*manifest.files, *manifest.stock.values(), *_referenced_files(manifest)]
    outside = [rel for rel in paths if not is_relative_inside(rel)]
    if outside:
        problems.append(f"path {outside[0]!r} leaves the artifact folder")
    return problems


INPUT_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")  # what packages are exported to take
TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # without importing torch


def _input_problems(name: str, comp: CompiledComponent, manifest: Manifest) -> list[str]:
    """A component's recorded inputs, well formed and agreeing with the model facts that the runtime makes its inputs
    from (the latents' shape, the text length, the pooled width, the time ids, the dtypes)."""
    if not comp.input_shapes and not comp.input_dtypes:
        return []  # exported before fastdiff recorded them
    if set(comp.input_shapes) != set(comp.packages):
        listed, packages = ", ".join(sorted(comp.input_shapes)), ", ".join(sorted(comp.packages))
        return [f"{name}.input_shapes lists {listed or 'none'}; its packages are {packages}"]
    if len(comp.input_dtypes) != len(comp.inputs):
        return [f"{name} records {len(comp.input_dtypes)} input dtypes for its {len(comp.inputs)} inputs"]
    if not set(comp.input_dtypes) <= set(INPUT_DTYPES):
        return [f"{name}.input_dtypes are not each one of {', '.join(INPUT_DTYPES)}"]
    model = manifest.model
    for key, shapes in comp.input_shapes.items():
        if len(shapes) != len(comp.inputs) or not all(_is_shape(shape) for shape in shapes):
            return [f"{name}.input_shapes[{key!r}] is not a shape per input"]
        facts = {"text_embeds": [model.pooled_dim], "time_ids": [len(model.time_ids or ())]}
        if name in ("unet", "vae_decoder"):
            res = parse_resolution(key)
            facts |= {"sample": list(model.latent_shape(res)), "latents": list(model.latent_shape(res))}
        else:
            facts |= {"input_ids": [model.text_max_length], "attention_mask": [model.text_max_length]}
        for input_name, shape in zip(comp.inputs, shapes, strict=True):
            if input_name in facts and shape[1:] != facts[input_name]:
                return [
                    f"{name}'s package for {key} takes {input_name} of shape {shape[1:]} per row; the model facts "
                    f"make it {facts[input_name]}"
                ]
    first = {"unet": manifest.dtype, "vae_decoder": comp.dtype}.get(name)
    if first is not None and comp.input_dtypes[0] != TORCH_DTYPE_NAMES[first]:
        return [f"{name} takes {comp.input_dtypes[0]} {comp.inputs[0]}; the manifest's dtype makes them {first}"]
    return []


def _is_shape(shape: Any) -> bool:
    """A list of positive sizes, the first of which may be None (the batch)."""
    return isinstance(shape, list) and all(
        (isinstance(size, int) and not isinstance(size, bool) and size >= 1) or (size is None and i == 0)
        for i, size in enumerate(shape)
    )


def _type_problems(record: Any, prefix: str) -> list[str]:
    """Fields of a manifest dataclass whose values do not have their annotated types, nested dataclasses included."""
    problems = []
    hints = typing.get_type_hints(type(record))
    for f in fields(record):
        value, name = getattr(record, f.name), prefix + f.name
        if not _has_type(value, hints[f.name]):
            problems.append(f"{name} is not {_described(hints[f.name])}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if hasattr(item, "__dataclass_fields__"):
                    problems += _type_problems(item, f"{name}[{i}].")
        elif hasattr(value, "__dataclass_fields__"):
            problems += _type_problems(value, name + ".")
    return problems


def _has_type(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _has_type(k, args[0]) and _has_type(v, args[1]) for k, v in value.items()
        )
    if hint is float:  # JSON writes 5.0 as 5.0, but a hand-edited 5 is a number too
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _described(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_described(arg) for arg in args)
    if origin is list:
        return f"a list of {_described(args[0]).split(' ', 1)[1]}s"
    names = {dict: "an object", int: "an integer", float: "a number", str: "a string", bool: "a boolean"}
    names |= {type(None): "null"}
    return names.get(origin or hint, f"a {getattr(hint, '__name__', hint)}")


def _check_consistency(manifest: Manifest, path: Path) -> None:
    problems = _check_structure(manifest)
    if problems:
        raise FastDiffError(f"{path} is inconsistent: {'; '.join(problems)}", "export the model again")
    if manifest.dtype not in DTYPES:
        problems.append(f"unknown dtype {manifest.dtype!r}")
    if not manifest.unet.packages:
        problems.append("no UNet packages")
    if set(manifest.unet.packages) != set(manifest.vae_decoder.packages):
        problems.append("UNet and VAE decoder resolutions differ")
    for rel in _referenced_files(manifest):
        if rel not in manifest.files:
            problems.append(f"{rel} is not listed under files")
    for key in manifest.unet.packages:
        try:
            parse_resolution(key)
        except FastDiffError as e:
            problems.append(f"package {key!r}: {e.problem}")
    if not problems:  # every fact means something now: the inputs they make can be checked
        for name, comp in _named_components(manifest):
            problems += _input_problems(name, comp, manifest)
    if problems:
        raise FastDiffError(f"{path} is inconsistent: {'; '.join(problems)}", "export the model again")


def _named_components(manifest: Manifest) -> list[tuple[str, CompiledComponent]]:
    encoders = [(f"text_encoders[{i}]", c) for i, c in enumerate(manifest.text_encoders)]
    return [("unet", manifest.unet), ("vae_decoder", manifest.vae_decoder), *encoders]


def _components(manifest: Manifest) -> list[CompiledComponent]:
    return [component for _, component in _named_components(manifest)]


def _referenced_files(manifest: Manifest) -> list[str]:
    out = []
    for comp in _components(manifest):
        out.append(comp.weights)
        out.extend(comp.packages.values())
    return out


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_files(root: Path, hash_files: bool = True) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under root except the manifest, keyed by POSIX relative path."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        entry: dict[str, Any] = {"size": path.stat().st_size}
        if hash_files:
            entry["sha256"] = sha256_file(path)
        files[path.relative_to(root).as_posix()] = entry
    return files


def confined_path(root: Path, rel: str, shown: Path | None = None) -> Path:
    """root/rel for a path a manifest lists: refused unless `rel` is normalised, relative, and resolves (links
    followed) inside `root`. `shown` names the artifact in errors (default: root)."""
    shown = shown or root
    if not is_relative_inside(rel):
        raise FastDiffError(f"artifact {shown}: path {rel!r} leaves the artifact folder", "export the model again")
    path = root / rel
    for _ in range(3):  # realpath resolves names: a folder renamed during it (an --overwrite export) is resolved again
        inside = os.path.realpath(root)
        resolved = os.path.realpath(path)
        if os.path.realpath(root) == inside:
            break
    if not resolved.startswith(inside + os.sep):
        raise FastDiffError(
            f"artifact {shown}: {rel} links to {resolved}, outside the artifact folder",
            "replace the link with the file itself, or export the model again",
        )
    return path


HASH_THREADS = 4  # hashlib lets go of the GIL: files hash in parallel, at the disk's speed rather than one core's
# Files up to this size are hashed on every check (tokenizers, configs: a few MB, milliseconds), so that what a load
# parses is what was built; packages are hashed as they are read; only weights wait for full_hash.
ALWAYS_HASHED_BYTES = 16 << 20


def _unlisted(root: Path, folder: str, files: dict[str, Any]) -> list[str]:
    """What a stock folder (read by transformers' and diffusers' from_pretrained, which pick their own files) holds
    beyond the files the manifest lists: links, and files no hash vouches for."""
    problems = []
    base = root / folder
    for dirpath, dirnames, filenames in os.walk(base):  # links are listed, not followed
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = Path(folder, os.path.relpath(path, base)).as_posix()
            if os.path.islink(path):
                problems.append(f"{rel}: a link (an artifact holds its own files)")
            elif name in filenames and rel not in files:
                problems.append(f"{rel}: not listed in the manifest")
    return problems


def check_files(root: Path, manifest: Manifest, full_hash: bool = False, shown: Path | None = None) -> list[str]:
    """Every listed file present inside `root` as a regular file of its recorded size, those up to
    ALWAYS_HASHED_BYTES (but packages) hashed, and with `full_hash` every one (files in parallel); nothing in a stock
    folder beyond its listed files. One line per problem; none: the artifact is intact."""
    problems, to_hash = [], []
    for folder in manifest.stock.values():
        problems += _unlisted(root, folder, manifest.files)
    for rel, entry in manifest.files.items():
        try:
            path = confined_path(root, rel, shown)
        except FastDiffError as e:
            problems.append(f"{rel}: {e.problem.split(': ', 1)[-1]}")
            continue
        try:
            info = os.stat(path)
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if not stat.S_ISREG(info.st_mode):
            problems.append(f"{rel}: not a regular file")
        elif info.st_size != entry["size"]:
            problems.append(f"{rel}: size {info.st_size} bytes, manifest says {entry['size']} (truncated or replaced)")
        elif full_hash or (entry["size"] <= ALWAYS_HASHED_BYTES and not rel.endswith(".pt2")):
            to_hash.append((rel, path, entry))
    with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="fastdiff-hash") as pool:
        for (rel, _, entry), digest in zip(to_hash, pool.map(lambda job: sha256_file(job[1]), to_hash), strict=True):
            if digest != entry["sha256"]:
                problems.append(f"{rel}: sha256 differs from the manifest (corrupted or replaced)")
    return problems


# The files' layout ------------------------------------------------------------------------------------------------


def package_path(component: str, case: str) -> str:
    """Where a component's package for one case (a resolution key, or a text length) lies in the artifact."""
    return f"{component}/{case}.pt2"


def weights_path(component: str) -> str:
    """Where the weights that all of a component's packages bind lie in the artifact."""
    return f"{component}/weights.safetensors"


def to_storage_layout(tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(tensor as it is written to safetensors, whether it is stored NHWC). safetensors stores dense row-major
    tensors: a weight the compiled code expects in channels_last layout is stored as its NHWC permutation (the
    runtime views it back as NCHW, which restores the strides without a copy)."""
    import torch

    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor.permute(0, 2, 3, 1).contiguous(), True
    return tensor.contiguous(), False


def _umask() -> int:
    """The process's umask, read without setting it where Linux shows it (setting it, even back, would briefly change
    the mode of files other threads create)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_mode(path: Path) -> None:
    """Files made by mkstemp, or by libraries that create them private (safetensors), are 0600: an artifact built by
    one user (a CI job) and served by another (a container's) would not load. Give them 0666 less the umask."""
    os.chmod(path, 0o666 & ~_umask())


# What the denoiser's packages take besides latents, timestep and text ---------------------------------------------


def micro_conditioning(res: Resolution, rows: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The size conditioning, as diffusers computes it; each model takes the ones its denoiser was exported with.
    SDXL: original size = target size, no crop. PixArt-α: (height, width) and height / width."""
    import torch

    return {
        "time_ids": torch.tensor([[res.height, res.width, 0, 0, res.height, res.width]] * rows, dtype=dtype),
        "resolution": torch.tensor([[res.height, res.width]] * rows, dtype=dtype),
        "aspect_ratio": torch.tensor([[res.height / res.width]] * rows, dtype=dtype),
    }


# Opening packages -------------------------------------------------------------------------------------------------

_libstdcxx_global = False


def make_libstdcxx_global() -> None:
    """Put the process's libstdc++ into the global symbol scope before the first package is opened (by the runtime,
    or by the exporter reading a package's constants).

    Python opens torch's extension with RTLD_LOCAL, so the libstdc++ it pulls in stays local to it. A package's
    wrapper.so does not list libstdc++ as a dependency, so its C++ runtime symbols (std::regex, locales) then bind
    to uninitialised copies: on the project's GPU image (torch 2.11) every package load segfaulted unless
    libstdc++ was preloaded. Promoting the already loaded library to RTLD_GLOBAL does the same from inside the
    process.
    """
    global _libstdcxx_global
    if _libstdcxx_global or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
    except OSError:
        pass  # not loaded under that name: nothing to promote
    _libstdcxx_global = True


# Devices ----------------------------------------------------------------------------------------------------------


def device_record(device: torch.device) -> dict[str, Any]:
    """What an artifact compiled for `device` depends on: the manifest's `device`."""
    import torch

    record: dict[str, Any] = {"type": device.type, "cpu_isa": torch.backends.cpu.get_cpu_capability()}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        record |= {"name": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}"}
    else:
        record |= {"name": "cpu", "capability": None}
    return record


def device_index(device: torch.device) -> int:
    """How a package names its device: the CUDA device's index (the current one for a plain "cuda"), -1 for the
    CPU."""
    import torch

    if device.type == "cpu":
        return -1
    return torch.cuda.current_device() if device.index is None else device.index


def resolve_device(device: str | torch.device | None, manifest: Manifest | None = None) -> torch.device:
    """The device to export or run on: the one asked for, else the artifact's device kind; refused if it is not
    there."""
    import torch

    asked = device is not None
    if device is None:
        device = manifest.device["type"] if manifest is not None else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise FastDiffError(f"unknown device {device!r}", "use cpu or cuda (cuda:N for another GPU)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            if asked and (manifest is None or manifest.device["type"] != "cuda"):
                raise FastDiffError(
                    f"device {device} was asked for, but no CUDA GPU is visible", "run on the cpu (--device cpu)"
                )
            raise FastDiffError(
                "this artifact was compiled for cuda, but no CUDA GPU is visible",
                "run it on a machine with a GPU of its kind, or export the model again with --device cpu",
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise FastDiffError(
                f"{dev} does not exist: {torch.cuda.device_count()} GPU(s) visible", "pick an existing cuda:N"
            )
    elif dev.type != "cpu":
        raise FastDiffError(f"device {dev.type!r} is not supported", "use cpu or cuda")
    return dev
