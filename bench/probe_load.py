"""Where a fastdiff cold start spends its time: imports, and each part of load_pipeline.

python bench/probe_load.py ARTIFACT_DIR
"""

import sys
import time

t0 = time.perf_counter()
import torch  # noqa: E402

t_torch = time.perf_counter()
from fastdiff.runtime import load_pipeline, loader  # noqa: E402
from fastdiff.runtime.pipeline import FastDiffPipeline  # noqa: E402

t_runtime = time.perf_counter()
print(f"import torch {t_torch - t0:.2f} s, then fastdiff.runtime {t_runtime - t_torch:.2f} s")

timings: dict[str, float] = {}


def timed(module, name):
    fn = getattr(module, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
        return out

    setattr(module, name, wrapper)


for mod, name in [
    (loader, "read_manifest"),
    (loader, "check_files"),
    (loader, "load_stock_text_encoder"),
    (loader, "load_tokenizer"),
    (loader, "load_scheduler"),
    (loader, "load_weights"),
    (loader, "CompiledModule"),
    (FastDiffPipeline, "warm_up"),
]:
    timed(mod, name)
t = time.perf_counter()
pipe = load_pipeline(sys.argv[1])
print(f"load_pipeline {time.perf_counter() - t:.2f} s:", {k: round(v, 2) for k, v in timings.items()})
print("imported:", sorted({m.split(".")[0] for m in sys.modules} & {"diffusers", "transformers", "torchao"}))
