"""The Ray Serve application on a local Ray instance: two CPU replicas over the tiny artifact behind Serve's HTTP
proxy on 127.0.0.1, called through the official `openai` client: concurrent requests spread over both replicas, each
image what the pipeline gives alone (with its LoRA merged, for one); a replica killed while requests are in flight is
replaced, and every request is answered once with its own image (the client retries a request whose replica died: the
seed makes the retry give the same bytes). The application is built from the example Serve config file in docs/."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from serve_helpers import alone, assert_same_image, decode, free_port, loras_loaded, merged

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

CONFIG = Path(__file__).parents[1] / "docs" / "serve-config.yaml"


@pytest.fixture(scope="module")
def ray_app(tiny_artifact: Path, tiny_loras: dict[str, Path]):
    """The docs' config file's application, its args pointed at the tiny artifact on the CPU with two replicas and a
    LoRA."""
    from ray.serve.schema import ServeDeploySchema

    from fastdiff.runtime.serve.ray_app import AppArgs, app

    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (application,) = config.applications
    assert application.import_path == "fastdiff.runtime.serve.ray_app:app"
    args = {**application.args, "artifact": str(tiny_artifact), "device": "cpu", "num_replicas": 2, "num_cpus": 0.5}
    args["loras"] = {"pixel": str(tiny_loras["pixel"])}
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(app(AppArgs(**args)), name="fastdiff", route_prefix="/")
        yield f"http://127.0.0.1:{port}", handle
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_concurrent_requests(ray_app, tiny_pipeline, tiny_loras: dict[str, Path]) -> None:
    url, _ = ray_app
    assert httpx.get(f"{url}/readyz").status_code == 200
    requests = [("a photo of a cat", seed, "tiny") for seed in range(8)] + [("a photo of a cat", 3, "pixel")]

    def one(request: tuple[str, int, str]):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        raw = client.images.with_raw_response.generate(
            model=request[2], prompt=request[0], size="64x64", extra_body={"seed": request[1], "num_inference_steps": 4}
        )
        return raw.headers["x-fastdiff-replica"], decode(raw.parse().data[0].b64_json)

    with ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(one, requests))
    assert len({replica for replica, _ in answers}) == 2
    with loras_loaded(tiny_pipeline, {"pixel": tiny_loras["pixel"]}):
        for (prompt, seed, model), (_, image) in zip(requests, answers, strict=True):
            lora = None if model == "tiny" else model
            assert_same_image(image, alone(merged(tiny_pipeline, lora), prompt, seed)[0])


def replicas(handle) -> dict[str, int]:
    """Replica id -> process id, asked of the replicas through the deployment's handle until both have answered."""
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < deadline:
        try:
            info = handle.replica_info.remote().result(timeout_s=30)
        except ray.exceptions.RayError:  # sent to a replica that died meanwhile
            continue
        seen[info["replica"]] = info["pid"]
    return seen


def busy_replica(handle) -> tuple[str, int]:
    """A replica that has requests queued or running (id, process id), as it answers through the handle."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = handle.replica_info.remote().result(timeout_s=30)
        if info["busy"]:
            return info["replica"], info["pid"]
    raise AssertionError("no replica was busy")


def test_a_killed_replica_is_replaced_and_no_request_is_lost(ray_app, tiny_pipeline) -> None:
    url, handle = ray_app
    assert len(replicas(handle)) == 2
    attempts: dict[int, int] = {}
    answered: dict[int, list] = {}
    lock = threading.Lock()
    under_way = threading.Event()  # a few answers are in: both replicas are busy with the rest

    def request(seed: int) -> None:
        """One logical request, retried with the same body (and so the same seed) when its replica died under it."""
        body = {"prompt": "a red bus", "size": "64x64", "seed": seed, "num_inference_steps": 20}
        for _ in range(10):
            with lock:
                attempts[seed] = attempts.get(seed, 0) + 1
            try:
                response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)
            except httpx.TransportError:
                continue
            if response.status_code == 200:
                with lock:
                    answered.setdefault(seed, []).append(decode(response.json()["data"][0]["b64_json"]))
                    if len(answered) >= 4:
                        under_way.set()
                return
            assert response.status_code >= 500, response.text  # a dead replica's request fails; nothing else may
            time.sleep(0.5)

    seeds = list(range(100, 124))
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(request, seed) for seed in seeds]
        assert under_way.wait(120)
        victim_id, victim_pid = busy_replica(handle)  # killed with requests on it: they are lost unless retried
        os.kill(victim_pid, signal.SIGKILL)
        for f in futures:
            f.result()
    assert sorted(answered) == seeds and all(len(images) == 1 for images in answered.values())
    for seed in seeds:
        assert_same_image(answered[seed][0], alone(tiny_pipeline, "a red bus", seed, steps=20)[0])
    retried = sum(n - 1 for n in attempts.values())
    assert retried >= 1  # some requests were on the replica when it died: their retries are what came back

    deadline = time.monotonic() + 120
    after: dict[str, int] = {}
    while time.monotonic() < deadline:
        after = replicas(handle)
        if len(after) == 2 and victim_id not in after:
            break
        time.sleep(1)
    assert len(after) == 2 and victim_id not in after, after  # Serve started a replacement
    assert httpx.get(f"{url}/readyz").status_code == 200
