"""The export's weight quantization redone in plain torch, so that a LoRA merged into a quantized linear is quantized
the way the export quantized it, without torchao (which the runtime never imports).

An artifact stores a quantized weight as torchao's inner tensors: `qdata` (int8, or float8 e4m3) and a float32 scale
per output row. Both schemes below reproduce, bit for bit, what torchao's `Int8Tensor.from_hp(w, PerRow())` and
`Float8Tensor.from_hp(w, granularity=PerRow())` (its torch kernels) compute from a weight `w` in the artifact's dtype:
tests/test_lora.py checks them against torchao itself.
"""

from __future__ import annotations

import torch

INT8_LEVELS = 127.5  # torchao's symmetric int8: (quant_max - quant_min) / 2 for [-128, 127]
FLOAT32_EPS = torch.finfo(torch.float32).eps  # torchao's smallest int8 scale, whatever the weight's dtype


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qdata, scale) of int8 symmetric per-row quantization, as torchao's Int8DynamicActivationInt8WeightConfig."""
    amax = torch.maximum(-weight.amin(dim=1, keepdim=True).clamp(max=0), weight.amax(dim=1, keepdim=True).clamp(min=0))
    scale = (amax / INT8_LEVELS).clamp(min=FLOAT32_EPS).float()  # computed in the weight's dtype, as torchao does
    return torch.round(weight * (1.0 / scale)).clamp(-128, 127).to(torch.int8), scale


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qdata, scale) of float8 e4m3 per-row quantization, as torchao's Float8DynamicActivationFloat8WeightConfig."""
    largest = torch.finfo(torch.float8_e4m3fn).max
    scale = (weight.abs().amax(dim=1, keepdim=True) / largest).float()
    return (weight.float() / scale).clamp(-largest, largest).to(torch.float8_e4m3fn), scale


QUANTIZERS = {torch.int8: quantize_int8, torch.float8_e4m3fn: quantize_fp8}


def dequantize(qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weight a quantized linear computes with, in float32."""
    return qdata.float() * scale


def requantize(qdata: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor) -> None:
    """Quantize `weight` (in the artifact's dtype) with the scheme of `qdata`'s dtype into `qdata` and `scale`, in
    place."""
    new_qdata, new_scale = QUANTIZERS[qdata.dtype](weight)
    qdata.copy_(new_qdata)
    scale.copy_(new_scale)
