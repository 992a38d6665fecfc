"""fastdiff runtime: load ahead-of-time compiled diffusion artifacts and generate, compiling nothing.

Imports neither the exporter, torchao, nor diffusers' model or pipeline code; with compiled text encoders (the
default) not transformers either: tokenizers run through the `tokenizers` library.

The names below are imported on first use: importing the package (as the command-line tools do before anything else)
takes a millisecond, and torch is imported where it is needed, where a Ctrl-C during its seconds of import can end
the command cleanly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names for type checkers and editors (re-exported: `import X as X`)
    from .errors import FastDiffError as FastDiffError
    from .format import FORMAT_VERSION as FORMAT_VERSION
    from .format import Manifest as Manifest
    from .format import Resolution as Resolution
    from .format import parse_resolution as parse_resolution
    from .format import read_manifest as read_manifest
    from .loader import load_pipeline as load_pipeline
    from .pipeline import FastDiffPipeline as FastDiffPipeline
    from .pipeline import FastDiffPipelineOutput as FastDiffPipelineOutput
    from .readahead import prefetch as prefetch

_SOURCES = {
    "FORMAT_VERSION": ".format",
    "FastDiffError": ".errors",
    "FastDiffPipeline": ".pipeline",
    "FastDiffPipelineOutput": ".pipeline",
    "Manifest": ".format",
    "Resolution": ".format",
    "load_pipeline": ".loader",
    "parse_resolution": ".format",
    "prefetch": ".readahead",
    "read_manifest": ".format",
}
__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCES})
