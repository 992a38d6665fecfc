"""`fastdiff-run` (generate images from an artifact) and `fastdiff-inspect` (summarise and verify one).

Both import torch (seconds) when they run, inside clean_errors, so that a Ctrl-C during the import ends them as one
later does; fastdiff-run starts reading the artifact from disk first (readahead.prefetch).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import click

from .errors import FastDiffError, clean_errors, import_torch, raise_if_stopped
from .folder import ArtifactFolder
from .format import Manifest, check_digest_format, parse_resolution, set_default_mode
from .readahead import prefetch

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def expected_digest_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--expect-digest's check (fastdiff-run's, fastdiff-serve's): sha256:<64 hex digits>, or a usage error."""
    if value is not None:
        try:
            check_digest_format(value.strip())
        except FastDiffError as e:
            raise click.BadParameter(
                f"{e.problem} (give sha256:<64 hex digits>, as fastdiff-inspect prints it)"
            ) from None
        return value.strip()
    return None


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def _output_paths(out: Path, count: int, overwrite: bool) -> list[Path]:
    image = out.suffix.lower() in IMAGE_SUFFIXES
    if out.is_dir() and (count == 1 or not image):  # several images go to out's siblings: NAME-0.png, ...
        raise FastDiffError(f"cannot write {out}: it is a folder", "choose an image file name for --out")
    if not image:
        raise FastDiffError(
            f"cannot write {out}: unknown image type", f"use one of {', '.join(sorted(IMAGE_SUFFIXES))}"
        )
    paths = [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]
    for path in paths:
        if path.is_dir():
            raise FastDiffError(f"cannot write {path}: it is a folder", "choose an image file name for --out")
        if os.path.lexists(path) and not overwrite:  # a link to nothing too: the image could not take its name
            raise FastDiffError(f"{path} already exists", "pass --overwrite, or choose another --out")
        parent = path.parent.absolute()
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise FastDiffError(f"cannot write {path}: {parent} is not a writable folder", "choose another --out")
    return paths


def _save_atomically(image, path: Path, overwrite: bool) -> None:
    """Write the image beside `path`, then put it there whole; without `overwrite`, only if the name is still free
    (another run may have taken it while this one generated)."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent.absolute())
        os.close(fd)
        image.save(tmp)
        set_default_mode(Path(tmp))
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(Path(tmp), path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # disk full, the folder gone or made read-only since the check, ...
            problem = f"cannot write {path}: {e.strerror or e}"
            raise FastDiffError(problem, "free space there, or choose another --out") from None
        raise


def _place_new(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path` unless `path` exists. A hard link fails on a taken name where a rename would replace it;
    where the file system has no hard links, the name is checked just before the rename."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # no hard links here (FAT, some network file systems)
        if not path.exists():
            os.replace(tmp, path)
            return
    else:
        tmp.unlink()
        return
    raise FastDiffError(
        f"{path} was created while this run generated (by another run?); it is not replaced",
        "pass --overwrite, or choose another --out",
    )


@click.command(context_settings=CONTEXT)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", required=True, help="What to draw.")
@click.option(
    "--negative-prompt",
    "-n",
    help="What to steer away from (default: none: zero conditioning for SDXL, the empty prompt for SD 1.x, PixArt-α).",
)
@click.option("--res", metavar="SIZE|WxH", help="Resolution, width x height; one of the artifact's. Default: model's.")
@click.option("--steps", default=30, show_default=True, type=click.IntRange(min=1), help="Denoising steps.")
@click.option(
    "--guidance",
    type=float,
    callback=lambda ctx, param, value: _finite(value),
    help="Classifier-free guidance; <=1 is off. Default: the family's (5.0 SDXL, 7.5 SD 1.x, 4.5 PixArt-α).",
)
@click.option(
    "--seed",
    type=click.IntRange(-(2**63), 2**64 - 1),
    help="Seed for the initial noise (default: random, printed).",
)
@click.option("--num-images", default=1, show_default=True, type=click.IntRange(min=1), help="Images to generate.")
@click.option("--device", help="cuda or cpu (default: what the artifact was compiled for).")
@click.option(
    "--out", "-o", default="image.png", show_default=True, type=click.Path(path_type=Path), help="Image file."
)
@click.option("--overwrite", is_flag=True, help="Replace existing image files.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option(
    "--expect-digest",
    metavar="sha256:HEX",
    callback=expected_digest_option,
    help="Refuse any artifact but the one with this digest (as fastdiff-inspect prints it).",
)
@clean_errors()
def run_main(
    artifact: Path,
    prompt: str,
    negative_prompt: str | None,
    res: str | None,
    steps: int,
    guidance: float,
    seed: int | None,
    num_images: int,
    device: str | None,
    out: Path,
    overwrite: bool,
    quiet: bool,
    expect_digest: str | None,
) -> None:
    """Generate images from an ARTIFACT folder written by fastdiff-export. Nothing is compiled."""
    import time

    paths = _output_paths(out, num_images, overwrite)
    size = parse_resolution(res) if res else None
    prefetch(artifact, size)
    import_torch()
    import torch

    from .loader import load_pipeline

    start = time.perf_counter()
    pipe = load_pipeline(artifact, device=device, resolutions=[size] if size else None, expected_digest=expect_digest)
    loaded = time.perf_counter()
    pipe.set_progress_bar_config(disable=quiet)
    seed = seed if seed is not None else torch.seed()
    generator = torch.Generator().manual_seed(seed)
    images = pipe(
        prompt,
        negative_prompt=negative_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=size.height if size else None,
        width=size.width if size else None,
        generator=generator,
        num_images_per_prompt=num_images,
    ).images
    done = time.perf_counter()
    raise_if_stopped()  # a Ctrl-C swallowed during the generation writes no image
    for image, path in zip(images, paths, strict=True):
        _save_atomically(image, path, overwrite)
        click.echo(f"wrote {path}", err=True)
    click.echo(f"seed {seed}, load {loaded - start:.2f} s, generate {done - loaded:.2f} s", err=True)


@click.command(context_settings=CONTEXT)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Re-hash every file against the manifest (reads everything).")
@clean_errors()
def inspect_main(artifact: Path, verify: bool) -> None:
    """Summarise an ARTIFACT folder: its digest, source, build, resolutions, files; check that it can load here (exit
    code 1 if not: a file missing, of another size or outside the folder, or with --verify another hash, or a device,
    GPU or torch it cannot run on)."""
    with ArtifactFolder(artifact) as folder:
        manifest = folder.manifest
        problems = folder.check_files(full_hash=verify)  # presence, place and sizes as a load checks them, at least
    total = sum(f["size"] for f in manifest.files.values())
    lines = [
        f"artifact      {artifact}  (format v{manifest.format_version}, created {manifest.created})",
        f"digest        {folder.digest}",
        f"source        {manifest.source.get('model')}"
        + "".join(f"  {k}={v}" for k, v in manifest.source.items() if k != "model" and v),
        f"family        {manifest.model.family}, default {'x'.join(map(str, manifest.model.default_resolution))}, "
        f"guidance {manifest.model.default_guidance_scale}",
        f"text encoders {'compiled' if manifest.text_encoders else 'stock (transformers)'}",
        f"dtype         {manifest.dtype} (VAE decoder {manifest.vae_decoder.dtype}), batch size {manifest.batch_size}",
        f"resolutions   {', '.join(map(str, manifest.resolutions))}",
        f"passes        {_passes(manifest.options)}",
        f"inductor      {manifest.options.get('inductor') or '(defaults)'}",
        *(f"  {c:<12}{configs}" for c, configs in (manifest.options.get("inductor_by_component") or {}).items()),
        f"device        {_device(manifest.device)}",
        "versions      " + ", ".join(f"{k} {v}" for k, v in manifest.versions.items() if v),
        f"files         {len(manifest.files)}, {total / 1e6:.1f} MB",
    ]
    for rel, entry in manifest.files.items():
        if rel.endswith((".pt2", ".safetensors")):
            lines.append(f"  {rel:<40} {entry['size'] / 1e6:10.1f} MB")
    damaged = f"{len(problems)} of {len(manifest.files)} files do not match the manifest" if problems else None
    incompatible = _incompatibility(manifest)
    lines.append(f"loads here    {'no: ' + (damaged or incompatible.problem) if damaged or incompatible else 'yes'}")
    click.echo("\n".join(lines))
    for problem in problems:
        click.echo(f"FAILED {problem}", err=True)
    if verify and not damaged:
        click.echo(f"verified      all {len(manifest.files)} files match their sha256")
    if damaged and incompatible:  # one error: both problems, the export that fixes both
        raise FastDiffError(f"{damaged}, and it cannot load here: {incompatible.problem}", "export the model again")
    if damaged:
        raise FastDiffError(damaged, "export the model again (the FAILED lines name each file)")
    if incompatible:
        raise FastDiffError(f"it cannot load here: {incompatible.problem}", incompatible.fix)


def _device(recorded: dict) -> str:
    """The device an artifact was compiled for, as the manifest records it."""
    if recorded["type"] == "cpu":
        return f"cpu ({recorded.get('cpu_isa') or 'instruction set not recorded'})"
    capability = f" (compute capability {recorded['capability']})" if recorded.get("capability") else ""
    return f"{recorded['type']} {recorded.get('name') or ''}{capability}"


def _incompatibility(manifest: Manifest) -> FastDiffError | None:
    """Why the artifact cannot run in this process on its own device kind, or None if it can."""
    import_torch()
    from .compat import check_compatible
    from .format import resolve_device

    try:
        check_compatible(manifest, resolve_device(None, manifest))
    except FastDiffError as e:
        return e
    return None


def _passes(options: dict) -> str:
    linears = options.get("quantize_linears")
    quantized = f" (quantized linears: {', '.join(linears)})" if linears else ""
    return (", ".join(options.get("passes") or []) or "(none)") + quantized
