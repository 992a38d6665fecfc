"""A LoRA switch on SDXL, in one process on one device: fastdiff's load_lora_weights (merged into the bound weights,
no compile) beside diffusers eager (load_lora_weights + fuse_lora) and a torch.compile'd diffusers UNet (a reload
recompiles it; with enable_lora_hotswap, a hot swap does not); and the fp8 artifact's output with a LoRA against the
bf16 eager pipeline's with the same LoRA.

    python bench/lora_switch.py --model CHECKPOINT_DIR --artifact BF16_ARTIFACT [--fp8-artifact FP8_ARTIFACT] \\
        --out bench/results/DATE-GPU-lora/lora

Two random LoRAs (A, B) of rank --rank on every attention and feed-forward linear of the UNet (to_q, to_k, to_v,
to_out.0, ff.net.0.proj, ff.net.2), made with peft and saved by diffusers, their up factors scaled by
--lora-strength so that they change the image without wrecking it. Wall times, device work included: a LoRA's load
and the first image after it, a switch A -> B (a load of B: its file read, factors moved, merged) and back
(set_adapters: a merge only), the UNet step and a whole generation before and after.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import environment, summary, sync, time_ms, write_results

PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]  # every attention and FF linear
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call of `fn`, its device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def make_loras(model: str, folder: Path, rank: int, strength: float, dtype: torch.dtype) -> list[Path]:
    """Two random LoRAs over the checkpoint's UNet, saved as diffusers saves them, in `dtype`."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    paths = []
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False), name)
        layers = get_peft_model_state_dict(unet, adapter_name=name)
        layers = {k: (v * strength if ".lora_B." in k else v).to(dtype) for k, v in layers.items()}
        StableDiffusionXLPipeline.save_lora_weights(folder / name, unet_lora_layers=layers)
        unet.delete_adapters(name)
        paths.append(folder / name / "pytorch_lora_weights.safetensors")
    return paths


def generate(pipe, args, output_type: str = "pil"):
    generator = torch.Generator().manual_seed(42)
    size = {"height": args.res, "width": args.res}
    return pipe(PROMPT, num_inference_steps=args.steps, generator=generator, output_type=output_type, **size).images


def e2e_seconds(pipe, args, device: torch.device) -> dict:
    return summary([seconds(lambda: generate(pipe, args), device) for _ in range(args.runs)])


def fastdiff_variant(artifact: str, loras: list[Path], args, device: torch.device) -> dict:
    from fastdiff.runtime import load_pipeline
    from fastdiff.runtime.format import Resolution
    from fastdiff.runtime.pipeline import denoiser_conditioning

    result: dict = {}
    t0 = time.perf_counter()
    pipe = load_pipeline(artifact, device=device)
    result["load_pipeline_s"] = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    res = Resolution(args.res, args.res)
    chunks = denoiser_conditioning(pipe.conditioner, pipe.manifest, device, [PROMPT], None, True, res, 1)
    latents = torch.randn(2, *pipe.manifest.model.latent_shape(res), device=device, dtype=pipe.dtype)
    timestep, unet = torch.tensor(999.0, device=device), pipe.unets[res.key]

    def step() -> dict:
        return summary(time_ms(lambda: unet(latents, timestep, *chunks[0][1]), device, args.warmup, args.step_runs))

    result["unet_step_ms_base"] = step()
    generate(pipe, args)
    result["end_to_end_s_base"] = e2e_seconds(pipe, args, device)
    # The first load also imports diffusers' LoRA conversions and makes the host copies of the base weights.
    result["first_load_lora_s"] = seconds(lambda: pipe.load_lora_weights(loras[0], adapter_name="a"), device)
    result["first_image_after_s"] = seconds(lambda: generate(pipe, args), device)
    result["switch_load_b_s"] = seconds(lambda: pipe.load_lora_weights(loras[1], adapter_name="b"), device)
    result["switch_image_after_s"] = seconds(lambda: generate(pipe, args), device)
    merges = [seconds(lambda n=name: pipe.set_adapters(n), device) for _ in range(args.runs) for name in ("a", "b")]
    result["switch_set_adapters_s"] = summary(merges)
    result["unet_step_ms_with_lora"] = step()
    result["end_to_end_s_with_lora"] = e2e_seconds(pipe, args, device)
    result["host_copies_gb"] = pipe._lora_adapters().host_bytes / 1e9
    pipe.set_adapters("a")
    result["_latents_a"] = generate(pipe, args, "latent").float().cpu()
    pipe.unload_lora_weights()
    result["_latents_base"] = generate(pipe, args, "latent").float().cpu()
    return result


def diffusers_pipeline(args, device: torch.device):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=DTYPES[args.dtype]).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_step(pipe, args, device: torch.device) -> Callable[[], object]:
    """One UNet call of the pipeline's, on one image with classifier-free guidance, at --res."""
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, device=device)
    f = pipe.vae_scale_factor
    x = torch.randn(2, 4, args.res // f, args.res // f, device=device, dtype=embeds.dtype)
    ids = torch.tensor([[args.res, args.res, 0, 0, args.res, args.res]] * 2, device=device, dtype=embeds.dtype)
    cond = {"text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": ids}
    hidden, t = torch.cat([negative, embeds]), torch.tensor(999.0, device=device)
    return lambda: pipe.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=cond, return_dict=False)


def eager_variant(loras: list[Path], args, device: torch.device) -> dict:
    """diffusers eager: a LoRA loaded and fused into the weights (the fast way to run one), then switched."""
    result: dict = {}
    pipe = diffusers_pipeline(args, device)
    step = diffusers_step(pipe, args, device)
    result["unet_step_ms_base"] = summary(time_ms(step, device, args.warmup, args.step_runs))
    generate(pipe, args)
    result["end_to_end_s_base"] = e2e_seconds(pipe, args, device)

    def load_and_fuse(path: Path, name: str) -> None:
        pipe.load_lora_weights(path, adapter_name=name)
        pipe.fuse_lora(adapter_names=[name])

    result["first_load_lora_s"] = seconds(lambda: load_and_fuse(loras[0], "a"), device)
    result["first_image_after_s"] = seconds(lambda: generate(pipe, args), device)

    def switch() -> None:  # undo A's fusion, drop it, then load and fuse B
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        load_and_fuse(loras[1], "b")

    result["switch_load_b_s"] = seconds(switch, device)
    result["switch_image_after_s"] = seconds(lambda: generate(pipe, args), device)
    result["unet_step_ms_with_lora"] = summary(time_ms(step, device, args.warmup, args.step_runs))
    result["end_to_end_s_with_lora"] = e2e_seconds(pipe, args, device)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    pipe.load_lora_weights(loras[0], adapter_name="a")
    result["_latents_a"] = generate(pipe, args, "latent").float().cpu()
    pipe.unload_lora_weights()
    result["_latents_base"] = generate(pipe, args, "latent").float().cpu()
    return result


def compile_variant(loras: list[Path], args, device: torch.device, hotswap: bool) -> dict:
    """diffusers with its UNet under torch.compile: a LoRA's reload recompiles it; with enable_lora_hotswap (rank
    fixed up front, UNet only), loading into the same adapter slot does not."""
    result: dict = {}
    pipe = diffusers_pipeline(args, device)
    if hotswap:
        pipe.enable_lora_hotswap(target_rank=args.rank)
        pipe.load_lora_weights(loras[0], adapter_name="a")
    pipe.unet = torch.compile(pipe.unet, mode=args.compile_mode, fullgraph=False)
    result["compile_first_image_s"] = seconds(lambda: generate(pipe, args), device)
    step = diffusers_step(pipe, args, device)
    result["unet_step_ms_base"] = summary(time_ms(step, device, args.warmup, args.step_runs))
    if hotswap:
        load = seconds(lambda: pipe.load_lora_weights(loras[1], adapter_name="a", hotswap=True), device)
    else:
        load = seconds(lambda: pipe.load_lora_weights(loras[0], adapter_name="a"), device)
    result["load_lora_s"] = load
    result["first_image_after_s"] = seconds(lambda: generate(pipe, args), device)  # a recompile, unless hot-swapped
    result["unet_step_ms_with_lora"] = summary(time_ms(step, device, args.warmup, args.step_runs))
    return result


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


def table(record: dict) -> str:
    rows = [
        f"# LoRA switch: {record['env'].get('gpu', record['env']['device'])}, {record['args']['res']}², "
        f"{record['args']['steps']} steps, rank {record['args']['rank']}",
        "",
        "| variant | load LoRA | first image after | switch A -> B | image after | UNet step before / after (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in record["variants"].items():
        load = r.get("first_load_lora_s", r.get("load_lora_s"))
        cells = [
            name,
            f"{load:.3f} s" if load is not None else "",
            f"{r['first_image_after_s']:.3f} s",
            f"{r['switch_load_b_s']:.3f} s" if "switch_load_b_s" in r else "",
            f"{r['switch_image_after_s']:.3f} s" if "switch_image_after_s" in r else "",
            f"{r['unet_step_ms_base']['median']:.2f} / {r['unet_step_ms_with_lora']['median']:.2f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    fastdiff = record["variants"].get("fastdiff")
    if fastdiff:
        rows += [
            "",
            f"fastdiff set_adapters A <-> B (a merge, no file read): median "
            f"{fastdiff['switch_set_adapters_s']['median']:.3f} s; host copies of the base: "
            f"{fastdiff['host_copies_gb']:.2f} GB",
        ]
    for name, err in record.get("quality", {}).items():
        rows.append(f"{name}: relative error of the latents {err:.4f}")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="diffusers SDXL checkpoint folder (the artifacts' source)")
    parser.add_argument("--artifact", required=True, help="fastdiff artifact of --model (bf16 on a GPU)")
    parser.add_argument("--fp8-artifact", help="its fp8 artifact: output with a LoRA against eager's with it")
    parser.add_argument("--baselines", default="eager,compile,hotswap", help="comma-separated; empty for none")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled UNet")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--lora-strength", type=float, default=0.1, help="scale of the random up factors")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--step-runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", required=True, type=Path, help="results path without suffix (.json and .md)")
    args = parser.parse_args()
    device = torch.device(args.device)
    baselines = [b for b in args.baselines.split(",") if b]
    record = {"env": environment(device), "args": {k: str(v) for k, v in vars(args).items()}, "variants": {}}
    record["args"] |= {"res": args.res, "steps": args.steps, "rank": args.rank}

    def saved() -> None:
        public = {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in record["variants"].items()}
        write_results(args.out, {**record, "variants": public}, table(record), echo=False)

    with tempfile.TemporaryDirectory() as folder:
        loras = make_loras(args.model, Path(folder), args.rank, args.lora_strength, DTYPES[args.dtype])
        runs = {"fastdiff": lambda: fastdiff_variant(args.artifact, loras, args, device)}
        if args.fp8_artifact:
            runs["fastdiff fp8"] = lambda: fastdiff_variant(args.fp8_artifact, loras, args, device)
        runs |= {
            "diffusers eager + fuse_lora": lambda: eager_variant(loras, args, device),
            "diffusers + torch.compile, reload": lambda: compile_variant(loras, args, device, hotswap=False),
            "diffusers + torch.compile, hotswap": lambda: compile_variant(loras, args, device, hotswap=True),
        }
        chosen = {"eager": "diffusers eager + fuse_lora", "compile": "diffusers + torch.compile, reload"}
        chosen["hotswap"] = "diffusers + torch.compile, hotswap"
        skipped = {chosen[b] for b in chosen if b not in baselines}
        for name, run in runs.items():
            if name in skipped:
                continue
            record["variants"][name] = run()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            saved()
    variants = record["variants"]
    eager = variants.get("diffusers eager + fuse_lora")
    if eager:
        quality = record.setdefault("quality", {})
        for name in ("fastdiff", "fastdiff fp8"):
            if name in variants:
                quality[f"{name} vs eager, base"] = rel_err(variants[name]["_latents_base"], eager["_latents_base"])
                quality[f"{name} vs eager, LoRA A"] = rel_err(variants[name]["_latents_a"], eager["_latents_a"])
    saved()
    print(table(record), flush=True)
    ratios = {n: v["unet_step_ms_with_lora"]["median"] / v["unet_step_ms_base"]["median"] for n, v in variants.items()}
    print("UNet step after / before a LoRA: " + ", ".join(f"{n} {r:.3f}" for n, r in ratios.items()), flush=True)


if __name__ == "__main__":
    main()
