"""One model served, whatever carries the requests (fastdiff-serve's uvicorn, a Ray Serve replica): loading it on the
worker thread, the server's states (loading, ready, draining), checking a request against the model, batching it,
its deadline, and encoding its images."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..format import Resolution
from .api import OUTPUT_FORMATS, ApiError, ImageRequest
from .batcher import Batcher, BatchKey, Job, QueueFull, Stopped
from .metrics import ServeMetrics
from .model import Adapter, ServedModel

log = logging.getLogger("fastdiff.serve")

SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
RANDOM_SEEDS = 2**53  # drawn seeds stay exact in JavaScript's numbers
MAX_GUIDANCE = 100.0
MAX_LORA_SCALE = 10.0  # beyond it a LoRA swamps the weights (a black image); negative scales are used (sliders)


class ImageService:
    """States: "starting" -> "loading" -> "ready" -> "draining" -> "stopped" (or "failed" when the load fails)."""

    def __init__(
        self,
        load: Callable[[], ServedModel],
        metrics: ServeMetrics | None = None,
        max_queue: int = 64,
        batch_wait_s: float = 0.01,
        request_timeout_s: float = 300.0,
        default_steps: int = 30,
        max_steps: int = 150,
        max_images: int = 10,
    ) -> None:
        self._load = load
        self.metrics = metrics or ServeMetrics()
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.request_timeout_s = request_timeout_s
        self.default_steps = default_steps
        self.max_steps = max_steps
        self.max_images = max_images
        self.state = "starting"
        self.load_error: BaseException | None = None
        self.model: ServedModel | None = None
        self.batcher: Batcher | None = None
        # The pipeline's thread: it loads the model too, so that per-thread state made at load (cuDNN's plans, made by
        # the warm-up) serves the requests.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="fastdiff-pipeline")
        # PNG/JPEG/WebP encoding (zlib lets go of the GIL) beside the pipeline's next batch
        self._encoders = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="fastdiff-encode")
        self._dispatch: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def loras(self) -> tuple[str, ...]:
        """The LoRAs a request may ask for, once the model is loaded."""
        return self.model.loras if self.model is not None else ()

    @property
    def healthy(self) -> bool:
        """Loaded, and its dispatch loop still running (it ends only on a bug: then the replica should go)."""
        return self.state != "failed" and not (self._dispatch is not None and self._dispatch.done())

    async def start(self) -> None:
        """Load and warm up on the worker thread (the event loop goes on answering), then take requests."""
        self.state = "loading"
        start = time.perf_counter()
        try:
            self.model = await asyncio.get_running_loop().run_in_executor(self._worker, self._load)
        except asyncio.CancelledError:  # the server stopped while loading: not a failed load
            self.state = "stopped"
            raise
        except BaseException as e:
            self.state, self.load_error = "failed", e
            raise
        self.metrics.load_seconds.set(time.perf_counter() - start)
        self.batcher = Batcher(self.model, self._worker, self.metrics, self.max_queue, self.batch_wait_s)
        self._dispatch = asyncio.create_task(self.batcher.run(), name="fastdiff-dispatch")
        if self.state == "loading":  # not draining already
            self.state = "ready"
            self.metrics.ready.set(1)
        log.info("ready: %s loaded in %.2f s", self.model.name, time.perf_counter() - start)

    async def generate(self, request: ImageRequest) -> dict[str, Any]:
        """The OpenAI Images API's response for the request (with `seed`, `size` and `output_format` beside its
        `created` and `data`); ApiError when refused."""
        arrived = time.monotonic()
        if self.state in ("draining", "stopped"):
            raise ApiError(
                503, "The server is shutting down; retry on another replica", "server_error", None, "draining"
            )
        if not self.ready or self.batcher is None:
            raise ApiError(503, "The model is still loading", "server_error", None, "loading", {"Retry-After": "1"})
        job = self._job(request)
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            message = f"Too many requests queued ({self.max_queue}); retry after {e.retry_after} s"
            raise ApiError(
                429, message, "rate_limit_error", None, "queue_full", {"Retry-After": str(e.retry_after)}
            ) from None
        except Stopped:
            raise ApiError(503, "The server is shutting down", "server_error", None, "draining") from None
        timeout = arrived + self.request_timeout_s - time.monotonic()
        try:
            images = await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except asyncio.TimeoutError:
            future = job.future
            if future.done() and not future.cancelled() and future.exception() is None:  # done as the deadline passed
                images = future.result()
            else:
                self.batcher.cancel(job, "deadline")
                raise ApiError(504, f"The request took longer than {self.request_timeout_s:g} s", "timeout") from None
        except asyncio.CancelledError:  # the client went away (or the server is stopping)
            self.batcher.cancel(job, "disconnected")
            raise
        except Stopped:
            message = "The server stopped before the request finished"
            raise ApiError(503, message, "server_error", None, "stopped") from None
        fmt = request.output_format or "png"
        encoded = await asyncio.get_running_loop().run_in_executor(
            self._encoders, encode_images, images, fmt, request.output_compression
        )
        adapter = job.key.adapter
        self.metrics.images.labels(adapter.name if adapter else self.model.name).inc(len(encoded))
        return {
            "created": int(time.time()),
            "data": [{"b64_json": image} for image in encoded],
            "output_format": fmt,
            "size": str(job.key.resolution),
            "seed": job.seed,
        }

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests, finish those queued and running; whether they finished within `timeout` s."""
        if self.state != "stopped":
            self.state = "draining"
        self.metrics.ready.set(0)
        return await self.wait_idle(timeout)

    async def wait_idle(self, timeout: float) -> bool:
        """Whether no request is queued or running within `timeout` s."""
        if self.batcher is None or not self.batcher.busy:
            return True  # (wait_for with a timeout of 0 would cancel even an idle wait)
        try:
            await asyncio.wait_for(self.batcher.wait_idle(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def stop(self) -> None:
        """A forced stop: queued requests fail with 503, the running batch stops at its next step."""
        self.state = "stopped"
        self.metrics.ready.set(0)
        if self.batcher is not None:
            self.batcher.stop()

    async def close(self) -> None:
        if self._dispatch is not None:
            self._dispatch.cancel()
            await asyncio.gather(self._dispatch, return_exceptions=True)
        self._encoders.shutdown(wait=False)
        self._worker.shutdown(wait=False)

    def _job(self, request: ImageRequest) -> Job:
        """The request checked against the model and this server's bounds (400 naming the parameter if not)."""
        model = self.model
        assert model is not None
        if request.response_format == "url":
            raise ApiError(400, "response_format 'url' is not supported: use b64_json", param="response_format")
        res = self._resolution(request.size)
        n = 1 if request.n is None else request.n
        if not 1 <= n <= self.max_images:
            raise ApiError(400, f"n must be between 1 and {self.max_images}, got {n}", param="n")
        steps = self.default_steps if request.num_inference_steps is None else request.num_inference_steps
        if not 1 <= steps <= self.max_steps:
            message = f"num_inference_steps must be between 1 and {self.max_steps}, got {steps}"
            raise ApiError(400, message, param="num_inference_steps")
        guidance = model.default_guidance_scale if request.guidance_scale is None else request.guidance_scale
        if not 0 <= guidance <= MAX_GUIDANCE:
            message = f"guidance_scale must be between 0 and {MAX_GUIDANCE:g}, got {guidance:g}"
            raise ApiError(400, message, param="guidance_scale")
        negative = request.negative_prompt
        return Job(
            key=BatchKey(res, steps, float(guidance), negative is not None, self._adapter(request)),
            prompt=request.prompt,
            negative_prompt=negative,
            n=n,
            seed=secrets.randbelow(RANDOM_SEEDS) if request.seed is None else request.seed,
            future=asyncio.get_running_loop().create_future(),
        )

    def _adapter(self, request: ImageRequest) -> Adapter | None:
        """The LoRA the request asks for, by `lora` or by giving its id as `model`; None: the base."""
        loras = self.loras
        if request.lora is not None and request.lora not in loras:
            loaded = ", ".join(loras) or "none"
            raise ApiError(400, f"lora {request.lora!r} is not loaded; loaded: {loaded}", param="lora")
        named = request.model if request.model in loras else None
        if request.lora is not None and named is not None and named != request.lora:
            message = f"model {request.model!r} and lora {request.lora!r} name different LoRAs"
            raise ApiError(400, message, param="lora")
        name = request.lora or named
        if name is None:
            if request.lora_scale is not None:
                message = "lora_scale needs a LoRA: give lora, or a LoRA's id as model"
                raise ApiError(400, message, param="lora_scale")
            return None
        scale = 1.0 if request.lora_scale is None else request.lora_scale
        if not -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE:
            message = f"lora_scale must be between {-MAX_LORA_SCALE:g} and {MAX_LORA_SCALE:g}, got {scale:g}"
            raise ApiError(400, message, param="lora_scale")
        return Adapter(name, scale)

    def _resolution(self, size: str | None) -> Resolution:
        model = self.model
        assert model is not None
        if size is None or size == "auto":
            return model.default_resolution
        sizes = ", ".join(map(str, model.resolutions))
        match = SIZE.fullmatch(size)
        res = Resolution(int(match[1]), int(match[2])) if match else None
        if res not in model.resolutions:
            raise ApiError(400, f"size {size!r} is not available; this model serves {sizes}", param="size")
        return res


def encode_images(images: list[Any], fmt: str, compression: int | None) -> list[str]:
    """PIL images -> base64 strings of the format's bytes. PNG at zlib level 1 unless `compression` (0-100) says
    otherwise: a 1024² image encodes several times faster than at PIL's default level, for a somewhat larger file."""
    out = []
    for image in images:
        buffer = io.BytesIO()
        if fmt == "png":
            level = 1 if compression is None else round(compression * 9 / 100)
            image.save(buffer, OUTPUT_FORMATS[fmt], compress_level=level)
        else:
            image.save(buffer, OUTPUT_FORMATS[fmt], quality=90 if compression is None else compression)
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out
