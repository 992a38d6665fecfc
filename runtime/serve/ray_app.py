"""fastdiff on Ray Serve: replicas (one per GPU) that each handle requests exactly as fastdiff-serve does (an
ImageService and the same FastAPI app), with Ray Serve's HTTP proxy, routing, autoscaling and replica recovery
around them.

    serve run fastdiff.runtime.serve.ray_app:app artifact=/models/sdxl
    serve run fastdiff.runtime.serve.ray_app:app artifact=/models/tiny device=cpu num_replicas=2
    serve deploy serve-config.yaml   # import_path: fastdiff.runtime.serve.ray_app:app (docs/serving.md)

A replica is ready when its constructor returns, which loads and warms up the pipeline: Serve routes no request to
a replica before that. Batching is the server's own (batcher.py): Serve's @serve.batch gathers any calls up to a size,
whereas requests may share a pipeline call only when their resolution, steps and guidance agree, and each request
needs its own deadline and disconnect handling in the queue.
"""

# No `from __future__ import annotations`: Serve reads the builder's parameter annotation as a class, to validate
# `serve run ... key=value` arguments into AppArgs.

import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application

from .app import create_app
from .model import load_fastdiff
from .service import ImageService


class AppArgs(BaseModel):
    """The application builder's arguments (`serve run ...:app key=value`, or `args:` in a Serve config file)."""

    artifact: str
    device: str | None = None  # default: the artifact's device kind
    api_key: str | None = None  # default: FASTDIFF_API_KEY in the replicas' environment, or none
    model_name: str | None = None
    max_queue: int = Field(64, ge=1)
    batch_wait_ms: float = Field(10.0, ge=0)
    request_timeout_s: float = Field(300.0, gt=0)
    expected_digest: str | None = None
    loras: dict[str, str] = Field(default_factory=dict)  # LoRA name -> file, at that path on every node (--lora)
    num_replicas: int | None = Field(None, ge=1)  # a fixed count; without it, autoscaling between these:
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)  # per replica: about the artifact's batch of images
    max_ongoing_requests: int = Field(16, ge=1)  # per replica; more wait in Serve's router
    num_gpus: float | None = None  # default: 1, or 0 with device=cpu
    num_cpus: float = 1.0


@serve.deployment(
    name="FastDiff",
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_wait_loop_s=1,
    graceful_shutdown_timeout_s=60,  # a replica scaled down finishes its queued and running requests
)
@serve.ingress()
class FastDiffDeployment:
    async def __init__(
        self,
        artifact: str,
        device: str | None = None,
        api_key: str | None = None,
        model_name: str | None = None,
        max_queue: int = 64,
        batch_wait_ms: float = 10.0,
        request_timeout_s: float = 300.0,
        expected_digest: str | None = None,
        loras: dict[str, str] | None = None,
    ) -> None:
        self.model_name = model_name or Path(artifact).name
        self.api_key = api_key or os.environ.get("FASTDIFF_API_KEY")
        self.service = ImageService(
            lambda: load_fastdiff(artifact, device, expected_digest, self.model_name, loras),
            max_queue=max_queue,
            batch_wait_s=batch_wait_ms / 1000,
            request_timeout_s=request_timeout_s,
        )
        await self.service.start()  # the replica's readiness: loaded and warmed up
        self.replica = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self) -> FastAPI:
        headers = {"x-fastdiff-replica": self.replica}  # which replica answered: for logs and tests
        return create_app(
            self.service, api_key=self.api_key, model_name=self.model_name, start_service=False, headers=headers
        )

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose pipeline thread or dispatch loop died is replaced."""
        if not self.service.healthy:
            raise RuntimeError(f"fastdiff replica unhealthy ({self.service.state})")

    def replica_info(self) -> dict[str, Any]:
        batcher = self.service.batcher
        return {"replica": self.replica, "pid": os.getpid(), "busy": batcher is not None and batcher.busy}


def app(args: AppArgs) -> Application:
    """The application builder: `serve run fastdiff.runtime.serve.ray_app:app artifact=PATH [key=value ...]`."""
    gpus = args.num_gpus if args.num_gpus is not None else (0 if args.device == "cpu" else 1)
    scaling: dict[str, Any] = (
        {"num_replicas": args.num_replicas}
        if args.num_replicas is not None
        else {
            "autoscaling_config": {
                "min_replicas": args.min_replicas,
                "max_replicas": args.max_replicas,
                "target_ongoing_requests": args.target_ongoing_requests,
            }
        }
    )
    deployment = FastDiffDeployment.options(
        ray_actor_options={"num_gpus": gpus, "num_cpus": args.num_cpus},
        max_ongoing_requests=args.max_ongoing_requests,
        **scaling,
    )
    return deployment.bind(
        args.artifact,
        device=args.device,
        api_key=args.api_key,
        model_name=args.model_name,
        max_queue=args.max_queue,
        batch_wait_ms=args.batch_wait_ms,
        request_timeout_s=args.request_timeout_s,
        expected_digest=args.expected_digest,
        loras=args.loras,
    )
