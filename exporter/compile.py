"""torch.export + AOTInductor: one module at one input shape -> one code-only package plus its constants."""

from __future__ import annotations

import difflib
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch._functorch._aot_autograd.subclass_parametrization import UnwrapTensorSubclass
from torch.utils._sympy.value_ranges import bound_sympy

from fastdiff.runtime.format import FastDiffError, device_index, make_libstdcxx_global

# The seed's Inductor flags ("Diffusion, Fast"; it used them with max-autotune), as one switchable set.
SEED_INDUCTOR_FLAGS = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "epilogue_fusion": False,
    "coordinate_descent_check_all_directions": True,
}


def parse_inductor_config(items: list[str]) -> dict[str, dict[str, Any]]:
    """[COMPONENT:]KEY=VALUE settings of torch._inductor.config, checked against its keys and their defaults' types;
    returned by component ("" for every package; options.check_options checks the components' names)."""
    known = torch._inductor.config.get_config_copy()
    configs: dict[str, dict[str, Any]] = {}
    for item in items:
        setting, sep, text = item.partition("=")
        component, _, key = setting.strip().rpartition(":")
        key = key.strip()
        if not sep or not key:
            raise FastDiffError(
                f"inductor config {item!r} is not KEY=VALUE", "e.g. --inductor-config max_autotune=true"
            )
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]}?" if close else "see torch/_inductor/config.py for the settings"
            raise FastDiffError(f"unknown inductor config {key!r}", hint)
        if key in PACKAGE_CONFIGS:
            raise FastDiffError(
                f"inductor config {key} is fixed by the artifact format ({PACKAGE_CONFIGS[key]})",
                "leave it out: the weights live beside the packages, in safetensors, for the runtime to bind",
            )
        configs.setdefault(component, {})[key] = _config_value(key, text.strip(), known[key])
    return configs


def _config_value(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise FastDiffError(f"inductor config {key} takes true or false, not {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(default, int | float):
        try:
            return type(default)(text)
        except ValueError:
            raise FastDiffError(f"inductor config {key} takes a number, not {text!r}") from None
    if isinstance(default, str):
        return text
    if default is None:  # an optional setting of any type: a JSON literal if it is one, else a string
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    raise FastDiffError(f"inductor config {key} ({type(default).__name__}) cannot be set from the command line")


def export_program(
    module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], dynamic_shapes: dict[str, Any] | None
) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(module, example_inputs, dynamic_shapes=dynamic_shapes, strict=False)


CUDA_INT_MM_MIN_ROWS = 17  # cuBLAS's int8 matmul (aten._int_mm on CUDA) refuses 16 rows or fewer


def check_int8_rows(program: torch.export.ExportedProgram, device: torch.device, name: str) -> None:
    """Refuse, before the compile, an int8 matmul that a call of the package could give too few rows on a GPU: the
    package would fail at run time. Its rows are counted over the program's whole range of batch sizes."""
    if device.type != "cuda":
        return
    for node in program.graph.nodes:
        if node.target is not torch.ops.aten._int_mm.default:
            continue
        rows = node.args[0].meta["val"].shape[0]
        if isinstance(rows, torch.SymInt):
            rows = int(bound_sympy(rows.node.expr, program.range_constraints).lower)
        if rows < CUDA_INT_MM_MIN_ROWS:
            module = next(reversed(node.meta.get("nn_module_stack", {}).values()), ("?", ""))[0]
            raise FastDiffError(
                f"int8 cannot quantize linear {module!r} of {name}: it can be called with {rows} row"
                f"{'' if rows == 1 else 's'}, and an int8 matmul on a GPU needs at least {CUDA_INT_MM_MIN_ROWS}",
                "use --quantize fp8 or none, or export a larger resolution",
            )


# Settings the artifact format depends on: a package holds code only; the runtime binds the weights at load. Every
# weight: Inductor would otherwise compile scalars and vectors of up to 8 values into the code (SDXL's UNet conv_out
# bias, the VAE decoder's conv_out bias), where a fine-tune's values (fastdiff-export --packages-from) could not reach.
PACKAGE_CONFIGS = {"aot_inductor.package_constants_in_so": False, "always_keep_tensor_constants": True}

# With max-autotune (the VAE decoder's default on Hopper) Inductor writes every autotuned GEMM's and convolution's
# benchmark table and statistics to stderr, dozens of them between the export's progress lines. Off unless the user
# sets them (--inductor-config autotune_num_choices_displayed=10). A key the installed torch lacks is left out.
QUIET_AUTOTUNE_CONFIGS = {
    key: value
    for key, value in {"autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}.items()
    if hasattr(torch._inductor.config, key)
}


class _SkippedAutotuneChoices(logging.Filter):
    """Drops Inductor's error for an autotuning choice that does not fit in the GPU's shared memory: Inductor skips
    that choice and goes on (on Hopper a few Triton convolution configs of the VAE decoder, each export)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            str(record.msg).startswith("Runtime error during autotuning") and "OutOfResources" in record.getMessage()
        )


# Inductor compiles a CPU package for the export machine's own processor (-march=native): it may use instructions
# that another CPU of the same ISA level (the manifest's cpu_isa, what the runtime checks) lacks, and die there with
# an illegal instruction. It compiles for the x86-64 level of that ISA instead; a user's cpp.march wins.
X86_LEVELS = {"DEFAULT": "x86-64", "AVX2": "x86-64-v3", "AVX512": "x86-64-v4"}


def cpu_target_configs(device: torch.device) -> dict[str, Any]:
    """The Inductor setting that makes a package for `device` run on any CPU of the export machine's ISA level."""
    isa = torch.backends.cpu.get_cpu_capability()
    if device.type != "cpu" or isa not in X86_LEVELS or not hasattr(torch._inductor.config.cpp, "march"):
        return {}
    return {"cpp.march": X86_LEVELS[isa]}


def compile_package(
    program: torch.export.ExportedProgram, path: Path, inductor_configs: dict[str, Any], device: torch.device
) -> Path:
    """Compile to a .pt2 package holding code only: weights are bound at load time by the runtime."""
    configs = {**QUIET_AUTOTUNE_CONFIGS, **cpu_target_configs(device), **inductor_configs, **PACKAGE_CONFIGS}
    autotune_log = logging.getLogger("torch._inductor.select_algorithm")
    skipped = _SkippedAutotuneChoices()
    autotune_log.addFilter(skipped)
    try:
        with warnings.catch_warnings():
            # torch 2.11-2.13 warn of their own pytree deprecation when they pickle a graph's specs, once per compile
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`", category=FutureWarning)
            torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    finally:
        autotune_log.removeFilter(skipped)
    return path


def package_constant_names(path: Path, device: torch.device) -> list[str]:
    """The names (in the exported model) of the constants the package binds at load time."""
    from torch._inductor.package import load_package

    make_libstdcxx_global()
    return load_package(str(path), run_single_threaded=True, device_index=device_index(device)).get_constant_fqns()


_PARAMETRIZED = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.original(\d+)$")


def plain_constants(program: torch.export.ExportedProgram, names: list[str]) -> dict[str, torch.Tensor]:
    """The plain tensors a package binds by name, taken from the exported program.

    Tensor subclasses (torchao's quantized weights) are compiled as their inner tensors, named
    `<module>.parametrizations.<attr>.original<i>`; they are flattened the same way here, so the safetensors file
    and the runtime need no torchao.
    """
    return named_constants({**program.state_dict, **program.constants}, names)


def named_constants(sources: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """The plain tensors named `names` (as a package names its constants) among `sources` (a module's parameters and
    buffers by name), tensor subclasses flattened as plain_constants flattens them."""
    out = {}
    for name in names:
        if name in sources and not _is_subclass(sources[name]):
            out[name] = sources[name].detach()
            continue
        owner = parametrized_owner(name)
        if owner is None or owner not in sources:
            raise FastDiffError(f"the compiled package needs constant {name!r}, which the model does not have")
        out[name] = _flatten(sources[owner])[int(_PARAMETRIZED.match(name).group(3))].detach()
    return out


def parametrized_owner(name: str) -> str | None:
    """The tensor subclass whose inner tensor `name` is (`<module>.parametrizations.<attr>.original<i>` ->
    `<module>.<attr>`), or None."""
    match = _PARAMETRIZED.match(name)
    return ".".join(filter(None, match.group(1, 2))) if match else None


def _is_subclass(t: torch.Tensor) -> bool:
    return hasattr(t, "__tensor_flatten__")


def _flatten(t: torch.Tensor) -> list[torch.Tensor]:
    return UnwrapTensorSubclass().right_inverse(t)
