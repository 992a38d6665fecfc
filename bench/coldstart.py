"""Cold start: from process start to the first image (SDXL, SD 1.x or PixArt-α), in fresh processes, phases timed.

    python bench/coldstart.py --model CHECKPOINT_DIR --artifact NAME=ARTIFACT_DIR [...] --out bench/results/NAME

Each variant runs once untimed (to warm the page cache), then --runs times (with --page-cache-cold, --runs more
times with its model files evicted from the page cache first). With --compare-prefetch each fastdiff run has a twin
without fastdiff.runtime.prefetch, run right after it (the machine's import times drift by seconds). Phases:
interpreter start, imports, load (weights and compiled code on the device), first image (text encoding, all steps,
decode, PIL).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import summary, write_results

CHILD_FASTDIFF = """
import json, sys, time
t0 = time.time()
if sys.argv[5] != "no-prefetch":  # as fastdiff-run does, and the README asks of a server: reads beside the import
    from fastdiff.runtime import prefetch
    prefetch(sys.argv[2])
import torch
from fastdiff.runtime import load_pipeline
t1 = time.time()
device = sys.argv[6]
pipe = load_pipeline(sys.argv[2], device=device)
torch.cuda.synchronize() if device == "cuda" else None; t2 = time.time()
pipe.set_progress_bar_config(disable=True)
pipe(sys.argv[3], num_inference_steps=int(sys.argv[4]), generator=torch.Generator().manual_seed(0)).images[0]
t3 = time.time()
print("RESULT " + json.dumps({"start": t0, "imports": t1, "load": t2, "first_image": t3}))
"""

# argv[5] "compile": the UNet and VAE decode under torch.compile (default mode, fullgraph), compiled on the first call;
# the compile cache is wherever TORCHINDUCTOR_CACHE_DIR points. With COMPILE_ARTIFACTS set to a file: if it exists,
# torch.compiler.load_cache_artifacts(its bytes) first (in the load phase); else save_cache_artifacts() into it once
# the first image is out (untimed) -- PyTorch's way to ship a compile cache to a fresh machine.
CHILD_DIFFUSERS = """
import json, os, sys, time
t0 = time.time()
import torch
from diffusers import DiffusionPipeline
t1 = time.time()
device = sys.argv[6]
dtype = torch.bfloat16 if device == "cuda" else torch.float32
pipe = DiffusionPipeline.from_pretrained(sys.argv[2], torch_dtype=dtype).to(device)
artifacts = os.environ.get("COMPILE_ARTIFACTS")
if sys.argv[5] == "compile":
    if artifacts and os.path.exists(artifacts):
        torch.compiler.load_cache_artifacts(open(artifacts, "rb").read())
    name = "transformer" if hasattr(pipe, "transformer") else "unet"
    setattr(pipe, name, torch.compile(getattr(pipe, name), fullgraph=True))
    pipe.vae.decode = torch.compile(pipe.vae.decode, fullgraph=True)
torch.cuda.synchronize() if device == "cuda" else None; t2 = time.time()
pipe.set_progress_bar_config(disable=True)
pipe(sys.argv[3], num_inference_steps=int(sys.argv[4]), generator=torch.Generator().manual_seed(0)).images[0]
t3 = time.time()
if sys.argv[5] == "compile" and artifacts and not os.path.exists(artifacts):
    open(artifacts, "wb").write(torch.compiler.save_cache_artifacts()[0])
print("RESULT " + json.dumps({"start": t0, "imports": t1, "load": t2, "first_image": t3}))
"""

PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"


def evicted(folder: str) -> str:
    """`folder`, its files dropped from the page cache (posix_fadvise DONTNEED: no root needed, unlike drop_caches;
    Python's and torch's own files stay cached)."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return folder


def bytecode(cache: str | None) -> str:
    """Where the children find Python's compiled bytecode, in words (for the results)."""
    import torch

    if cache:
        return f"cached in {cache} (PYTHONPYCACHEPREFIX), written by the runs before (a variant's untimed run first)"
    torch_cached = any((Path(torch.__file__).parent / "__pycache__").glob("__init__.*.pyc"))
    writes = "not written" if sys.flags.dont_write_bytecode else "written"
    return f"as this interpreter has it: torch's {'is' if torch_cached else 'is not'} cached, new bytecode {writes}"


def run_child(code: str, target: str, args: argparse.Namespace, mode: str = "", env: dict | None = None) -> dict:
    if args.bytecode_cache:
        env = {**(env or {}), "PYTHONPYCACHEPREFIX": args.bytecode_cache, "PYTHONDONTWRITEBYTECODE": ""}
    spawn = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", code, "x", target, PROMPT, str(args.steps), mode, args.device],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"failed": True, "returncode": proc.returncode, "stderr_tail": proc.stderr[-2000:]}
    t = json.loads(lines[-1][len("RESULT ") :])
    return {
        "interpreter_s": t["start"] - spawn,
        "imports_s": t["imports"] - t["start"],
        "load_s": t["load"] - t["imports"],
        "first_image_s": t["first_image"] - t["load"],
        "total_s": t["first_image"] - spawn,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="diffusers checkpoint folder for the diffusers eager baseline")
    parser.add_argument("--artifact", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke check with tiny models")
    parser.add_argument(
        "--baselines",
        default="eager",
        help="with --model: eager, compile (torch.compile with a cold, a warm, then a loaded compile cache: "
        "minutes), or both",
    )
    parser.add_argument(
        "--page-cache-cold",
        action="store_true",
        help="also run each fastdiff and eager variant with its model files evicted from the page cache first",
    )
    parser.add_argument(
        "--compare-prefetch",
        action="store_true",
        help="also run each fastdiff variant without fastdiff.runtime.prefetch, each run beside its twin",
    )
    parser.add_argument(
        "--bytecode-cache",
        metavar="DIR",
        help="children read and write Python's compiled bytecode in DIR (PYTHONPYCACHEPREFIX), whatever "
        "PYTHONDONTWRITEBYTECODE says: each variant's untimed run writes what the timed ones read, as an install "
        "that compiled its bytecode (pip's default) would have it",
    )
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    import torch
    from common import environment

    variants = [(f"fastdiff {name}", CHILD_FASTDIFF, path) for name, path in (a.split("=", 1) for a in args.artifact)]
    baselines = set(filter(None, args.baselines.split(","))) if args.model else set()
    dtype = "bf16" if args.device == "cuda" else "fp32"
    if "eager" in baselines:
        variants.append((f"diffusers eager {dtype}", CHILD_DIFFUSERS, args.model))
    env = environment(torch.device(args.device))
    env["bytecode"] = bytecode(args.bytecode_cache)
    record = {"steps": args.steps, "runs": args.runs, "environment": env, "results": []}

    def add(name: str, runs: list[dict]) -> None:
        ok = [r for r in runs if not r.get("failed")]
        entry = {"variant": name, "runs": runs}
        if ok:
            entry["median"] = {k: summary([r[k] for r in ok])["median"] for k in ok[0]}
        record["results"].append(entry)
        write_results(args.out, record, table(record))

    for name, code, target in variants:
        warm = run_child(code, target, args)  # warms the page cache
        if warm.get("failed"):
            add(name, [warm])
            continue
        modes = {"": ""}  # the child's mode: the name's suffix
        if args.compare_prefetch and code is CHILD_FASTDIFF:
            modes["no-prefetch"] = ", no prefetch"
        for cold in (False, True) if args.page_cache_cold else (False,):
            runs = {mode: [] for mode in modes}
            for _ in range(args.runs):
                for mode in modes:  # twins one after the other
                    runs[mode].append(run_child(code, evicted(target) if cold else target, args, mode))
            for mode, suffix in modes.items():
                add(f"{name}{', page cache cold' if cold else ''}{suffix}", runs[mode])
    if "compile" in baselines:
        # The first run fills an empty cache folder (cold) and saves the compile-cache artifacts; the second reuses
        # the folder (warm); the third starts from another empty folder with the saved artifacts loaded.
        with tempfile.TemporaryDirectory() as tmp:
            saved = f"{tmp}/artifacts.bin"
            for state, cache in (("cold", "a"), ("warm", "a"), ("artifacts-loaded", "b")):
                env = {
                    "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/{cache}",
                    "TRITON_CACHE_DIR": f"{tmp}/{cache}/triton",
                    "COMPILE_ARTIFACTS": saved,
                }
                run = run_child(CHILD_DIFFUSERS, args.model, args, "compile", env)
                add(f"diffusers torch.compile {dtype}, {state} compile cache", [run])


def table(record: dict) -> str:
    env = record["environment"]
    lines = [
        f"# Cold start: process start -> first image ({record['steps']} steps)",
        "",
        f"{env.get('gpu', 'cpu')}, torch {env['torch']}, CUDA {env['cuda']}, diffusers {env['diffusers']}; "
        f"{env['date']}",
        f"Command: `{env['command']}`",
        "",
        "| variant | interpreter s | imports s | load s | first image s | total s |",
        "|---|---|---|---|---|---|",
    ]
    for r in record["results"]:
        m = r.get("median")
        if m is None:
            lines.append(f"| {r['variant']} | failed (exit {r['runs'][0]['returncode']}) | | | | |")
            continue
        lines.append(
            f"| {r['variant']} | {m['interpreter_s']:.2f} | {m['imports_s']:.2f} | {m['load_s']:.2f} | "
            f"{m['first_image_s']:.2f} | {m['total_s']:.2f} |"
        )
    variants = " ".join(r["variant"] for r in record["results"])
    notes = []
    if any("torch.compile" not in r["variant"] for r in record["results"]):
        notes.append(f"Medians of {record['runs']} runs after one untimed run that warms the page cache.")
    notes.append(f"Python bytecode: {env.get('bytecode', 'as the interpreter has it')}.")
    if "torch.compile" in variants:
        notes.append(
            "torch.compile: one run with an empty compile cache (Inductor and Triton caches in a fresh folder), then "
            "one that reuses it, then one with another empty folder and the first run's "
            "torch.compiler.save_cache_artifacts() loaded."
        )
    if "page cache cold" in variants:
        notes.append("Page cache cold: the model's files evicted (posix_fadvise) before each run.")
    if "no prefetch" in variants:
        notes.append("No prefetch: the same start without fastdiff.runtime.prefetch, each run beside its twin's.")
    lines += ["", " ".join(notes)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
