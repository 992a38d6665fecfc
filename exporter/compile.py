"""torch.export + AOTInductor: one module at one input shape -> one code-only package plus its constants."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch._functorch._aot_autograd.subclass_parametrization import UnwrapTensorSubclass

from fastdiff.runtime.errors import FastDiffError
from fastdiff.runtime.packages import make_libstdcxx_global

# The seed's Inductor flags ("Diffusion, Fast"; it used them with max-autotune), as one switchable set.
SEED_INDUCTOR_FLAGS = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "epilogue_fusion": False,
    "coordinate_descent_check_all_directions": True,
}


def export_program(
    module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], dynamic_shapes: dict[str, Any] | None
) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(module, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)


def compile_package(program: torch.export.ExportedProgram, path: Path, inductor_configs: dict[str, Any]) -> Path:
    """Compile to a .pt2 package holding code only: weights are bound at load time by the runtime."""
    configs = {**inductor_configs, "aot_inductor.package_constants_in_so": False}
    torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    return path


def package_constant_names(path: Path, device: torch.device) -> list[str]:
    make_libstdcxx_global()
    device_index = -1 if device.type == "cpu" else (device.index or 0)
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, device_index)
    return list(loader.get_constant_fqns())


_PARAMETRIZED = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.original(\d+)$")


def plain_constants(program: torch.export.ExportedProgram, names: list[str]) -> dict[str, torch.Tensor]:
    """The plain tensors a package binds by name, taken from the exported program.

    Tensor subclasses (torchao's quantized weights) are compiled as their inner tensors, named
    `<module>.parametrizations.<attr>.original<i>`; they are flattened the same way here, so the safetensors file
    and the runtime need no torchao.
    """
    sources = {**program.state_dict, **program.constants}
    out = {}
    for name in names:
        if name in sources and not _is_subclass(sources[name]):
            out[name] = sources[name].detach()
            continue
        match = _PARAMETRIZED.match(name)
        owner = match and ".".join(filter(None, match.group(1, 2)))
        if not owner or owner not in sources:
            raise FastDiffError(f"the compiled package needs constant {name!r}, which the model does not have")
        out[name] = _flatten(sources[owner])[int(match.group(3))].detach()
    return out


def _is_subclass(t: torch.Tensor) -> bool:
    return hasattr(t, "__tensor_flatten__")


def _flatten(t: torch.Tensor) -> list[torch.Tensor]:
    return UnwrapTensorSubclass().right_inverse(t)
