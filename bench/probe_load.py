"""Where a fastdiff cold start spends its time: imports, then load_pipeline's parts as a timeline (when each began and
how long it took, on which thread: the UNet's weights stream beside the text encoders' and VAE decoder's first calls),
within the warm-up the first call of each compiled package and the CUDA-graph captures (nested: they overlap it).

python bench/probe_load.py ARTIFACT_DIR [--scheduler-first] [--staging BUFFERS CHUNK_MIB] [--profile-warmup N]

--scheduler-first imports diffusers' scheduler before load_pipeline (shows the weights without the import beside
them); --staging sets stream_weights' ring of pinned buffers; --profile-warmup prints the N host-side ops and CUDA
API calls that took the warm-up's time (the packages' first calls: kernel loading, cuDNN and cuBLAS plan choice),
by self time; the profiler's overhead inflates that run's timings. It then times a few more calls of the UNet's
package off its CUDA graph: their host time says how much of the warm-up's is paid on every call (what each run
before a capture costs) rather than on the first (kernel loading, cuDNN building its plans).
"""

import argparse
import sys
import threading
import time
from pathlib import Path

t0 = time.perf_counter()
import torch  # noqa: E402

t_torch = time.perf_counter()
from fastdiff.runtime import capi, folder, load_pipeline, loader, packages, scheduler  # noqa: E402

t_runtime = time.perf_counter()
print(f"import torch {t_torch - t0:.2f} s, then fastdiff.runtime {t_runtime - t_torch:.2f} s")

parser = argparse.ArgumentParser()
parser.add_argument("artifact", type=Path)
parser.add_argument("--scheduler-first", action="store_true")
parser.add_argument("--staging", nargs=2, type=int, metavar=("BUFFERS", "CHUNK_MIB"))
parser.add_argument("--profile-warmup", type=int, metavar="N")
args = parser.parse_args()
if args.staging:
    from fastdiff.runtime import weights

    weights.stream_weights.__defaults__ = (args.staging[1] << 20, args.staging[0])
if args.scheduler_first:
    t = time.perf_counter()
    scheduler.import_scheduler_class("EulerDiscreteScheduler")
    print(f"scheduler imported first, in {time.perf_counter() - t:.2f} s")

if torch.cuda.is_available():  # else the first timed phase's synchronize() would pay for the CUDA context
    t = time.perf_counter()
    torch.zeros(1, device="cuda")
    print(f"CUDA context {time.perf_counter() - t:.2f} s")

spans: list[tuple[float, float, str, str]] = []  # start, seconds, what, thread
load_start = 0.0


def record(name: str, start: float, gpu: bool = True) -> None:
    """A span that ends once its thread's GPU work is done (`gpu`). Only its own stream: a device-wide synchronize
    beside a CUDA-graph capture on another thread would end that capture with an error."""
    if gpu and torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()
    end = time.perf_counter()
    spans.append((start - load_start, end - start, name, threading.current_thread().name))


def timed(module, name, gpu=True):
    fn = getattr(module, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        if name in ("shared_weights", "load_module"):
            label = f"{name} {Path(a[0]).parent.name}"
        elif name in ("_read_checked", "check_constants"):  # a package read and hashed; its weights checked
            label = f"{name} {a[1] if name == '_read_checked' else Path(a[0]).parent.name}"
        else:
            label = name
        record(label, t, gpu)
        return out

    setattr(module, name, wrapper)


for mod, name, gpu in [
    (folder.ArtifactFolder, "__init__", False),  # the folder opened, its manifest read and parsed
    (folder.ArtifactFolder, "check_files", False),
    (folder.ArtifactFolder, "_read_checked", False),  # the packages' hashes, on their own thread
    (folder.ArtifactFolder, "check_unchanged", False),
    (loader, "check_compatible", False),
    (loader, "check_vocabulary", False),
    (capi, "check_constants", False),
    (loader, "load_stock_text_encoder", True),
    (loader, "load_tokenizer", False),
    (loader, "load_scheduler", False),  # on its own thread, beside the captures
    (loader, "shared_weights", True),
    (loader, "load_module", True),
    (loader, "warm_up_decoder", True),
    (loader, "warm_up_conditioning", True),  # first calls beside the UNet's weights, then the captures
    (loader, "warm_up_denoiser", True),
    (packages.CUDAGraphModule, "_capture", True),
]:
    timed(mod, name, gpu)

module_call = packages.CompiledModule.__call__


def first_call_timed(self, *inputs):
    if getattr(self, "_probed", False):
        return module_call(self, *inputs)
    self._probed = True
    t = time.perf_counter()
    out = module_call(self, *inputs)
    record(f"first call {self.path.parent.name}/{self.path.name}", t)
    return out


packages.CompiledModule.__call__ = first_call_timed


def profiled(part: str) -> None:
    """Each call of the loader's warm-up part run under the profiler, which prints its top host-side ops."""
    warm_up = getattr(loader, part)
    calls = 0

    def wrapper(*a):
        nonlocal calls
        calls += 1
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            out = warm_up(*a)
        table = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=args.profile_warmup, max_name_column_width=70
        )
        print(f"{part}, call {calls}:\n{table}")
        return out

    setattr(loader, part, wrapper)


if args.profile_warmup:  # the VAE decoder's and text encoders' first calls, then the captures and the UNet's
    for part in ("warm_up_decoder", "warm_up_conditioning", "warm_up_denoiser"):
        profiled(part)
load_start = time.perf_counter()
pipe = load_pipeline(args.artifact)
print(f"load_pipeline {time.perf_counter() - load_start:.2f} s; its parts (start s, seconds, thread):")
for start, seconds, name, thread in sorted(spans):
    print(f"  {start:6.2f} {seconds:6.2f}  {name}  [{thread}]")
manifest = pipe.manifest
for c in (manifest.unet, manifest.vae_decoder, *manifest.text_encoders):
    size = (args.artifact / c.weights).stat().st_size
    seconds = next(s for _, s, name, _ in spans if name == f"shared_weights {Path(c.weights).parent.name}")
    print(f"weights {c.weights}: {size / 1e9:.2f} GB in {seconds:.2f} s, {size / 1e9 / seconds:.1f} GB/s")
print("imported:", sorted({m.split(".")[0] for m in sys.modules} & {"diffusers", "transformers", "torchao"}))
if args.profile_warmup:
    for key, unet in pipe.unets.items():
        if not isinstance(unet, packages.CUDAGraphModule):
            continue
        static_inputs = next(iter(unet.graphs.values()))[0]  # the captured call's inputs
        for _ in range(3):
            t = time.perf_counter()
            unet.module(*static_inputs)
            host = time.perf_counter() - t
            torch.cuda.synchronize()
            done = time.perf_counter() - t
            print(f"unet {key} package called again: host {host * 1e3:.1f} ms, to the GPU's end {done * 1e3:.1f} ms")
