"""The serving load test in one run: fastdiff-serve over an artifact against the same load on a plain diffusers
pipeline behind the same API (bench/diffusers_server.py), each measured against the pipeline's own offline numbers.

    python bench/serve_compare.py --artifact ART --model CHECKPOINT --res 1024x1024 --steps 20 \
        --concurrency 1,8 --requests 32 --out /tmp/r/serve-load

Steps, one at a time on the GPU: (1) offline, in a process of its own: the artifact's pipeline called bare for one
image (median of 5: the C=1 latency target) and for one full batch of --batch images (median of 3: the throughput
target); (2) fastdiff-serve ART, and for each concurrency C a warm-up of C requests, then --requests requests from C
clients (bench/serve_load.py); (3) the same loads on the diffusers server. Targets (issue 27): at C=8, throughput
within 5 % of the offline batch's; at C=1, p50 within 5 % of the bare call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

from serve_load import run_load
from serve_start import free_port, wait_ready

BENCH = Path(__file__).parent

CHILD_OFFLINE = """
import json, statistics, sys, time
import torch
from fastdiff.runtime import load_pipeline
pipe = load_pipeline(sys.argv[1], device=sys.argv[2])
pipe.set_progress_bar_config(disable=True)
w, h = (int(x) for x in sys.argv[3].split("x"))
steps, prompt = int(sys.argv[4]), sys.argv[5]
batch = pipe.manifest.batch_size

def call(n):
    start = time.perf_counter()
    pipe([prompt] * n, num_inference_steps=steps, height=h, width=w, generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - start  # PIL images out: the host has waited for the device

call(1); call(batch)  # warm-up: each batch size's CUDA graphs are captured on first use
bare = statistics.median(call(1) for _ in range(5))
full = statistics.median(call(batch) for _ in range(3))
print("RESULT " + json.dumps({"bare_s": bare, "batch": batch, "batch_s": full, "images_per_s": batch / full}))
"""


def offline(artifact: str, device: str, size: str, steps: int, prompt: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD_OFFLINE, artifact, device, size, str(steps), prompt],
        capture_output=True,
        text=True,
    )
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"the offline measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(results[-1][7:])


def loads(command: list[str], port: int, body: dict, concurrency: list[int], requests: int) -> dict:
    """Start the server, run each load against it, drain it."""
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, proc, 900)
        results = {}
        for c in concurrency:
            asyncio.run(run_load(url, c, c, body, seed=10_000))  # warm-up: this concurrency's batch shapes
            results[c] = asyncio.run(run_load(url, requests, c, body))
            print(f"  C={c}: {results[c]['images_per_s']:.3f} images/s, p50 {results[c]['latency_s']['p50']:.3f} s")
        return results
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(300)


def table(record: dict) -> str:
    base = record["offline"]
    rows = [
        f"Offline (the artifact's pipeline, no server): one image {base['bare_s']:.3f} s; a batch of {base['batch']} "
        f"{base['batch_s']:.3f} s = {base['images_per_s']:.3f} images/s.",
        "",
        "| server | C | images/s | vs offline batch | p50 | vs bare call | p95 | p99 | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, results in record["servers"].items():
        for c, r in results.items():
            lat = r["latency_s"]
            rows.append(
                f"| {name} | {c} | {r['images_per_s']:.3f} | {r['images_per_s'] / base['images_per_s']:.1%} "
                f"| {lat['p50']:.3f} s | {lat['p50'] / base['bare_s']:.1%} | {lat['p95']:.3f} s | {lat['p99']:.3f} s "
                f"| {r['ok']}/{r['requests']} |"
            )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--model", help="The diffusers checkpoint for the baseline server (none: fastdiff alone).")
    parser.add_argument("--res", default="1024x1024", help="WxH, one of the artifact's.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--concurrency", default="1,8", help="Comma-separated client counts.")
    parser.add_argument("--requests", type=int, default=32, help="Requests per load.")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", help="The diffusers server's dtype.")
    parser.add_argument("--prompt", default="Astronaut in a jungle, cold color palette, muted colors, detailed, 8k")
    parser.add_argument("--out", type=Path, required=True, help="Results: OUT.json and OUT.md.")
    args = parser.parse_args(argv)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    body = {"prompt": args.prompt, "size": args.res, "num_inference_steps": args.steps}

    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "body": body, "servers": {}}
    print("offline ...", flush=True)
    record["offline"] = offline(args.artifact, args.device, args.res, args.steps, args.prompt)
    port = free_port()
    code = "import sys; sys.argv[0] = 'fastdiff-serve'; from fastdiff.runtime.serve.cli import main; main()"
    serve = [sys.executable, "-c", code, args.artifact, "--port", str(port), "--device", args.device]
    print("fastdiff-serve ...", flush=True)
    record["servers"]["fastdiff-serve"] = loads(serve, port, body, concurrency, args.requests)
    if args.model:
        port = free_port()
        baseline = [sys.executable, str(BENCH / "diffusers_server.py"), args.model, "--res", args.res]
        baseline += ["--device", args.device, "--dtype", args.dtype, "--port", str(port)]
        print("diffusers behind the same API ...", flush=True)
        record["servers"]["diffusers"] = loads(baseline, port, body, concurrency, args.requests)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    text = table(record)
    args.out.with_suffix(".md").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
