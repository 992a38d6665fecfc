"""fastdiff-serve end to end: a real server process on 127.0.0.1 over the tiny CPU artifact, called through the
official `openai` client and httpx: images, seeds, LoRAs, auth, refusals, concurrent clients batched, metrics,
deadlines, a full queue, disconnects, and SIGTERM's drain."""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from safetensors.torch import save_file
from serve_helpers import alone, assert_same_image, decode, loras_loaded, merged, serve_command, serving, sigterm

KEY = "test-key"
# batch-wait: concurrent test clients start within it, so their requests share calls
MAIN_ARGS = ["--api-key", KEY, "--batch-wait-ms", "300", "--max-steps", "100000"]
# a server to fill and to time out: 2 requests may wait, each gets 6 s (time to fill the queue on a busy machine)
TIGHT_ARGS = ["--max-queue", "2", "--request-timeout", "6", "--batch-wait-ms", "0", "--max-steps", "100000"]
LONG = {"num_inference_steps": 100000}  # many minutes: a request that ends early was stopped
PROMPT = "a photo of a cat"


def lora_args(loras: dict[str, Path]) -> list[str]:
    return [arg for name, path in loras.items() for arg in ("--lora", f"{name}={path}")]


@pytest.fixture(scope="module")
def server(tiny_artifact: Path, tiny_loras: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with serving(tiny_artifact, log, *MAIN_ARGS, *lora_args(tiny_loras)) as server:
        yield server


@pytest.fixture(scope="module")
def tight(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory):
    with serving(tiny_artifact, tmp_path_factory.mktemp("serve") / "tight.log", *TIGHT_ARGS) as server:
        yield server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def generate(client: openai.OpenAI, prompt: str, seed: int | None, n: int = 1, model: str = "tiny", **extra):
    body = {"num_inference_steps": 4, **extra} | ({} if seed is None else {"seed": seed})
    return client.images.generate(
        model=model, prompt=prompt, n=n, size="64x64", response_format="b64_json", extra_body=body
    )


def post(server, body: dict, key: str | None = KEY, timeout: float = 60) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/v1/images/generations", json=body, headers=headers, timeout=timeout)


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.url}/metrics").text
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match[1]) if match else 0.0


def test_openai_client_generates_the_pipelines_images(server, client, tiny_pipeline) -> None:
    result = generate(client, "a photo of a cat", seed=7, n=2)
    images = [decode(d.b64_json) for d in result.data]
    for got, expected in zip(images, alone(tiny_pipeline, "a photo of a cat", 7, n=2), strict=True):
        assert_same_image(got, expected)
    assert np.abs(images[0].astype(int) - images[1]).max() > 1  # two images, not one twice
    assert result.model_extra["seed"] == 7 and result.size == "64x64"


def test_same_seed_same_bytes_and_a_drawn_seed_is_returned(server, client) -> None:
    first, again = generate(client, "a red bus", seed=11), generate(client, "a red bus", seed=11)
    assert first.data[0].b64_json == again.data[0].b64_json
    response = post(server, {"prompt": "a red bus", "size": "64x64", "num_inference_steps": 4})
    assert response.status_code == 200
    seed = response.json()["seed"]
    assert response.headers["x-fastdiff-seed"] == str(seed)
    replay = generate(client, "a red bus", seed=seed)
    assert replay.data[0].b64_json == response.json()["data"][0]["b64_json"]


def test_output_formats_and_the_default_size(server) -> None:
    for fmt, magic in (("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")):
        body = {"prompt": "a cat", "num_inference_steps": 2, "output_format": fmt, "seed": 1}
        response = post(server, body)
        assert response.status_code == 200, response.text
        assert base64.b64decode(response.json()["data"][0]["b64_json"]).startswith(magic)
        assert response.json()["size"] == "64x64"  # the tiny model's default


def test_probes_and_models(server) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "alive"}
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    # the artifact folder's name (conftest's session export), then the LoRAs as models of their own
    assert [(m["id"], m["parent"]) for m in models["data"]] == [("tiny", None), ("pixel", "tiny"), ("ink", "tiny")]


def test_loras_by_name_each_image_the_pipelines_with_it_merged(
    server, client, tiny_pipeline, tiny_loras: dict[str, Path]
) -> None:
    """Requests one after another for the base and the LoRAs (by `lora`, or the LoRA's id as `model`): each image is
    the pipeline's with that LoRA merged, the base's bytes again right after a LoRA; the server merges a LoRA only
    when the request's differs from the merged one."""
    fields = {"num_inference_steps": 2}
    base = generate(client, PROMPT, 21, **fields)  # the base merged, whatever earlier tests left
    switches = metric(server, "fastdiff_lora_switches_total")
    pixel_images = metric(server, "fastdiff_images_total", '{model="pixel"}')
    asks = [  # (the model, fastdiff's fields), the LoRA and weight it selects
        (("tiny", {"lora": "pixel"}), ("pixel", 1.0)),
        (("pixel", {}), ("pixel", 1.0)),  # the same LoRA: no switch
        (("tiny", {}), (None, 1.0)),
        (("tiny", {"lora": "ink", "lora_scale": 0.5}), ("ink", 0.5)),
        (("ink", {"lora": "ink"}), ("ink", 1.0)),  # another weight: a switch
        (("dall-e-3", {}), (None, 1.0)),  # neither the model's id nor a LoRA's: the base, as before LoRAs
    ]
    answers = [
        decode(generate(client, PROMPT, 21, model=model, **fields, **extra).data[0].b64_json)
        for (model, extra), _ in asks
    ]
    assert metric(server, "fastdiff_lora_switches_total") - switches == 5
    assert metric(server, "fastdiff_images_total", '{model="pixel"}') - pixel_images == 2
    with loras_loaded(tiny_pipeline, tiny_loras):
        expected = {ask: alone(merged(tiny_pipeline, *ask), PROMPT, 21, steps=2)[0] for ask in {a for _, a in asks}}
    for got, (_, ask) in zip(answers, asks, strict=True):
        assert_same_image(got, expected[ask])
    assert np.abs(answers[0].astype(int) - answers[2]).max() > 1  # the LoRA changes the image
    assert np.array_equal(answers[2], decode(base.data[0].b64_json))  # the base, exactly, after a LoRA


def test_auth(server) -> None:
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.images.generate(prompt="a cat", size="64x64")
    assert info.value.body["code"] == "invalid_api_key"
    response = post(server, {"prompt": "a cat"}, key=None)
    assert response.status_code == 401 and response.json()["error"]["message"] == "Missing API key"
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # probes and metrics take no key


@pytest.mark.parametrize(
    ("body", "param", "phrase"),
    [
        ({"prompt": "a cat", "size": "512x512"}, "size", "this model serves 64x64, 96x64"),
        ({"prompt": "a cat", "size": "big"}, "size", "not available"),
        ({"prompt": "a cat", "n": 0}, "n", "between 1 and 10"),
        ({"prompt": "a cat", "n": 11}, "n", "between 1 and 10"),
        ({"prompt": "a cat", "n": "2"}, "n", "valid integer"),
        ({"prompt": "a cat", "num_inference_steps": 0}, "num_inference_steps", "between 1 and 100000"),
        ({"prompt": "a cat", "guidance_scale": -1}, "guidance_scale", "between 0 and 100"),
        ({"prompt": "a cat", "guidance_scale": "high"}, "guidance_scale", "valid number"),
        ({"prompt": "a cat", "seed": -1}, "seed", "greater than or equal to 0"),
        ({"prompt": "a cat", "response_format": "url"}, "response_format", "use b64_json"),
        ({"prompt": "a cat", "output_format": "gif"}, "output_format", "'png', 'jpeg' or 'webp'"),
        ({"prompt": "a cat", "steps": 4}, "steps", "Unrecognized request argument"),
        ({"size": "64x64"}, "prompt", "Missing required parameter"),
        ({"prompt": "a cat", "lora": "nope"}, "lora", "lora 'nope' is not loaded; loaded: pixel, ink"),
        ({"prompt": "a cat", "model": "pixel", "lora": "ink"}, "lora", "name different LoRAs"),
        ({"prompt": "a cat", "lora_scale": 0.5}, "lora_scale", "needs a LoRA"),
        ({"prompt": "a cat", "lora": "ink", "lora_scale": "strong"}, "lora_scale", "valid number"),
        ({"prompt": "a cat", "lora": "ink", "lora_scale": 1e6}, "lora_scale", "between -10 and 10"),
    ],
)
def test_bad_requests_get_400_in_openais_shape(server, body: dict, param: str, phrase: str) -> None:
    response = post(server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert phrase in error["message"], error["message"]


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"[1, 2]",
        b'{"prompt": "a", "guidance_scale": Infinity}',
        b"\xff",
        b'{"prompt": "a", "user": ' + b"1" * 5000 + b"}",  # over Python's 4300 digits
        b"[" * 100_000,  # nested past the parser's recursion limit
    ],
)
def test_malformed_bodies_get_400(server, raw: bytes) -> None:
    response = httpx.post(
        f"{server.url}/v1/images/generations", content=raw, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_body_over_a_mib_gets_413(server) -> None:
    body = json.dumps({"prompt": "a cat", "user": "x" * (1 << 20)}).encode()
    for headers in ({}, {"Transfer-Encoding": "chunked"}):  # a declared length, and none (chunks counted)
        content = body if not headers else iter([body[: 1 << 19], body[1 << 19 :]])
        response = httpx.post(
            f"{server.url}/v1/images/generations",
            content=content,
            headers={"Authorization": f"Bearer {KEY}", **headers},
        )
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_null_n_and_output_format_take_their_defaults(server) -> None:
    """As OpenAI's API: the openai client sends null for n=None."""
    response = post(server, {"prompt": "a cat", "n": None, "output_format": None, "num_inference_steps": 2})
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 1 and response.json()["output_format"] == "png"


def test_the_openai_client_raises_its_own_errors(client) -> None:
    with pytest.raises(openai.BadRequestError, match="this model serves 64x64, 96x64"):
        client.images.generate(prompt="a cat", size="1024x1024")


def test_four_concurrent_clients_each_get_their_own_images(server, tiny_pipeline) -> None:
    """Four clients at once, different prompts and seeds, while the others' bad requests come in: the server batches
    them (two calls of two images, the artifact's batch) and each gets what it gets alone."""
    requests = [("a photo of a cat", 1), ("a red bus", 2), ("a green field", 3), ("a photo of a cat", 4)]
    calls_before = metric(server, "fastdiff_batch_images_count")
    two_image_calls_before = metric(server, "fastdiff_batch_images_bucket", '{le="2.0"}') - metric(
        server, "fastdiff_batch_images_bucket", '{le="1.0"}'
    )

    clients = [openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120) for _ in requests]

    def one(client: openai.OpenAI, request: tuple[str, int]) -> np.ndarray:
        return decode(generate(client, request[0], request[1]).data[0].b64_json)

    with ThreadPoolExecutor(6) as pool:
        bad = [pool.submit(post, server, {"prompt": "a cat", "size": "1x1"}) for _ in range(2)]
        images = list(pool.map(one, clients, requests))
    assert all(b.result().status_code == 400 for b in bad)
    for (prompt, seed), got in zip(requests, images, strict=True):
        assert_same_image(got, alone(tiny_pipeline, prompt, seed)[0])
    assert np.abs(images[0].astype(int) - images[3]).max() > 1  # the same prompt, another seed: another image
    calls = metric(server, "fastdiff_batch_images_count") - calls_before
    two_image_calls = (
        metric(server, "fastdiff_batch_images_bucket", '{le="2.0"}')
        - metric(server, "fastdiff_batch_images_bucket", '{le="1.0"}')
        - two_image_calls_before
    )
    assert calls < 4 and two_image_calls >= 1, f"{calls} calls for 4 requests, {two_image_calls} of 2 images"


def test_deadline_full_queue_and_the_interrupted_batch(tight) -> None:
    """A request running past --request-timeout gets 504, and so do those queued behind it; with 2 queued, the next
    gets 429 with Retry-After. The expired batch stops at its next step: a request right after is answered at once,
    not after its many steps."""
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(post, tight, {"prompt": PROMPT, **LONG}, None)
        wait_for(lambda: metric(tight, "fastdiff_batch_images_count") == 1)  # it runs
        queued = [pool.submit(post, tight, {"prompt": "a dog", **LONG}, None) for _ in range(2)]
        wait_for(lambda: metric(tight, "fastdiff_queue_depth") == 2)
        full = post(tight, {"prompt": "a bird"}, None)
        assert full.status_code == 429, full.text
        assert int(full.headers["retry-after"]) >= 1 and full.json()["error"]["code"] == "queue_full"
        assert running.result().status_code == 504
        assert [q.result().status_code for q in queued] == [504, 504]  # each ran into its deadline, or waited to it
    start = time.monotonic()
    assert post(tight, {"prompt": PROMPT, "num_inference_steps": 2}, None).status_code == 200
    assert time.monotonic() - start < 15
    assert metric(tight, "fastdiff_dropped_requests_total", '{reason="deadline"}') == 3
    assert metric(tight, "fastdiff_requests_total", '{status="504"}') == 3


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_client_that_leaves_is_dropped(server) -> None:
    """A queued request whose client disconnects leaves the queue; a running batch whose every client left stops
    at its next step."""
    dropped = metric(server, "fastdiff_dropped_requests_total", '{reason="disconnected"}')
    calls = metric(server, "fastdiff_batch_images_count")

    def leave(body: dict, after: float) -> None:
        with pytest.raises(httpx.ReadTimeout):
            post(server, body, timeout=after)  # the client gives up and closes the connection

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(leave, {"prompt": PROMPT, **LONG}, 4.0)
        wait_for(lambda: metric(server, "fastdiff_batch_images_count") == calls + 1)  # it runs
        second = pool.submit(leave, {"prompt": "a dog", **LONG}, 1.0)  # waits behind it, and leaves first
        second.result()
        first.result()
    start = time.monotonic()
    assert post(server, {"prompt": PROMPT, "num_inference_steps": 2}).status_code == 200
    assert time.monotonic() - start < 15  # not after the first's many steps
    assert metric(server, "fastdiff_dropped_requests_total", '{reason="disconnected"}') - dropped == 2
    assert metric(server, "fastdiff_batch_images_count") == calls + 2  # the second never ran


def test_metrics(server) -> None:
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        'fastdiff_requests_total{status="200"}',
        'fastdiff_requests_total{status="400"}',
        'fastdiff_requests_total{status="401"}',
        'fastdiff_requests_total{status="499"}',
        "fastdiff_request_seconds_count",
        "fastdiff_queue_wait_seconds_count",
        "fastdiff_batch_images_count",
        'fastdiff_images_total{model="tiny"}',
        'fastdiff_images_total{model="ink"}',
        "fastdiff_lora_switches_total",
    ):
        assert re.search(rf"^{re.escape(name)} [1-9]", text, re.M), name
    assert metric(server, "fastdiff_load_seconds") > 0
    assert metric(server, "fastdiff_ready") == 1
    assert metric(server, "fastdiff_queue_depth") == 0


def test_sigterm_drains(tiny_artifact: Path, tmp_path: Path) -> None:
    """SIGTERM: /readyz 503 at once, new requests 503, the running and the queued request finish, exit 0."""
    with serving(tiny_artifact, tmp_path / "server.log", "--max-steps", "100000") as server:
        with ThreadPoolExecutor(2) as pool:
            body = {"prompt": "a cat", "num_inference_steps": 500, "size": "64x64"}  # seconds each
            # a generous deadline: on a busy 2-core machine the pair took over a minute
            running = pool.submit(post, server, body, None, 300)
            wait_for(lambda: metric(server, "fastdiff_batch_images_count") == 1)
            queued = pool.submit(post, server, {**body, "size": "96x64"}, None, 300)
            wait_for(lambda: metric(server, "fastdiff_queue_depth") == 1)
            sigterm(server)
            wait_for(lambda: httpx.get(f"{server.url}/readyz").status_code == 503, timeout=5)
            refused = post(server, {"prompt": "a cat"}, None)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            assert running.result().status_code == 200 and queued.result().status_code == 200
        assert server.proc.wait(30) == 0, server.output()[-2000:]


def test_second_sigterm_exits_at_once(tiny_artifact: Path, tmp_path: Path) -> None:
    with serving(tiny_artifact, tmp_path / "server.log", "--max-steps", "100000") as server:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(post, server, {"prompt": "a cat", **LONG}, None)
            wait_for(lambda: metric(server, "fastdiff_batch_images_count") == 1)
            sigterm(server)
            wait_for(lambda: httpx.get(f"{server.url}/readyz").status_code == 503, timeout=5)
            start = time.monotonic()
            sigterm(server)
            assert server.proc.wait(15) == 1
            assert time.monotonic() - start < 10
            stopped = running.result()  # its batch stopped at its next step
            assert stopped.status_code == 503 and stopped.json()["error"]["code"] == "stopped"
    assert "stopped before the requests in flight finished" in server.output()


def test_a_model_that_cannot_load_ends_the_server(tiny_artifact: Path, tmp_path: Path) -> None:
    """A CPU artifact asked to run on a GPU (none here, or not the artifact's kind): the load fails in the background;
    the server exits 2 with the loader's one-line error."""
    proc = subprocess.run(
        serve_command(tiny_artifact, 0, "--device", "cuda"), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(r"^error: .*cuda", proc.stderr, re.M | re.I), proc.stderr[-2000:]


def test_another_artifact_than_the_pinned_one_ends_the_server(tiny_artifact: Path) -> None:
    """--expect-digest: an artifact with another digest is never loaded; the server exits 2 naming both digests."""
    other = "sha256:" + "1" * 64
    proc = subprocess.run(
        serve_command(tiny_artifact, 0, "--expect-digest", other), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(rf"^error: .*not the expected {other}", proc.stderr, re.M), proc.stderr[-2000:]


def test_a_lora_the_artifact_refuses_ends_the_server(tiny_artifact: Path, tmp_path: Path) -> None:
    """A --lora file that is no LoRA: the load refuses it after the model's; the server exits 2 naming it."""
    save_file({"unet.conv_in.weight": torch.zeros(1)}, tmp_path / "bad.safetensors")
    command = serve_command(tiny_artifact, 0, "--lora", f"bad={tmp_path / 'bad.safetensors'}")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(r"^error: LoRA bad=.*bad\.safetensors: .*not a LoRA", proc.stderr, re.M), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_lora_named_as_the_model_is_refused(tiny_artifact: Path, tiny_loras: dict[str, Path]) -> None:
    from fastdiff.runtime import FastDiffError
    from fastdiff.runtime.serve.model import load_fastdiff

    with pytest.raises(FastDiffError, match="the LoRA name 'tiny' is the model's own"):
        load_fastdiff(tiny_artifact, "cpu", loras={"tiny": tiny_loras["pixel"]})


def test_bad_command_lines(tiny_artifact: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fastdiff.runtime.serve.cli import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        result = CliRunner().invoke(main, [str(tmp_path)])
        assert result.exit_code == 2 and "error:" in result.stderr and "Traceback" not in result.output
        result = CliRunner().invoke(main, [str(tiny_artifact), "--expect-digest", "md5:abc"])
        assert result.exit_code == 2 and "sha256:" in result.stderr
        result = CliRunner().invoke(main, [str(tiny_artifact), "--default-steps", "50", "--max-steps", "40"])
        assert result.exit_code == 2 and "above --max-steps" in result.stderr
        lora = tmp_path / "lora.safetensors"
        lora.touch()
        for loras, phrase in (
            (["pixel"], "--lora 'pixel' is not NAME=FILE"),
            (["=lora.safetensors"], "is not NAME=FILE"),
            (["pixel="], "is not NAME=FILE"),
            ([f"pixel={lora}", f"pixel={lora}"], "--lora names 'pixel' twice"),
            ([f"pixel={tmp_path / 'nowhere.safetensors'}"], "nowhere.safetensors: no such file"),
        ):
            result = CliRunner().invoke(main, [str(tiny_artifact), *(a for v in loras for a in ("--lora", v))])
            assert result.exit_code == 2, result.output
            assert result.stderr.startswith("error: ") and "\n  fix: " in result.stderr, result.stderr
            assert result.stderr.count("\n") == 2, result.stderr  # the error and its fix, nothing else
            assert phrase in result.stderr, result.stderr
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
