"""The FastAPI application over an ImageService: the OpenAI Images API, probes, metrics, errors in OpenAI's shape.

Routes: POST /v1/images/generations, GET /v1/models (both behind the API key, if one is set); GET /healthz (the
process answers), GET /readyz (200 once the model is loaded and warmed up, 503 before and while draining), GET
/metrics (Prometheus' text format). Probes and metrics take no key: orchestrators and scrapers call them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import FastDiffError
from .api import ApiError, parse_request
from .service import ImageService

log = logging.getLogger("fastdiff.serve")

MAX_BODY_BYTES = 1 << 20  # two prompts of MAX_PROMPT_CHARS (4 bytes a character at most) and the rest fit
CLIENT_CLOSED = 499  # nginx's status for a request whose client left before the answer; recorded, never sent


class ClientGone(Exception):
    pass


def create_app(
    service: ImageService,
    api_key: str | None = None,
    model_name: str = "fastdiff",
    start_service: bool = True,
    headers: dict[str, str] | None = None,
) -> FastAPI:
    """The application. start_service: the app's lifespan loads the model in the background (fastdiff-serve); a
    Ray Serve replica loads it in its constructor instead. headers: added to every generation's response."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(_start(service)) if start_service else None
        yield
        if loading is not None:
            loading.cancel()
        await service.close()  # the app's end (fastdiff-serve's exit; Ray Serve's replica shutdown, after its drain)

    app = FastAPI(title="fastdiff", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            message = "Missing API key" if not given else "Incorrect API key provided"
            raise ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        arrived = time.monotonic()
        status = 500
        try:
            authorize(request)
            image_request = parse_request(await _json(request))
            result = await _unless_client_leaves(request, service.generate(image_request))
            status = 200
            service.metrics.latency.observe(time.monotonic() - arrived)
            return JSONResponse(result, headers={"x-fastdiff-seed": str(result["seed"]), **(headers or {})})
        except ApiError as e:
            status = e.status
            raise
        except (ClientGone, asyncio.CancelledError):
            status = CLIENT_CLOSED
            raise
        except Exception as e:  # answered here: an exception handler's answer would still log a traceback per request
            raise _internal_error(e) from None
        finally:
            service.metrics.requests.labels(str(status)).inc()

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        """The model, then each LoRA as a model of its own whose `parent` is the model (as vLLM lists LoRAs)."""
        authorize(request)
        base = {"id": model_name, "object": "model", "created": 0, "owned_by": "fastdiff", "parent": None}
        return {
            "object": "list",
            "data": [base, *({**base, "id": name, "parent": model_name} for name in service.loras)],
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        return JSONResponse({"status": service.state}, status_code=200 if service.ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = service.metrics.exposition()
        return Response(body, media_type=content_type)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED)  # no one reads it

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        error = ApiError(e.status_code, f"{e.detail}: {request.method} {request.url.path}", kind)
        return JSONResponse(error.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    return app


def _internal_error(e: Exception) -> ApiError:
    """A generation that failed in the server: a 500 for the client, the cause in the log."""
    if isinstance(e, FastDiffError):  # the pipeline's own word (a non-finite image, say): one line, no traceback
        log.error("request failed: %s", e.problem)
        return ApiError(500, f"The server failed to generate the image: {e.problem}", "server_error")
    log.error("request failed", exc_info=e)  # a bug: its traceback goes to the log, never to the client
    return ApiError(500, f"The server failed to generate the image ({type(e).__name__})", "server_error")


async def _start(service: ImageService) -> None:
    try:
        await service.start()
    except Exception as e:  # the server's owner (fastdiff-serve) sees service.state == "failed" and exits
        log.error("cannot load the model: %s", e)  # fastdiff-serve then ends with the one `error:` line


async def _json(request: Request) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    body = bytearray()
    async for chunk in request.stream():  # a chunked body has no length to check first
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _too_large()
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # ValueError: malformed, not UTF-8, or an integer of over 4300 digits
        raise ApiError(400, f"The request body is not valid JSON: {e}", code="invalid_json") from None


def _too_large() -> ApiError:
    return ApiError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: the next ASGI message is the
    disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """The work's result; if the client disconnects first, the work is cancelled (its request leaves the queue)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone()
    return task.result()
