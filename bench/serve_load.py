"""Load test of an image API (fastdiff-serve, bench/diffusers_server.py, the Ray Serve app): a fixed number of
requests from C concurrent clients against a URL on this machine; throughput and latency percentiles.

    python bench/serve_load.py --url http://127.0.0.1:8000 --requests 64 --concurrency 8 --size 1024x1024 \
        --steps 20 --out /tmp/r/load-c8.json

Only 127.0.0.1, localhost and ::1 are accepted as targets. Bounded: --requests in all, each with --timeout seconds;
a client sends its next request when its last is answered. Request i carries seed --seed + i, so two runs send the
same requests. Prints one line of results and writes them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def local_url(url: str) -> str:
    """The URL without a trailing slash, if it names this machine's loopback; else ValueError."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in LOCAL_HOSTS:
        raise ValueError(f"{url}: only http(s)://127.0.0.1, localhost or [::1] may be load-tested")
    return url.rstrip("/")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def run_load(
    url: str,
    requests: int,
    concurrency: int,
    body: dict,
    timeout: float = 600.0,
    api_key: str | None = None,
    seed: int = 0,
) -> dict:
    """`requests` POSTs of `body` (seed: `seed` + i) to URL/v1/images/generations by `concurrency` clients."""
    url = local_url(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    next_index = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        for i in next_index:  # shared: each index is sent once, by whichever client is free
            start = time.perf_counter()
            try:
                response = await http.post("/v1/images/generations", json={**body, "seed": seed + i})
                status = str(response.status_code)
            except httpx.HTTPError as e:
                status = type(e).__name__
            statuses[status] = statuses.get(status, 0) + 1
            if status == "200":
                latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ok = len(latencies)
    images = ok * body.get("n", 1)
    result = {
        "url": url,
        "requests": requests,
        "concurrency": concurrency,
        "body": body,
        "statuses": statuses,
        "ok": ok,
        "wall_s": wall,
        "requests_per_s": ok / wall,
        "images_per_s": images / wall,
    }
    if latencies:
        result["latency_s"] = {
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "p99": percentile(latencies, 99),
            "mean": statistics.fmean(latencies),
            "min": min(latencies),
            "max": max(latencies),
        }
    return result


def line(result: dict) -> str:
    lat = result.get("latency_s", {})
    ms = " ".join(f"{k} {lat[k] * 1000:.0f} ms" for k in ("p50", "p95", "p99") if k in lat)
    return (
        f"C={result['concurrency']}: {result['ok']}/{result['requests']} ok, {result['images_per_s']:.3f} images/s, "
        f"{ms}, statuses {result['statuses']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=32, help="Requests in all.")
    parser.add_argument("--concurrency", "-c", type=int, default=1, help="Clients at once.")
    parser.add_argument("--prompt", default="Astronaut in a jungle, cold color palette, muted colors, detailed, 8k")
    parser.add_argument("--size", help="WxH (default: the server's).")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n", type=int, default=1, help="Images per request.")
    parser.add_argument("--seed", type=int, default=0, help="Request i has seed SEED + i.")
    parser.add_argument("--timeout", type=float, default=600.0, help="Seconds per request.")
    parser.add_argument("--api-key")
    parser.add_argument("--out", type=Path, help="Write the results here as JSON.")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    try:
        local_url(args.url)
    except ValueError as e:
        parser.error(str(e))
    body = {"prompt": args.prompt, "num_inference_steps": args.steps, "n": args.n}
    if args.size:
        body["size"] = args.size
    result = asyncio.run(
        run_load(args.url, args.requests, args.concurrency, body, args.timeout, args.api_key, args.seed)
    )
    print(line(result), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
