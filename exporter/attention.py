"""Which fused attention kernel the compiled code calls.

torch.export picks one scaled_dot_product_attention backend when it traces (flash, cuDNN, memory-efficient or math),
and the compiled package calls that kernel forever after. torch's own choice is a fixed priority list; which one is
fastest depends on the GPU and the shapes (head dim, sequence lengths), so `auto` times each on the model's real
attention calls, on the export device, and keeps the fastest whose output agrees with the math backend.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from fastdiff.runtime.format import FastDiffError

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
CHOICES = ["auto", "default", *BACKENDS]

# q, k and v shapes, dtype, is_causal, and the mask's shape (None without one).
AttentionCall = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], torch.dtype, bool, tuple[int, ...] | None]


class RecordAttention(TorchFunctionMode):
    """Counts the SDPA calls made while it is active, by AttentionCall."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[AttentionCall] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            kwargs = kwargs or {}
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            causal = bool(args[5] if len(args) > 5 else kwargs.get("is_causal", False))
            mask_shape = None if mask is None else tuple(mask.shape)
            self.calls[(tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, causal, mask_shape)] += 1
        return func(*args, **(kwargs or {}))


def attention_calls(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Counter[AttentionCall]:
    """The SDPA calls one forward pass of `module` makes, by shape, with how often each shape occurs."""
    recorder = RecordAttention()
    with torch.no_grad(), recorder:
        module(*inputs)
    return recorder.calls


def _timed(fn: Callable[[], object], device: torch.device, runs: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / runs


def time_backends(
    calls: Counter[AttentionCall], device: torch.device, runs: int = 10, tolerance: float = 2e-2
) -> dict[str, float]:
    """Seconds one forward pass spends in attention with each backend that runs these calls on `device` and agrees
    with the math backend (relative error below `tolerance`). Calls with a mask are not timed (see choose_backend)."""
    g = torch.Generator(device=device).manual_seed(0)
    tensors = [
        ([torch.randn(shape, generator=g, device=device, dtype=dtype) for shape in (q, k, v)], causal)
        for q, k, v, dtype, causal, _ in calls
    ]

    def run_all() -> list[torch.Tensor]:
        return [F.scaled_dot_product_attention(*qkv, is_causal=causal).float() for qkv, causal in tensors]

    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        references = run_all()
    seconds = {}
    for name, backend in BACKENDS.items():
        try:
            with torch.no_grad(), sdpa_kernel([backend]):
                if any((o - r).norm() > tolerance * r.norm() for o, r in zip(run_all(), references, strict=True)):
                    continue
                per_call = [
                    _timed(lambda qkv=qkv, c=c: F.scaled_dot_product_attention(*qkv, is_causal=c), device, runs)
                    for qkv, c in tensors
                ]
        except RuntimeError:  # this backend cannot run these shapes, dtype or device
            continue
        seconds[name] = sum(s * n for s, n in zip(per_call, calls.values(), strict=True))
    return seconds


class BackendChoice(NamedTuple):
    backend: str  # a BACKENDS name, or "default": torch's own choice
    seconds: dict[str, float]  # what 'auto' timed, by backend
    note: str | None = None  # why the backend asked for is not the one used


def choose_backend(
    choice: str, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], device: torch.device
) -> BackendChoice:
    """Resolve an --attention choice for one module: 'auto' times the backends on a CUDA device (and keeps torch's
    default elsewhere); a backend named that cannot run one of the module's attention calls (flash and cuDNN take
    no head size of 512, as in the VAE's attention; flash no mask, as in T5's) gives way to torch's default."""
    if choice not in CHOICES:
        raise FastDiffError(f"unknown attention backend {choice!r}", f"choose from {', '.join(CHOICES)}")
    if choice == "default":
        return BackendChoice(choice, {})
    if choice != "auto":
        failure = backend_failure(choice, module, inputs)
        if failure:
            return BackendChoice("default", {}, f"{choice} cannot run it ({failure}): torch's default instead")
        return BackendChoice(choice, {})
    if device.type != "cuda":
        return BackendChoice("default", {})
    calls = attention_calls(module, inputs)
    if not calls or any(call[5] is not None for call in calls):  # none, or masked (text encoders): keep torch's
        return BackendChoice("default", {})
    seconds = time_backends(calls, device)
    return BackendChoice(min(seconds, key=seconds.get) if seconds else "default", seconds)


CUDA_ONLY_BACKENDS = ("cudnn", "efficient")


def check_backend_device(choice: str, device: torch.device) -> None:
    if device.type != "cuda" and choice in CUDA_ONLY_BACKENDS:
        raise FastDiffError(f"--attention {choice} runs on CUDA GPUs only", "on cpu use default, auto, flash or math")


class _TryBackend(TorchFunctionMode):
    """Runs each SDPA call with one backend; the first call it cannot run is noted (and run with torch's choice)."""

    def __init__(self, backend: SDPBackend) -> None:
        super().__init__()
        self.backend = backend
        self.failure: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.failure is None:
            try:
                with sdpa_kernel([self.backend]):
                    return func(*args, **kwargs)
            except RuntimeError as e:
                self.failure = f"q {tuple(args[0].shape)} {args[0].dtype}: {str(e).splitlines()[0]}"
        return func(*args, **kwargs)


def backend_failure(name: str, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> str | None:
    """Why backend `name` cannot run one of the module's attention calls (head size, dtype, mask, device), or None."""
    trial = _TryBackend(BACKENDS[name])
    with torch.no_grad(), trial:
        module(*inputs)
    return trial.failure


@contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Trace and compile with this backend only ('default': torch's own priority list)."""
    if name == "default":
        yield
        return
    with sdpa_kernel([BACKENDS[name]]):
        yield
