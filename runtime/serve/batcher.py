"""Requests -> batches -> one pipeline call at a time, on one worker thread.

Requests wait in one first-come queue. When the worker is free, the oldest request's batch key (resolution, steps,
guidance scale, whether a negative prompt is given: the pipeline's loop takes one of each per call; and the LoRA, which
is merged into the weights for the whole call) picks the batch:
it and the next requests of the same key, in arrival order, up to the model's compiled batch of images (a request of
n images counts n). The oldest request waits at most `batch_wait_s` for company while the worker is idle; while the
worker is busy, requests gather anyway. Each request brings its own initial noise, drawn as the pipeline draws it
alone for its seed, so its images do not depend on what it was batched with (ServedModel.initial_noise); where the
scheduler draws noise of its own at each step, each request runs alone instead (ServedModel.rows_independent).

The asyncio side (submit, cancel, the dispatch loop) runs on the event loop and never blocks it; the pipeline runs on
the worker thread, which the loop awaits through run_in_executor. A request cancelled while queued (its client went
away, its deadline passed) leaves the queue at once; a batch whose requests are all cancelled stops at the next step.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..format import Resolution
from .metrics import ServeMetrics
from .model import Adapter, ServedModel


@dataclass(frozen=True)
class BatchKey:
    """What requests must share to share a pipeline call."""

    resolution: Resolution
    steps: int
    guidance_scale: float
    negative: bool  # SDXL conditions on zeros without a negative prompt, and on the encoded prompt with one
    adapter: Adapter | None  # the LoRA and weight merged for the call (None: the base)


@dataclass(eq=False)
class Job:
    key: BatchKey
    prompt: str
    negative_prompt: str | None
    n: int
    seed: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full; retry after {retry_after} s")
        self.retry_after = retry_after


class Stopped(Exception):
    """The server stopped before the request ran (a forced exit)."""


class Batcher:
    def __init__(
        self, model: ServedModel, worker: Executor, metrics: ServeMetrics, max_queue: int, batch_wait_s: float
    ) -> None:
        self.model = model
        self.worker = worker  # one thread: the pipeline serves one call at a time
        self.metrics = metrics
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self._queue: list[Job] = []
        self._running: list[Job] = []
        self._changed = asyncio.Event()  # a request arrived or left
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._batch_seconds = 1.0  # a moving average, for Retry-After

    @property
    def busy(self) -> bool:
        return bool(self._queue or self._running)

    def submit(self, job: Job) -> None:
        if self._stopping:
            raise Stopped()
        if len(self._queue) >= self.max_queue:
            raise QueueFull(self._retry_after())
        self._queue.append(job)
        self._idle.clear()
        self._changed.set()
        self._gauges()

    def cancel(self, job: Job, reason: str) -> None:
        """The request no longer wants its images: out of the queue now, or its batch stops early if none of the
        batch's requests still wants them."""
        if job.cancelled or job.future.done():
            return
        job.cancelled = True
        self.metrics.dropped.labels(reason).inc()
        if job in self._queue:
            self._queue.remove(job)
            self._changed.set()
            self._gauges()
            self._note_idle()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def stop(self) -> None:
        """A forced exit: queued requests fail, the running batch stops at its next step."""
        self._stopping = True
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(Stopped())
        self._queue.clear()
        self._changed.set()  # a batch waiting for company finds its requests gone
        self._gauges()
        self._note_idle()

    async def run(self) -> None:
        """The dispatch loop: runs until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if batch is None:
                continue
            self._running = batch
            start = time.monotonic()
            for job in batch:
                self.metrics.queue_wait.observe(start - job.enqueued)
            self.metrics.batch_requests.observe(len(batch))
            self.metrics.batch_images.observe(sum(job.n for job in batch))
            try:
                adapter = batch[0].key.adapter
                if adapter != self.model.merged:  # merging costs about a copy of the touched weights: only on a change
                    await loop.run_in_executor(self.worker, self.model.use_adapter, adapter)
                    self.metrics.lora_switches.inc()
                results = await loop.run_in_executor(self.worker, run_batch, self.model, batch, self._interrupt(batch))
            except Exception as e:  # the pipeline failed: every request of the batch gets the error
                for job in batch:
                    if not (job.future.done() or job.cancelled):  # no one waits for a cancelled job's answer
                        job.future.set_exception(e)
            else:
                for job, images in zip(batch, results, strict=True):
                    if job.future.done() or job.cancelled:
                        continue
                    if self._stopping:  # interrupted: its images are not denoised to the end
                        job.future.set_exception(Stopped())
                    else:
                        job.future.set_result(images)
            finally:
                seconds = time.monotonic() - start
                self.metrics.batch_seconds.observe(seconds)
                self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
                self._running = []
                self._note_idle()

    async def _next_batch(self) -> list[Job] | None:
        while not self._queue:
            self._changed.clear()
            await self._changed.wait()
        first = self._queue[0]
        while True:
            batch = self._batch_of(first)
            wait = first.enqueued + self.batch_wait_s - time.monotonic()
            if sum(job.n for job in batch) >= self.model.batch_size or wait <= 0 or not self.model.rows_independent:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), wait)
            except asyncio.TimeoutError:  # TimeoutError's alias from Python 3.11 on
                pass
            if first.cancelled or first not in self._queue:  # dropped, or failed by a forced stop
                return None
        for job in batch:
            self._queue.remove(job)
        self._gauges()
        return batch

    def _batch_of(self, first: Job) -> list[Job]:
        """The oldest request and those after it that can join its call, in arrival order."""
        batch, images = [first], first.n
        if not self.model.rows_independent:
            return batch
        for job in self._queue[1:]:
            if job.key == first.key and images + job.n <= self.model.batch_size:
                batch.append(job)
                images += job.n
        return batch

    def _interrupt(self, batch: list[Job]) -> Callable[[], bool]:
        return lambda: self._stopping or all(job.cancelled for job in batch)

    def _retry_after(self) -> int:
        """Seconds until the queue has room, roughly: the queued batches at the recent pace."""
        batches = math.ceil((len(self._queue) + 1) / max(1, self.model.batch_size))
        return max(1, math.ceil(batches * self._batch_seconds))

    def _note_idle(self) -> None:
        if not self.busy:
            self._idle.set()

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(len(self._queue))
        self.metrics.queued_images.set(sum(job.n for job in self._queue))


def run_batch(model: ServedModel, batch: list[Job], interrupt: Callable[[], bool]) -> list[list[Any]]:
    """On the worker thread: one pipeline call for the batch, its images split back per request (PIL images)."""
    key = batch[0].key
    res = key.resolution

    def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        if interrupt():
            pipe._interrupt = True  # diffusers' way, which FastDiffPipeline follows: the remaining steps are skipped
        return {}

    common = {
        "num_inference_steps": key.steps,
        "guidance_scale": key.guidance_scale,
        "height": res.height,
        "width": res.width,
        "output_type": "pil",
        "callback_on_step_end": on_step_end,
        "callback_on_step_end_tensor_inputs": [],
    }
    if model.rows_independent:
        prompts = [job.prompt for job in batch for _ in range(job.n)]
        negatives = [job.negative_prompt for job in batch for _ in range(job.n)] if key.negative else None
        latents = torch.cat([model.initial_noise(job.seed, job.n, res) for job in batch])
        images = model.pipe(prompts, negative_prompt=negatives, latents=latents, **common).images
    else:
        (job,) = batch  # alone, with its own generator, which the scheduler draws from too
        generator = torch.Generator().manual_seed(job.seed)
        images = model.pipe(
            job.prompt, negative_prompt=job.negative_prompt, num_images_per_prompt=job.n, generator=generator, **common
        ).images
    out, start = [], 0
    for job in batch:
        out.append(list(images[start : start + job.n]))
        start += job.n
    return out
