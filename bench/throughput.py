"""Throughput and latency of whole generations, one mode per process: a fastdiff artifact, or diffusers eager or
torch.compile (reduce-overhead, fused QKV, channels_last) on the artifact's source checkpoint.

    python bench/throughput.py --artifact ART [--batches 1,2,4] [--steps 20,30] --out bench/results/NAME/fp8
    python bench/throughput.py --diffusers CHECKPOINT --mode compile --out bench/results/NAME/compile
    python bench/throughput.py --diffusers CHECKPOINT --make-reference bench/results/NAME/reference.pt

For each (steps, batch): the median wall time of a whole call (prompts -> PIL images) after warm-up, ms per image,
images per second, and the peak device memory; with two step counts, the time of a step at each batch (the
difference of the two calls' times over the difference of their steps). With --reference (made by --make-reference:
diffusers eager fp32 on fixed inputs), one denoiser step's relative error against it. Writes OUT.json and prints a
table. bench/modes.py runs it once per mode and puts the results side by side.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from common import environment, sync
from speed import cast, denoiser_name, diffusers_step, rel_err, step_inputs, step_shape

PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"


def load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    if args.artifact:
        from fastdiff.runtime import load_pipeline

        return load_pipeline(args.artifact, device=device)
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(args.diffusers, torch_dtype=dtype).to(device)
    if args.mode == "compile":
        pipe.fuse_qkv_projections()
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    return pipe


def measure(pipe, batch: int, steps: int, args: argparse.Namespace, device: torch.device) -> dict:
    def call() -> None:
        generator = torch.Generator().manual_seed(0)
        pipe(
            [PROMPT] * batch,
            num_inference_steps=steps,
            height=args.res,
            width=args.res,
            generator=generator,
        )

    for _ in range(args.warmup):
        call()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "steps": steps,
        "batch": batch,
        "seconds": median,
        "runs": times,
        "ms_per_image": 1e3 * median / batch,
        "images_per_s": batch / median,
        "peak_gib": peak,
    }


def step_error(pipe, reference: dict, device: torch.device) -> float:
    """One denoiser step of `pipe` (a fastdiff pipeline or a diffusers one) on the reference's inputs, against its
    output."""
    inputs = tuple(t.to(device) for t in reference["inputs"])
    with torch.no_grad():
        if hasattr(pipe, "unets"):
            out = pipe.unets[f"{reference['res']}x{reference['res']}"](*cast(inputs, pipe.dtype))
        else:
            out = diffusers_step(getattr(pipe, denoiser_name(pipe)), cast(inputs, pipe.dtype))
    return rel_err(out.float().cpu(), reference["output"])


def make_reference(args: argparse.Namespace, device: torch.device) -> None:
    """diffusers eager fp32: one denoiser step on fixed inputs, saved with them."""
    pipe = load(args, device, torch.float32)
    inputs = step_inputs(step_shape(pipe), args.res, device)
    with torch.no_grad():
        output = diffusers_step(getattr(pipe, denoiser_name(pipe)), inputs).float().cpu()
    torch.save({"inputs": [t.cpu() for t in inputs], "output": output, "res": args.res}, args.make_reference)


def step_times(rows: list[dict]) -> None:
    """Each row's step time at its batch, from the calls at the fewest and the most steps (fixed costs cancel)."""
    for batch in {r["batch"] for r in rows}:
        same = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["steps"])
        low, high = same[0], same[-1]
        if high["steps"] > low["steps"]:
            step_ms = 1e3 * (high["seconds"] - low["seconds"]) / (high["steps"] - low["steps"])
            for r in same:
                r["step_ms"] = step_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifact", type=Path, help="a fastdiff artifact")
    source.add_argument("--diffusers", type=Path, help="a diffusers checkpoint folder (baseline)")
    parser.add_argument("--mode", choices=["eager", "compile"], default="eager", help="with --diffusers")
    parser.add_argument("--batches", default="1,2,4", help="images per call, comma-separated")
    parser.add_argument("--steps", default="20,30", help="denoising steps, comma-separated")
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, help="results path without suffix (.json); not with --make-reference")
    parser.add_argument("--reference", type=Path, help="measure one step's error against this --make-reference file")
    parser.add_argument("--make-reference", type=Path, help="with --diffusers: write the fp32 reference step here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.make_reference:
        if not args.diffusers:
            parser.error("--make-reference needs --diffusers")
        return make_reference(args, device)
    if args.out is None:
        parser.error("--out is required")
    start = time.perf_counter()
    pipe = load(args, device)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter() - start
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            rows.append(measure(pipe, batch, steps, args, device))
            r = rows[-1]
            print(
                f"steps {steps:3d} batch {batch}: {r['seconds']:.3f} s, {r['ms_per_image']:.0f} ms/image, "
                f"{r['images_per_s']:.2f} images/s" + (f", peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] else ""),
                flush=True,
            )
            gc.collect()
    step_times(rows)
    label = str(args.artifact) if args.artifact else f"diffusers {args.mode} ({args.diffusers})"
    record = {"label": label, "load_s": loaded, "res": args.res, "rows": rows, "environment": environment(device)}
    if args.reference:
        record["step_error"] = step_error(pipe, torch.load(args.reference), device)
        print(f"one step against eager fp32: {100 * record['step_error']:.2f} % relative error", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
