"""Random LoRAs for the tiny models, made with peft and saved with diffusers' save_lora_weights, as diffusers' own
LoRA tests make them (tests/test_lora.py, and the server's LoRA tests)."""

from __future__ import annotations

from pathlib import Path

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def make_lora(
    pipeline_class: type,
    checkpoint: Path,
    out: Path,
    seed: int,
    unet_targets: list[str],
    text: bool = True,
    metadata: bool = True,
    patterns: dict | None = None,
    **config,
) -> Path:
    """A random LoRA (non-zero up factors) over the checkpoint's UNet (with the rank and alpha `patterns`, if any) and
    text encoders, saved by diffusers."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = pipeline_class.from_pretrained(checkpoint)
    torch.manual_seed(seed)
    configs = {"unet": LoraConfig(target_modules=unet_targets, init_lora_weights=False, **config, **(patterns or {}))}
    if text:
        configs |= {
            name: LoraConfig(target_modules=TEXT_TARGETS, init_lora_weights=False, **config)
            for name in ("text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None
        }
    layers, meta = {}, {}
    for name, lora_config in configs.items():
        getattr(pipe, name).add_adapter(lora_config)
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(getattr(pipe, name))
        meta[f"{name}_lora_adapter_metadata"] = lora_config.to_dict()
    pipeline_class.save_lora_weights(out, **layers, **(meta if metadata else {}))
    return out / "pytorch_lora_weights.safetensors"
