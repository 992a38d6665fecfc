"""Component weights: one safetensors file per component, read straight onto the target device.

safetensors stores dense row-major tensors. A weight the compiled code expects in channels_last layout is stored
as its NHWC permutation and viewed back as NCHW here, which restores the strides without a copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import FastDiffError


def to_storage_layout(tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(tensor as it is written to safetensors, whether it is stored NHWC)."""
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor.permute(0, 2, 3, 1).contiguous(), True
    return tensor.contiguous(), False


def load_weights(path: Path, device: torch.device, channels_last: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on `device`, with channels_last ones given their strides back."""
    try:
        tensors = load_file(path, device=str(device))
    except Exception as e:  # safetensors raises its own error types for damaged headers and short files
        raise FastDiffError(
            f"cannot read weights {path}: {e}", "the file is truncated or corrupted: export the model again"
        ) from None
    for name in channels_last:
        tensors[name] = tensors[name].permute(0, 3, 1, 2)
    return tensors
