"""Dynamic batching and the server's states, in process (ImageService over the tiny artifact; HTTP through httpx's
ASGI transport where a route is under test): which requests share a pipeline call, that each gets the images it gets
alone, that requests for other LoRAs never share a call and each is served with its LoRA merged, that a scheduler
drawing its own noise runs requests alone, and readiness before, during and after the load."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_helpers import alone, assert_same_image, decode, loras_loaded, merged

from fastdiff.runtime import FastDiffError
from fastdiff.runtime.serve.api import ImageRequest
from fastdiff.runtime.serve.app import create_app
from fastdiff.runtime.serve.metrics import ServeMetrics
from fastdiff.runtime.serve.model import ServedModel, load_fastdiff, scheduler_draws_noise
from fastdiff.runtime.serve.service import ImageService


class Recording:
    """The pipeline, recording the prompts of each call (and the adapters merged for it, in `adapters`)."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.calls: list[list[str]] = []
        self.adapters: list[list[str]] = []

    def __call__(self, prompt, **kwargs):
        self.calls.append([prompt] if isinstance(prompt, str) else list(prompt))
        self.adapters.append(self.pipe.get_active_adapters())
        return self.pipe(prompt, **kwargs)

    def set_adapters(self, *args) -> None:
        self.pipe.set_adapters(*args)


@pytest.fixture(scope="module")
def model(tiny_artifact: Path) -> ServedModel:
    return load_fastdiff(tiny_artifact, device="cpu")


def serve_all(model: ServedModel, requests: list[ImageRequest], **options) -> tuple[list[dict], Recording]:
    """The requests sent at once, in order; their answers, and the pipeline calls that made them."""
    recording = Recording(model.pipe)
    service = ImageService(lambda: dataclasses.replace(model, pipe=recording), **options)

    async def run() -> list[dict]:
        await service.start()
        try:
            return await asyncio.gather(*(service.generate(r) for r in requests))
        finally:
            await service.close()

    return asyncio.run(run()), recording


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
    answers, recording = serve_all(model, requests, batch_wait_s=0.5)
    assert recording.calls == [
        ["a photo of a cat", "a green field"],
        ["a photo of a cat", "a blue sky"],
        ["a red bus", "a red bus"],
        ["a green field"],
        ["a blue sky"],
        ["a tall tree"],
    ]
    for request, answer in zip(requests, answers, strict=True):
        n = request.n or 1
        size = {"height": 64, "width": 96} if request.size == "96x64" else {"height": 64, "width": 64}
        expected = alone(
            tiny_pipeline,
            request.prompt,
            request.seed,
            n=n,
            steps=request.num_inference_steps,
            negative_prompt=request.negative_prompt,
            guidance_scale=request.guidance_scale,
            **size,
        )
        got = [decode(d["b64_json"]) for d in answer["data"]]
        assert len(got) == n and answer["seed"] == request.seed
        for g, e in zip(got, expected, strict=True):
            assert_same_image(g, e)
    first, fourth = (decode(answers[i]["data"][0]["b64_json"]) for i in (0, 3))
    assert np.abs(first.astype(int) - fourth).max() > 1  # the comparison tells batch-mates apart


def test_requests_for_other_loras_never_share_a_call(model: ServedModel, tiny_loras: dict[str, Path]) -> None:
    """Calls group requests of one LoRA at one weight (`lora`, or the LoRA's id as `model`); before a call the worker
    merges its LoRA only if another is merged, and each request gets the pipeline's images with its LoRA merged, the
    base's without one, also right after a LoRA's call."""
    requests = [
        ImageRequest(prompt="a photo of a cat", seed=1, num_inference_steps=4),
        ImageRequest(prompt="a red bus", seed=2, num_inference_steps=4, lora="pixel"),
        ImageRequest(prompt="a blue sky", seed=3, num_inference_steps=4, lora="ink"),
        ImageRequest(prompt="a tall tree", seed=4, num_inference_steps=4, lora="pixel", lora_scale=0.5),
        ImageRequest(prompt="a green field", seed=5, num_inference_steps=4, model="pixel"),  # joins the second
        ImageRequest(prompt="a dog", seed=6, num_inference_steps=4, model="dall-e-3"),  # not a LoRA: joins the first
        ImageRequest(prompt="a photo of a cat", seed=7, num_inference_steps=4),  # the first's call is full
    ]
    metrics = ServeMetrics()
    with loras_loaded(model.pipe, tiny_loras):
        lora_model = dataclasses.replace(model, loras=tuple(tiny_loras))
        answers, recording = serve_all(lora_model, requests, batch_wait_s=0.5, metrics=metrics)
        assert recording.calls == [
            ["a photo of a cat", "a dog"],
            ["a red bus", "a green field"],
            ["a blue sky"],
            ["a tall tree"],
            ["a photo of a cat"],
        ]
        assert recording.adapters == [[], ["pixel"], ["ink"], ["pixel"], []]
        assert metrics.registry.get_sample_value("fastdiff_lora_switches_total") == 4  # none before the base's call
        lora_of = [(None, 1.0), ("pixel", 1.0), ("ink", 1.0), ("pixel", 0.5), ("pixel", 1.0), (None, 1.0), (None, 1.0)]
        for request, answer, (lora, scale) in zip(requests, answers, lora_of, strict=True):
            got = decode(answer["data"][0]["b64_json"])
            assert_same_image(got, alone(merged(model.pipe, lora, scale), request.prompt, request.seed)[0])
            if lora is not None:  # the LoRA changes the image: the comparison above tells LoRAs apart
                base = alone(merged(model.pipe, None), request.prompt, request.seed)[0]
                assert np.abs(got.astype(int) - base).max() > 1
    images = metrics.registry.get_sample_value
    assert [images("fastdiff_images_total", {"model": m}) for m in (model.name, "pixel", "ink")] == [3, 3, 1]


def test_a_scheduler_that_draws_noise_runs_each_request_alone(tiny_artifact: Path) -> None:
    """Euler ancestral adds noise from the generator at each step: requests then run one per call, with their own
    generator, and get the pipeline's images for their seed exactly."""
    from diffusers import EulerAncestralDiscreteScheduler

    model = load_fastdiff(tiny_artifact, device="cpu")
    model.pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(model.pipe.scheduler.config)
    model = dataclasses.replace(model, rows_independent=not scheduler_draws_noise(model.pipe.scheduler))
    assert not model.rows_independent
    requests = [ImageRequest(prompt=p, seed=s, num_inference_steps=4) for p, s in (("a cat", 1), ("a dog", 2))]
    answers, recording = serve_all(model, requests, batch_wait_s=0.5)
    assert recording.calls == [["a cat"], ["a dog"]]
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


class Failing:
    """A pipeline whose calls raise `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __call__(self, prompt, **kwargs):
        raise self.error


@pytest.mark.parametrize(
    ("error", "message", "traceback"),
    [
        (FastDiffError("the generation gave NaN", "check it"), "failed to generate the image: the generation", False),
        (RuntimeError("a bug"), "failed to generate the image (RuntimeError)", True),
    ],
)
def test_a_failed_generation_is_a_500_and_one_log_record(
    model: ServedModel, caplog: pytest.LogCaptureFixture, error: Exception, message: str, traceback: bool
) -> None:
    """The pipeline's own error: a 500 naming it, one line in the log; anything else: a 500 naming its type, its
    traceback in the log. Nothing escapes the app (the server would log a second traceback for each request)."""
    service = ImageService(lambda: dataclasses.replace(model, pipe=Failing(error)))
    app = create_app(service, start_service=False)

    async def run() -> httpx.Response:
        await service.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                return await client.post("/v1/images/generations", json={"prompt": "a cat", "num_inference_steps": 2})
        finally:
            await service.close()

    response = asyncio.run(run())
    assert response.status_code == 500 and message in response.json()["error"]["message"]
    failed = [r for r in caplog.records if r.getMessage().startswith("request failed")]
    assert len(failed) == 1 and (failed[0].exc_info is not None) == traceback


def test_a_stop_while_loading_is_not_a_failed_load(model: ServedModel) -> None:
    """The server stopped (its start cancelled) while the model loads: the service is stopped, not failed (the server
    does not report a load error)."""
    gate = threading.Event()

    def slow_load() -> ServedModel:
        gate.wait(30)
        return model

    service = ImageService(slow_load)

    async def run() -> None:
        loading = asyncio.create_task(service.start())
        await asyncio.sleep(0.05)
        loading.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await loading
        assert service.state == "stopped" and service.load_error is None
        assert await service.wait_idle(0)  # nothing queued: idle at once, even with no time to wait
        await service.close()

    asyncio.run(run())


def test_the_apps_end_ends_its_service(model: ServedModel) -> None:
    """A Ray Serve replica's app (its service started by the replica) ends the service's dispatch loop and pipeline
    thread when Serve runs the app's lifespan shutdown, which it does when it stops the replica."""
    service = ImageService(lambda: model)
    app = create_app(service, start_service=False)

    async def run() -> None:
        await service.start()
        async with app.router.lifespan_context(app):
            assert service.healthy
        assert not service.healthy and service._worker._shutdown

    asyncio.run(run())


def test_a_forced_stop_while_a_batch_waits_for_company_fails_its_requests() -> None:
    """A request waiting (--batch-wait-ms) for others to share its call when a forced stop empties the queue: it fails
    with Stopped, and the dispatch loop goes on (it once tried to take the gone request off the queue and died)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from fastdiff.runtime.format import Resolution
    from fastdiff.runtime.serve.batcher import Batcher, BatchKey, Job, Stopped

    res = Resolution(64, 64)
    idle = ServedModel(None, "m", [res], res, 4, 5.0, lambda r: (4, 8, 8), torch.device("cpu"), torch.float32, True)

    async def scenario() -> None:
        batcher = Batcher(idle, ThreadPoolExecutor(1), ServeMetrics(), max_queue=8, batch_wait_s=0.3)
        loop = asyncio.get_running_loop()
        job = Job(BatchKey(res, 2, 5.0, False, None), "a cat", None, 1, 0, loop.create_future())
        dispatch = asyncio.create_task(batcher.run())
        batcher.submit(job)
        await asyncio.sleep(0.05)  # the dispatch loop now waits for company
        batcher.stop()
        with pytest.raises(Stopped):
            await asyncio.wait_for(job.future, 5)
        await asyncio.sleep(0.5)  # past the wait for company
        assert not dispatch.done(), dispatch.exception() if dispatch.done() else ""
        dispatch.cancel()

    asyncio.run(scenario())
