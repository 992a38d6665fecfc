"""Each SDPA backend on a denoiser's own attention calls, shape by shape: the first denoiser call of a generation with
CFG (batch 2) is recorded, then every distinct call is timed with each backend (ms per call, and per denoiser call
over all calls of that shape) with its relative error against the math backend.

The exporter's `--attention auto` picks one backend per module and leaves a module with masked calls (PixArt-α's
cross-attention takes the prompt's mask) to torch's default; torch's default on an H200 is cuDNN's kernel, whose tiles
are 128 wide in the head dimension for PixArt-α's head size of 72. This shows what a choice per call shape could gain.

python bench/probe_attention.py MODEL_DIR [--res 1024]
"""

import argparse
import math
from collections import Counter

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from torch.nn.attention import sdpa_kernel
from triton.testing import do_bench

from fastdiff.exporter.attention import BACKENDS, AttentionCall, RecordAttention

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("--res", type=int, default=1024)
args = parser.parse_args()

pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to("cuda")
denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
calls: Counter[AttentionCall] = Counter()
forward = denoiser.forward


def recorded_forward(*a, **k):
    if calls:  # the first call only
        return forward(*a, **k)
    recorder = RecordAttention()
    with recorder:
        out = forward(*a, **k)
    calls.update(recorder.calls)
    return out


denoiser.forward = recorded_forward
with torch.no_grad():
    pipe("a photo of a cat", num_inference_steps=2, height=args.res, width=args.res, output_type="latent")
print(f"{type(pipe).__name__} {args.res}², {torch.cuda.get_device_name()}, torch {torch.__version__}")
print(f"{sum(calls.values())} attention calls per denoiser call, {len(calls)} shapes\n")

g = torch.Generator(device="cuda").manual_seed(0)
header = "| q, k | mask | calls | " + " | ".join(f"{name} ms" for name in BACKENDS) + " | errors |"
print(header + "\n|" + "---|" * (header.count("|") - 1))
totals = Counter()
for (q, k, v, dtype, causal, mask), count in calls.items():
    qkv = [torch.randn(shape, generator=g, device="cuda", dtype=dtype) for shape in (q, k, v)]
    bias = None if mask is None else torch.zeros(mask, device="cuda", dtype=dtype)

    def run(qkv=qkv, bias=bias, causal=causal):
        return F.scaled_dot_product_attention(*qkv, attn_mask=bias, is_causal=causal)

    with torch.no_grad(), sdpa_kernel([BACKENDS["math"]]):
        reference = run().float()
    times, errors = [], []
    for name, backend in BACKENDS.items():
        try:
            with torch.no_grad(), sdpa_kernel([backend]):
                error = ((run().float() - reference).norm() / reference.norm()).item()
                ms = do_bench(run)
        except RuntimeError:
            times.append("-")
            totals[name] = math.inf
            continue
        times.append(f"{ms:.3f}")
        errors.append(f"{name} {error:.1e}")
        totals[name] += ms * count
    print(f"| {q}, {k} | {mask} | {count} | " + " | ".join(times) + " | " + ", ".join(errors) + " |")
print("| **per denoiser call** | | | " + " | ".join(f"**{totals[name]:.2f}**" for name in BACKENDS) + " | |")
