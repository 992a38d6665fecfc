"""The SDPA backend choice (exporter/attention.py): recorded shapes, timing, and the kernel compiled in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_passes import load_unet, unet_inputs
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from fastdiff.exporter.attention import attention_backend, attention_calls, choose_backend, time_backends
from fastdiff.exporter.compile import export_program
from fastdiff.exporter.passes import sdpa
from fastdiff.exporter.wrappers import SDXLUNetStep
from fastdiff.runtime import FastDiffError


class SelfAttention(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v) * 2


def qkv() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 4, 16, 8, generator=g) for _ in range(3))


def test_attention_calls_are_the_models_own(tiny_checkpoint: Path) -> None:
    unet = SDXLUNetStep(sdpa(load_unet(tiny_checkpoint)))
    inputs = unet_inputs(unet.unet)
    calls = attention_calls(unet, inputs)
    n_attention = sum(1 for m in unet.modules() if type(m).__name__ == "Attention")
    assert sum(calls.values()) == n_attention  # one call per attention layer, grouped by shape
    for q, k, v, dtype, causal, mask in calls:
        assert q[0] == 2 and k[:2] == v[:2] and dtype == torch.float32 and not causal and mask is None
    assert any(k[2] == 77 for _, k, *_ in calls)  # cross-attention over the 77 text tokens


def test_time_backends_keeps_only_backends_that_run_and_agree() -> None:
    calls = {((2, 4, 16, 8), (2, 4, 16, 8), (2, 4, 16, 8), torch.float32, False, None): 3}
    seconds = time_backends(calls, torch.device("cpu"), runs=2)
    assert {"flash", "math"} <= set(seconds) <= {"flash", "math", "efficient", "cudnn"}
    assert "cudnn" not in seconds  # no cuDNN kernels on the CPU
    assert all(s > 0 for s in seconds.values())


def test_choose_backend() -> None:
    module, inputs, cpu = SelfAttention(), qkv(), torch.device("cpu")
    assert choose_backend("math", module, inputs, cpu) == ("math", {}, None)
    assert choose_backend("auto", module, inputs, cpu) == ("default", {}, None)  # tuned on CUDA only
    with pytest.raises(FastDiffError, match="unknown attention backend"):
        choose_backend("fastest", module, inputs, cpu)


def test_a_backend_that_cannot_run_the_module_gives_way_to_the_default() -> None:
    """As flash and cuDNN do for the VAE's head size of 512 on a GPU: here cuDNN, which has no CPU kernels."""
    backend, seconds, note = choose_backend("cudnn", SelfAttention(), qkv(), torch.device("cpu"))
    assert (backend, seconds) == ("default", {})
    assert note.startswith("cudnn cannot run it (q (2, 4, 16, 8) torch.float32: ") and "torch's default" in note


def test_cuda_only_backends_are_refused_on_the_cpu() -> None:
    from fastdiff.exporter.attention import check_backend_device

    for name in ("cudnn", "efficient"):
        with pytest.raises(FastDiffError, match=f"--attention {name} runs on CUDA GPUs only"):
            check_backend_device(name, torch.device("cpu"))
    for name in ("default", "auto", "flash", "math"):
        check_backend_device(name, torch.device("cpu"))


def _attention_ops(backend: str) -> set[str]:
    """The attention ops of the exported program once traced down to ATen kernels, as AOTInductor's compile does
    (the exported program itself still holds the backend-neutral aten.scaled_dot_product_attention)."""
    with attention_backend(backend):
        program = export_program(SelfAttention(), qkv(), None)
        graph = make_fx(program.module(), tracing_mode="fake")(*qkv()).graph
    return {str(node.target) for node in graph.nodes if "scaled_dot_product" in str(node.target)}


def test_backend_is_the_one_compiled_in() -> None:
    assert _attention_ops("flash") == {"aten._scaled_dot_product_flash_attention_for_cpu.default"}
    assert not _attention_ops("math")  # decomposed into matmul + softmax
