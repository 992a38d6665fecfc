"""Replica start: from process start to the first /readyz 200, for fastdiff-serve, for a diffusers pipeline behind the
same API (bench/diffusers_server.py), and for a Ray Serve replica of the fastdiff application (Ray's own start, ray.init
and serve.start, is timed apart and not counted).

    python bench/serve_start.py --artifact ART [--model CHECKPOINT --res 1024] [--ray] [--device cuda] --runs 3 \
        --out /tmp/r/serve-start

Each variant runs once untimed (page cache, bytecode), then --runs times; medians. A run ends with SIGTERM (the
server drains and exits). fastdiff's own load time is read from its /metrics (fastdiff_load_seconds): the rest is
the interpreter, imports and the HTTP server's start.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).parent

# Ray: start Ray and Serve (timed apart), then deploy one replica and wait for /readyz through Serve's proxy.
CHILD_RAY = """
import json, sys, time
t0 = time.time()
import ray
from ray import serve
ray.init(include_dashboard=False, log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])})
t1 = time.time()
from fastdiff.runtime.serve.ray_app import AppArgs, app
serve.run(app(AppArgs(artifact=sys.argv[1], device=sys.argv[3], num_replicas=1)), name="fastdiff", route_prefix="/")
t2 = time.time()
print("RESULT " + json.dumps({"start": t0, "ray_started": t1, "replica_running": t2}), flush=True)
sys.stdin.readline()  # the parent has seen /readyz answer 200
serve.shutdown()
ray.shutdown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> float:
    """time.time() of the first /readyz 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.time()
        except httpx.TransportError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"not ready after {timeout} s")


def time_server(command: list[str], port: int, timeout: float) -> dict:
    """One start of an HTTP server process: seconds to /readyz 200, and fastdiff's load time if it reports one."""
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        start = time.time()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            ready = wait_ready(url, proc, timeout)
            load = re.search(r"^fastdiff_load_seconds (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
        except RuntimeError:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-3000:])
            raise
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    return {"ready_s": ready - start, "load_s": float(load[1]) if load else None}


def time_ray(artifact: str, device: str, timeout: float) -> dict:
    """One Ray Serve start: Ray and Serve, then one replica to /readyz 200 through the proxy."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_RAY, artifact, str(port), device],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("RESULT "):
                times = json.loads(line[7:])
                break
        else:
            raise RuntimeError(f"the Ray child exited with {proc.wait()}")
        ready = wait_ready(f"http://127.0.0.1:{port}", proc, timeout)
    finally:
        if proc.poll() is None:
            proc.stdin.write("\n")
            proc.stdin.flush()
        proc.wait(120)
    return {"ray_start_s": times["ray_started"] - times["start"], "ready_s": ready - times["ray_started"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--model", help="A diffusers checkpoint: also time bench/diffusers_server.py over it.")
    parser.add_argument("--res", default="1024", help="The diffusers server's resolution.")
    parser.add_argument("--dtype", default="bf16", help="The diffusers server's dtype.")
    parser.add_argument("--ray", action="store_true", help="Also time a Ray Serve replica.")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, help="Write the results here (.json and .md).")
    args = parser.parse_args(argv)

    def fastdiff_serve() -> dict:
        port = free_port()
        code = "import sys; sys.argv[0] = 'fastdiff-serve'; from fastdiff.runtime.serve.cli import main; main()"
        command = [sys.executable, "-c", code, args.artifact, "--port", str(port), "--device", args.device]
        return time_server(command + ["--log-level", "warning"], port, args.timeout)

    def diffusers_serve() -> dict:
        port = free_port()
        script = str(BENCH / "diffusers_server.py")
        command = [sys.executable, script, args.model, "--res", args.res, "--device", args.device, "--port", str(port)]
        return time_server(command + ["--dtype", args.dtype], port, args.timeout)

    variants = {"fastdiff-serve": fastdiff_serve}
    if args.model:
        variants["diffusers behind the same API"] = diffusers_serve
    if args.ray:
        variants["Ray Serve replica (fastdiff)"] = lambda: time_ray(args.artifact, args.device, args.timeout)
    record: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "runs": {}}
    rows = ["| variant | process start → /readyz 200 (median) | runs | fastdiff's load | Ray's start (apart) |"]
    rows.append("|---|---|---|---|---|")
    for name, timed in variants.items():
        timed()  # untimed: page cache, bytecode
        runs = [timed() for _ in range(args.runs)]
        record["runs"][name] = runs
        ready = [r["ready_s"] for r in runs]
        loads = [r["load_s"] for r in runs if r.get("load_s") is not None]
        ray_start = [r["ray_start_s"] for r in runs if "ray_start_s" in r]
        rows.append(
            f"| {name} | {statistics.median(ready):.2f} s | {', '.join(f'{t:.2f}' for t in ready)} | "
            + (f"{statistics.median(loads):.2f} s" if loads else "")
            + " | "
            + (f"{statistics.median(ray_start):.2f} s" if ray_start else "")
            + " |"
        )
    table = "\n".join(rows) + "\n"
    print(table, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
