"""Speed and quality of SDXL, SD 1.x or PixArt-α generation: diffusers eager, diffusers + torch.compile (the seed's
recipe), and fastdiff artifacts, in one process on one device.

    python bench/speed.py --model CHECKPOINT_DIR --artifact NAME=ARTIFACT_DIR [...] --out bench/results/NAME

Times the denoiser step (UNet or PixArt transformer; batch 2 = one image with CFG), the VAE decode, and the whole call
(prompt -> PIL image); medians after warm-up. Quality: each variant's denoiser output and final image against
diffusers eager fp32.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import math
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    environment,
    kernel_profile,
    profile_table,
    summary,
    sync,
    time_ms,
    timeline,
    timeline_table,
    write_results,
)
from inductor_fixes import keep_coordinate_descent_picks

PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def denoiser_name(pipe) -> str:
    return "transformer" if hasattr(pipe, "transformer") else "unet"


def step_shape(pipe) -> dict:
    """What step_inputs needs to know of a diffusers pipeline's denoiser and text encoders."""
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    denoiser = getattr(pipe, denoiser_name(pipe))
    pixart = denoiser_name(pipe) == "transformer"
    return {
        "family": "pixart" if pixart else "unet",
        "vae_scale_factor": pipe.vae_scale_factor,
        "text_length": 120 if pixart else 77,
        "text_dim": denoiser.config.caption_channels if pixart else denoiser.config.cross_attention_dim,
        "pooled_dim": text_encoder_2.config.projection_dim if text_encoder_2 is not None else None,
    }


def step_inputs(shape: dict, res: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Fixed random denoiser inputs in fp32 (batch 2 = CFG), cast per variant, in the order of the artifact's
    inputs: SDXL adds pooled embeds and time ids; PixArt-α the text mask, resolution and aspect ratio."""
    g = torch.Generator().manual_seed(0)
    f = shape["vae_scale_factor"]
    inputs = (
        torch.randn(2, 4, res // f, res // f, generator=g).to(device),
        torch.tensor(500.0, device=device),
        torch.randn(2, shape["text_length"], shape["text_dim"], generator=g).to(device),
    )
    if shape["family"] == "pixart":
        return (
            *inputs,
            torch.ones(2, shape["text_length"], dtype=torch.long, device=device),
            torch.tensor([[res, res]] * 2, dtype=torch.float32, device=device),
            torch.tensor([[1.0]] * 2, device=device),
        )
    if shape["pooled_dim"] is None:
        return inputs
    return (
        *inputs,
        torch.randn(2, shape["pooled_dim"], generator=g).to(device),
        torch.tensor([[res, res, 0, 0, res, res]] * 2, dtype=torch.float32, device=device),
    )


def diffusers_step(model, x: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A diffusers UNet or PixArt transformer called on step_inputs' tensors (as its pipeline calls it)."""
    if len(x) == 6:
        out = model(
            x[0],
            encoder_hidden_states=x[2],
            encoder_attention_mask=x[3],
            timestep=x[1].expand(x[0].shape[0]),
            added_cond_kwargs={"resolution": x[4], "aspect_ratio": x[5]},
            return_dict=False,
        )[0]
        return out[:, : x[0].shape[1]]  # the learned-variance half dropped, as the pipeline does
    cond = {"text_embeds": x[3], "time_ids": x[4]} if len(x) == 5 else None
    # The pipeline's own arguments, positional and keyword alike: torch.compile guards on them, and another call
    # shape would compile the UNet a second time at the pipeline's first call.
    return model(
        x[0],
        x[1],
        encoder_hidden_states=x[2],
        timestep_cond=None,
        cross_attention_kwargs=None,
        added_cond_kwargs=cond,
        return_dict=False,
    )[0]


def cast(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Floating inputs to `dtype`, except the timestep (a float32 scalar in every variant)."""
    return tuple(t if i == 1 or not t.is_floating_point() else t.to(dtype) for i, t in enumerate(inputs))


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm())


def psnr(a: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def generate(pipe, args, device, output_type: str):
    # diffusers' PixArt pipeline would otherwise snap the size to its nearest trained aspect-ratio bin and resize.
    accepted = inspect.signature(pipe).parameters
    binning = {"use_resolution_binning": False} if "use_resolution_binning" in accepted else {}
    return pipe(
        PROMPT,
        num_inference_steps=args.steps,
        height=args.res,
        width=args.res,
        generator=torch.Generator().manual_seed(42),
        output_type=output_type,
        **binning,
    ).images


def measure(
    result: dict, unet_step, vae_decode, pipe, args, device, inputs, latents, saved, timed_phases: bool = False
) -> dict:
    """Times and outputs for one variant, added to `result`, which `saved(result)` writes out after each
    measurement (a run stopped by its deadline keeps what it measured). `unet_step(inputs)` and `vae_decode(latents)`
    run one call. With timed_phases (fastdiff's pipeline, which names its phases) and --profile, one generation's
    timeline too (a diffusers eager one would be a trace of ~10^5 ops, for no phases)."""
    result["unet_step_ms"] = summary(time_ms(lambda: unet_step(inputs), device, args.warmup, args.step_runs))
    saved(result)
    if args.profile and device.type == "cuda":
        result["unet_profile"] = kernel_profile(lambda: unet_step(inputs), device)
    result["vae_decode_ms"] = summary(time_ms(lambda: vae_decode(latents), device, 2, max(5, args.runs)))
    saved(result)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    generate(pipe, args, device, "pil")  # first call: includes any lazy compilation / graph capture
    result["first_call_s"] = time.perf_counter() - t0
    saved(result)
    for _ in range(args.e2e_warmup - 1):
        generate(pipe, args, device, "pil")
    e2e = []
    for _ in range(args.runs):
        sync(device)
        t0 = time.perf_counter()
        generate(pipe, args, device, "pil")
        sync(device)
        e2e.append(time.perf_counter() - t0)
    result["end_to_end_s"] = summary(e2e)
    saved(result)
    if timed_phases and args.profile and device.type == "cuda":
        result["timeline"] = timeline(lambda: generate(pipe, args, device, "pil"), device)
    with torch.no_grad():
        result["_unet_out"] = unet_step(inputs).float().cpu()
    result["_image"] = generate(pipe, args, device, "np")
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return result


def diffusers_variant(args, device, dtype: torch.dtype, compile_mode: str | None, inputs, latents_shape, saved) -> dict:
    """diffusers' own pipeline, eager, or with the seed's torch.compile recipe (fused QKV, channels_last, compiled UNet
    and VAE decode; its Inductor flags unless --no-seed-flags)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    name = f"diffusers eager {args_dtype_name(dtype)}"
    fixes = None  # what inductor_fixes patched, if anything
    if compile_mode:
        flags = "seed flags" if args.seed_flags else "default flags"
        name = f"diffusers torch.compile ({compile_mode}, {flags}) {args_dtype_name(dtype)}"
        import torch._inductor.config as inductor

        if args.seed_flags:
            from fastdiff.exporter.compile import SEED_INDUCTOR_FLAGS

            for flag, value in SEED_INDUCTOR_FLAGS.items():
                setattr(inductor, flag, value)
        if device.type == "cuda" and inductor.coordinate_descent_tuning:  # its picks reused from the cache
            fixes = keep_coordinate_descent_picks()
        part = denoiser_name(pipe)
        getattr(pipe, part).fuse_qkv_projections()
        pipe.vae.fuse_qkv_projections()
        getattr(pipe, part).to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        setattr(pipe, part, torch.compile(getattr(pipe, part), mode=compile_mode, fullgraph=True))
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode=compile_mode, fullgraph=True)
    denoiser, vae = getattr(pipe, denoiser_name(pipe)), pipe.vae
    x = cast(inputs, dtype)

    @torch.no_grad()
    def unet_step(_):
        return diffusers_step(denoiser, x)

    latents = torch.randn(latents_shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    @torch.no_grad()
    def vae_decode(z):
        return vae.decode(z / vae.config.scaling_factor, return_dict=False)[0]

    from torch._dynamo.utils import counters

    skips = counters["inductor"]["cudagraph_skips"]  # the process's count so far: this variant's is what it adds
    result = {"variant": name, "compile_s": None, "inductor_fixes": fixes}
    if compile_mode:
        t0 = time.perf_counter()
        unet_step(None)
        vae_decode(latents)
        sync(device)
        result["compile_s"] = time.perf_counter() - t0
        saved(result)
    result = measure(result, unet_step, vae_decode, pipe, args, device, inputs, latents, saved)
    if compile_mode:  # graphs Inductor decided not to capture as CUDA graphs (a mode that would), and why in its log
        result["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
    return result


def fastdiff_variant(label: str, path: str, args, device, inputs, latents_shape, saved) -> dict:
    from fastdiff.runtime import load_pipeline

    t0 = time.perf_counter()
    pipe = load_pipeline(path, device=device)
    load_s = time.perf_counter() - t0
    key = f"{args.res}x{args.res}"
    unet, vae = pipe.unets[key], pipe.vae_decoders[key]
    x = cast(inputs, pipe.dtype)
    latents = torch.randn(latents_shape, generator=torch.Generator().manual_seed(1)).to(device, pipe.vae_dtype)
    result = {
        "variant": f"fastdiff {label}",
        "load_s": load_s,
        "passes": pipe.manifest.options.get("passes"),
        "dtype": pipe.manifest.dtype,
    }
    return measure(
        result, lambda _: unet(*x), lambda z: vae(z), pipe, args, device, inputs, latents, saved, timed_phases=True
    )


def args_dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def table(record: dict) -> str:
    env = record["environment"]
    lines = [
        f"# {record['pipeline']} {record['res']}x{record['res']}, {record['steps']} steps, "
        "one image with CFG (UNet batch 2)",
        "",
        f"{env.get('gpu', 'cpu')}, torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, "
        f"diffusers {env['diffusers']}, torchao {env['torchao']}; {env['date']}",
        f"Command: `{env['command']}`",
        "",
        "| variant | compile s | UNet step ms | VAE decode ms | end to end s | first call s | UNet rel err vs fp32 "
        "| image PSNR dB |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict, key: str, spec: str) -> str:  # "-": not measured (yet, or ever, for this variant)
        value = r.get(key)
        value = value["median"] if isinstance(value, dict) else value
        return "-" if value is None else format(value, spec)

    for r in record["results"]:
        cells = [
            cell(r, "compile_s", ".0f"),
            cell(r, "unet_step_ms", ".2f"),
            cell(r, "vae_decode_ms", ".1f"),
            cell(r, "end_to_end_s", ".3f"),
            cell(r, "first_call_s", ".1f"),
            cell(r, "unet_rel_err", ".2e"),
            cell(r, "image_psnr_db", ".1f"),
        ]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Medians; UNet step over {record['step_runs']} runs, end to end over {record['runs']} runs after warm-up."
    )
    lines.append("")
    for r in record["results"]:
        if "unet_profile" in r:
            lines += profile_table(r["variant"], r["unet_profile"])
        if "timeline" in r:
            lines += timeline_table(r["variant"], r["timeline"])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="diffusers SDXL checkpoint folder (the artifacts' source)")
    parser.add_argument("--artifact", action="append", default=[], metavar="NAME=DIR", help="fastdiff artifact")
    parser.add_argument(
        "--baselines",
        default="eager,compile",
        help="comma-separated: eager, compile (in --compile-mode), compile:MODE (in that torch.compile mode)",
    )
    parser.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode for the seed recipe")
    parser.add_argument(
        "--seed-flags",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the seed's Inductor flags for the compile baseline (coordinate descent tuning makes compiles long)",
    )
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--step-runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--e2e-warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--profile", action="store_true", help="also profile the UNet step's kernels (CUDA)")
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="cuDNN times its convolution algorithms on each shape's first call (all variants; slower first calls)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the eager fp32 quality reference")
    parser.add_argument("--out", required=True, type=Path, help="results path without suffix (.json and .md)")
    args = parser.parse_args()
    baseline_modes = []  # None: eager; else a torch.compile mode
    for baseline in filter(None, args.baselines.split(",")):
        kind, _, mode = baseline.partition(":")
        if kind not in ("eager", "compile"):
            parser.error(f"unknown baseline {baseline!r}")
        baseline_modes.append(None if kind == "eager" else mode or args.compile_mode)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    from diffusers import DiffusionPipeline

    config_pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    shape = step_shape(config_pipe)
    record_model = type(config_pipe).__name__
    inputs = step_inputs(shape, args.res, device)
    f = shape["vae_scale_factor"]
    latents_shape = (1, 4, args.res // f, args.res // f)

    reference = None
    if not args.no_reference:
        pipe = config_pipe.to(device)
        with torch.no_grad():
            ref_out = diffusers_step(getattr(pipe, denoiser_name(pipe)), inputs).float().cpu()
        pipe.set_progress_bar_config(disable=True)
        reference = (ref_out, generate(pipe, args, device, "np"))
    del config_pipe
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None

    results = []
    variants = []  # artifacts first: the torch.compile baseline can take minutes to compile
    for spec in args.artifact:
        label, path = spec.split("=", 1)
        variants.append(
            lambda label=label, path=path: fastdiff_variant(label, path, args, device, inputs, latents_shape, saved)
        )
    for mode in baseline_modes:
        variants.append(
            lambda mode=mode: diffusers_variant(args, device, DTYPES[args.dtype], mode, inputs, latents_shape, saved)
        )
    record = {
        "pipeline": record_model,
        "res": args.res,
        "steps": args.steps,
        "runs": args.runs,
        "step_runs": args.step_runs,
    }
    record["environment"] = environment(device)

    def saved(partial: dict) -> None:
        record["results"] = [*results, {k: v for k, v in partial.items() if not k.startswith("_")}]
        write_results(args.out, record, table(record), echo=False)

    for run in variants:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        r = run()
        if reference is not None:
            r["unet_rel_err"] = rel_err(r["_unet_out"], reference[0])
            r["image_psnr_db"] = psnr(r["_image"], reference[1])
        else:
            r["unet_rel_err"] = r["image_psnr_db"] = float("nan")
        del r["_unet_out"], r["_image"]
        results.append(r)
        record["results"] = results
        write_results(args.out, record, table(record))  # after each variant: a crash keeps what was measured
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
