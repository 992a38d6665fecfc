"""uvicorn's Server with a graceful drain.

uvicorn's Server stops at the first SIGTERM or SIGINT: it closes its sockets, waits for open connections, and then
re-raises the signal, so the process dies of it. A replica should instead drain: the readiness probe fails first (so
the load balancer stops sending), new requests get 503, the requests already queued or running finish, and the process
exits 0. DrainingServer overrides uvicorn's signal handler (Server.handle_exit, which Server.capture_signals installs
for the run) to do that. A second signal, or a drain that outlasts its timeout, stops at once: queued requests get
503, the running batch stops at its next step and its requests get 503, and the process exits 1 (a third signal does
not wait for those answers).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn

from .service import ImageService

log = logging.getLogger("fastdiff.serve")

STOP_GRACE_S = 5.0  # how long a forced stop waits for the running batch to stop at its next step


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: ImageService, drain_timeout: float) -> None:
        super().__init__(config)
        self.service = service
        self.drain_timeout = drain_timeout
        self.forced = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0  # counted in the handler itself: a second signal before the drain's task starts forces
        self._draining: asyncio.Task | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()  # the signal handler hands its work to the loop
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None:
            return
        self._signals += 1
        if self._signals == 1 and not self.should_exit:
            self._loop.call_soon_threadsafe(self._start_drain)
        else:
            self._loop.call_soon_threadsafe(self._force)

    def _start_drain(self) -> None:
        if self._draining is None:
            log.info("draining: no new requests; finishing those queued and running")
            self._draining = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        if await self.service.drain(self.drain_timeout):
            self.should_exit = True
        else:
            log.error("the drain took longer than %g s: stopping", self.drain_timeout)
            self._force()

    def _force(self) -> None:
        if self.forced:  # a third signal: no more waiting
            self.should_exit = self.force_exit = True
            return
        self.forced = True
        self.service.stop()  # queued requests get 503 now, the running batch's once it stops at its next step
        asyncio.create_task(self._exit_when_stopped())

    async def _exit_when_stopped(self) -> None:
        """Exit once the running batch has stopped and its requests have their 503 (a step, and the decode)."""
        if not await self.service.wait_idle(STOP_GRACE_S):
            self.force_exit = True  # uvicorn then waits for no connection
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.service.state == "failed":  # the model could not load: nothing to serve
            self.should_exit = True
        return await super().on_tick(counter)
