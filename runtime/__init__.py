"""fastdiff runtime: load ahead-of-time compiled diffusion artifacts and generate, compiling nothing.

Imports neither the exporter, torchao, nor diffusers' model or pipeline code; with compiled text encoders (the
default) not transformers either: tokenizers run through the `tokenizers` library.
"""

from .errors import FastDiffError
from .loader import load_pipeline
from .manifest import FORMAT_VERSION, Manifest, read_manifest
from .pipeline import FastDiffPipeline, FastDiffPipelineOutput
from .resolution import Resolution, parse_resolution

__all__ = [
    "FORMAT_VERSION",
    "FastDiffError",
    "FastDiffPipeline",
    "FastDiffPipelineOutput",
    "Manifest",
    "Resolution",
    "load_pipeline",
    "parse_resolution",
    "read_manifest",
]
