"""The serving benchmarks' baseline: a plain diffusers pipeline behind fastdiff-serve's API (the same FastAPI app,
queue, probes and drain; only the pipeline differs), as a user would serve a model without fastdiff.

    python bench/diffusers_server.py CHECKPOINT --res 1024 [--batch-size 1] [--device cuda] [--dtype bf16] \
        [--port 8001]

CHECKPOINT is a diffusers folder or hub id. --batch-size 1 (the default) runs one request per pipeline call, as a
plain server does; a larger one batches requests as fastdiff-serve does (diffusers' pipelines take prompt lists).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import torch

from fastdiff.runtime.format import Resolution, parse_resolution
from fastdiff.runtime.serve.model import ServedModel, scheduler_draws_noise

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def diffusers_model(
    checkpoint: str, resolutions: list[Resolution], batch_size: int, device: str, dtype: torch.dtype
) -> ServedModel:
    """The checkpoint's diffusers pipeline (SDPA, as diffusers runs it by default), warmed up by one call at each
    resolution, served."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(checkpoint, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    channels = denoiser.config.in_channels

    def latent_shape(res: Resolution) -> tuple[int, ...]:
        return (channels, res.height // scale, res.width // scale)

    for res in resolutions:
        pipe("warm-up", num_inference_steps=2, height=res.height, width=res.width)
    return ServedModel(
        pipe=pipe,
        name=Path(checkpoint).name,
        resolutions=resolutions,
        default_resolution=resolutions[0],
        batch_size=batch_size,
        default_guidance_scale=inspect.signature(pipe.__call__).parameters["guidance_scale"].default,
        latent_shape=latent_shape,
        device=pipe.device,
        dtype=denoiser.dtype,
        rows_independent=not scheduler_draws_noise(pipe.scheduler),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--res", action="append", required=True, help="WxH or SIZE; the first is the default.")
    parser.add_argument("--batch-size", type=int, default=1, help="Images per pipeline call.")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--max-steps", type=int, default=150)
    args = parser.parse_args(argv)

    import uvicorn

    from fastdiff.runtime.serve.app import create_app
    from fastdiff.runtime.serve.server import DrainingServer
    from fastdiff.runtime.serve.service import ImageService

    resolutions = [parse_resolution(r) for r in args.res]
    service = ImageService(
        lambda: diffusers_model(args.checkpoint, resolutions, args.batch_size, args.device, DTYPES[args.dtype]),
        max_queue=args.max_queue,
        batch_wait_s=args.batch_wait_ms / 1000,
        max_steps=args.max_steps,
    )
    app = create_app(service, model_name=Path(args.checkpoint).name)
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"), service, 60)
    server.run()
    sys.exit(2 if service.state == "failed" else 1 if server.forced else 0)


if __name__ == "__main__":
    main()
