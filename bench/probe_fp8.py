"""Where fp8 SDXL gains and loses time, and where its NaN images come from.

1. Each linear fp8 could quantize (both dimensions divisible by 16), at its shape in one SDXL UNet call (1024², CFG
   batch 2): bf16 F.linear against the fp8 path's two parts, the per-row dynamic quantization of the input (compiled)
   and the rowwise scaled matmul: what chose the linears the fp8 pass quantizes.
2. The first step and module whose output is not finite in a 30-step eager generation with the fp8 pass (torchao).

python bench/probe_fp8.py MODEL_DIR [--no-timing]
"""

import argparse
import collections

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLPipeline
from triton.testing import do_bench

from fastdiff.exporter.passes import apply_passes

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def linear_shapes(pipe: StableDiffusionXLPipeline) -> collections.Counter:
    shapes: collections.Counter = collections.Counter()

    def record(module: torch.nn.Linear, args: tuple) -> None:
        x = args[0]
        shapes[(x.numel() // module.in_features, module.in_features, module.out_features, module.bias is not None)] += 1

    hooks = [
        m.register_forward_pre_hook(record)
        for m in pipe.unet.modules()
        if isinstance(m, torch.nn.Linear) and m.in_features % 16 == 0 and m.out_features % 16 == 0
    ]
    pipe("shapes", num_inference_steps=1, output_type="latent")
    for h in hooks:
        h.remove()
    return shapes


def time_shapes(shapes: collections.Counter) -> None:
    print("| M | K | N | calls/step | bf16 us | fp8 matmul us | quantize input us | saved per step us |")
    print("|---|---|---|---|---|---|---|---|")
    total = 0.0
    for (m, k, n, bias), calls in sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2] * kv[1]):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
        quantize = torch.compile(rowwise, dynamic=False)
        xq, sx = quantize(x)
        wq, sw = rowwise(w)
        t_bf16 = do_bench(lambda: F.linear(x, w, b)) * 1e3  # noqa: B023  (timed at once)
        t_mm = do_bench(lambda: torch._scaled_mm(xq, wq.t(), sx, sw.t(), bias=b, out_dtype=torch.bfloat16)) * 1e3  # noqa: B023
        t_q = do_bench(lambda: quantize(x)) * 1e3  # noqa: B023
        saved = (t_bf16 - t_mm - t_q) * calls
        total += saved
        print(f"| {m} | {k} | {n} | {calls} | {t_bf16:.1f} | {t_mm:.1f} | {t_q:.1f} | {saved:.0f} |", flush=True)
    print(f"\nsum: {total / 1e3:.2f} ms saved per step (negative: lost)\n", flush=True)


def first_non_finite(pipe: StableDiffusionXLPipeline) -> None:
    step = {"now": 0, "found": None}

    def check(name: str):
        def hook(module: torch.nn.Module, args: tuple, out) -> None:
            out = out[0] if isinstance(out, tuple) else out
            if step["found"] is None and isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
                x = args[0] if args and isinstance(args[0], torch.Tensor) else None
                x_info = (
                    "n/a" if x is None else f"finite={bool(torch.isfinite(x).all())}, amax={x.abs().max().item():.3g}"
                )
                step["found"] = (step["now"], name, type(module).__name__, x_info)

        return hook

    hooks = [m.register_forward_hook(check(name)) for name, m in pipe.unet.named_modules() if name]

    def on_step_end(pipe, i: int, t, kwargs: dict) -> dict:
        latents = kwargs["latents"]
        print(f"step {i}: latents amax {latents.abs().max().item():.3g}, finite {bool(torch.isfinite(latents).all())}")
        step["now"] = i + 1
        return kwargs

    pipe(
        "a photo of an astronaut riding a horse",
        num_inference_steps=30,
        output_type="latent",
        generator=torch.Generator("cuda").manual_seed(0),
        callback_on_step_end=on_step_end,
    )
    for h in hooks:
        h.remove()
    print("first non-finite module output (step, module, type, its input):", step["found"], flush=True)


def main() -> None:
    torch._dynamo.config.recompile_limit = 64  # one compile of the quantization per shape
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    pipe = StableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    apply_passes(pipe.unet, ["sdpa", "fuse_qkv"])
    if not args.no_timing:
        time_shapes(linear_shapes(pipe))
    apply_passes(pipe.unet, ["fp8"])
    first_non_finite(pipe)


if __name__ == "__main__":
    main()
