"""Dynamic batching and the server's states, in process (ImageService over the tiny artifact; HTTP through httpx's
ASGI transport where a route is under test): which requests share a pipeline call, that each gets the images it gets
alone, that a scheduler drawing its own noise runs requests alone, and readiness before, during and after the load."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_helpers import alone, assert_same_image, decode

from fastdiff.runtime.serve.api import ImageRequest
from fastdiff.runtime.serve.app import create_app
from fastdiff.runtime.serve.model import ServedModel, load_fastdiff, scheduler_draws_noise
from fastdiff.runtime.serve.service import ImageService


class Recording:
    """The pipeline, recording the prompts of each call."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.calls: list[list[str]] = []

    def __call__(self, prompt, **kwargs):
        self.calls.append([prompt] if isinstance(prompt, str) else list(prompt))
        return self.pipe(prompt, **kwargs)


@pytest.fixture(scope="module")
def model(tiny_artifact: Path) -> ServedModel:
    return load_fastdiff(tiny_artifact, device="cpu")


def serve_all(model: ServedModel, requests: list[ImageRequest], **options) -> tuple[list[dict], list[list[str]]]:
    """The requests sent at once, in order; their answers and the pipeline calls that made them."""
    recording = Recording(model.pipe)
    service = ImageService(lambda: dataclasses.replace(model, pipe=recording), **options)

    async def run() -> list[dict]:
        await service.start()
        try:
            return await asyncio.gather(*(service.generate(r) for r in requests))
        finally:
            await service.close()

    return asyncio.run(run()), recording.calls


def test_requests_that_can_share_a_call_do_and_each_gets_its_own_images(model: ServedModel, tiny_pipeline) -> None:
    """Batch size 2 (images). Calls group requests of one resolution, step count, guidance and negative-prompt-or-not,
    oldest first, counting a request of n images as n."""
    requests = [
        ImageRequest(prompt="a photo of a cat", seed=1, num_inference_steps=4),
        ImageRequest(prompt="a photo of a cat", seed=2, num_inference_steps=4, negative_prompt="blurry"),
        ImageRequest(prompt="a red bus", seed=3, num_inference_steps=4, n=2),  # does not fit beside the first
        ImageRequest(prompt="a green field", seed=4, num_inference_steps=4),  # joins the first
        ImageRequest(prompt="a green field", seed=5, num_inference_steps=3),  # other steps
        ImageRequest(prompt="a blue sky", seed=6, num_inference_steps=4, negative_prompt="dark"),  # joins the second
        ImageRequest(prompt="a blue sky", seed=7, num_inference_steps=4, guidance_scale=2.0),  # other guidance
        ImageRequest(prompt="a tall tree", seed=8, num_inference_steps=4, size="96x64"),  # other size
    ]
    answers, calls = serve_all(model, requests, batch_wait_s=0.5)
    assert calls == [
        ["a photo of a cat", "a green field"],
        ["a photo of a cat", "a blue sky"],
        ["a red bus", "a red bus"],
        ["a green field"],
        ["a blue sky"],
        ["a tall tree"],
    ]
    for request, answer in zip(requests, answers, strict=True):
        size = {"height": 64, "width": 96} if request.size == "96x64" else {"height": 64, "width": 64}
        expected = alone(
            tiny_pipeline,
            request.prompt,
            request.seed,
            n=request.n,
            steps=request.num_inference_steps,
            negative_prompt=request.negative_prompt,
            guidance_scale=request.guidance_scale,
            **size,
        )
        got = [decode(d["b64_json"]) for d in answer["data"]]
        assert len(got) == request.n and answer["seed"] == request.seed
        for g, e in zip(got, expected, strict=True):
            assert_same_image(g, e)
    first, fourth = (decode(answers[i]["data"][0]["b64_json"]) for i in (0, 3))
    assert np.abs(first.astype(int) - fourth).max() > 1  # the comparison tells batch-mates apart


def test_a_scheduler_that_draws_noise_runs_each_request_alone(tiny_artifact: Path) -> None:
    """Euler ancestral adds noise from the generator at each step: requests then run one per call, with their own
    generator, and get the pipeline's images for their seed exactly."""
    from diffusers import EulerAncestralDiscreteScheduler

    model = load_fastdiff(tiny_artifact, device="cpu")
    model.pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(model.pipe.scheduler.config)
    model = dataclasses.replace(model, rows_independent=not scheduler_draws_noise(model.pipe.scheduler))
    assert not model.rows_independent
    requests = [ImageRequest(prompt=p, seed=s, num_inference_steps=4) for p, s in (("a cat", 1), ("a dog", 2))]
    answers, calls = serve_all(model, requests, batch_wait_s=0.5)
    assert calls == [["a cat"], ["a dog"]]
    for request, answer in zip(requests, answers, strict=True):
        expected = alone(model.pipe, request.prompt, request.seed)[0]
        assert np.array_equal(decode(answer["data"][0]["b64_json"]), expected)


@pytest.mark.parametrize(
    ("name", "config", "draws"),
    [
        ("EulerDiscreteScheduler", {}, False),
        ("EulerAncestralDiscreteScheduler", {}, True),
        ("DDIMScheduler", {}, False),
        ("DDPMScheduler", {}, True),
        ("PNDMScheduler", {}, False),
        ("DPMSolverMultistepScheduler", {}, False),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, True),
    ],
)
def test_which_schedulers_draw_noise(name: str, config: dict, draws: bool) -> None:
    import diffusers

    scheduler = getattr(diffusers, name)(**config)
    assert scheduler_draws_noise(scheduler) is draws


def test_readiness_follows_the_load_and_the_drain(model: ServedModel) -> None:
    """/readyz is 503 while the model loads (the event loop goes on answering /healthz), 200 once it is loaded, and
    503 again from the drain's start; generation requests get 503 while loading and while draining."""
    gate = threading.Event()

    def slow_load() -> ServedModel:
        gate.wait(30)
        return model

    service = ImageService(slow_load)
    app = create_app(service, start_service=False)
    body = {"prompt": "a cat", "num_inference_steps": 2}

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/readyz")).status_code == 503
            loading = asyncio.create_task(service.start())
            await asyncio.sleep(0.05)
            readyz = await client.get("/readyz")
            assert (readyz.status_code, readyz.json()) == (503, {"status": "loading"})
            assert (await client.get("/healthz")).status_code == 200
            refused = await client.post("/v1/images/generations", json=body)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "loading"
            gate.set()
            await loading
            assert (await client.get("/readyz")).status_code == 200
            assert (await client.post("/v1/images/generations", json=body)).status_code == 200
            assert await service.drain(5)
            assert (await client.get("/readyz")).status_code == 503
            assert (await client.post("/v1/images/generations", json=body)).status_code == 503
        await service.close()

    asyncio.run(run())
