"""`fastdiff-serve ARTIFACT`: the image API over one artifact, on uvicorn, with a graceful drain on SIGTERM.

Checks its arguments (the --lora files exist) and the artifact's manifest before the seconds of imports, starts reading
the artifact from disk beside them (prefetch), then runs uvicorn (server.DrainingServer), which loads the model and its
LoRAs in the background.
Exit codes: 0 after a drain, 1 after a forced stop, 2 on bad input or a model that cannot load.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from ..cli import CONTEXT, expected_digest_option
from ..errors import FastDiffError, clean_errors, import_torch
from ..format import read_manifest
from ..readahead import prefetch


@click.command(context_settings=CONTEXT)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free).")
@click.option("--device", help="cuda, cuda:N or cpu (default: what the artifact was compiled for).")
@click.option(
    "--api-key",
    envvar="FASTDIFF_API_KEY",
    help="Require `Authorization: Bearer KEY` on /v1/ routes (or set FASTDIFF_API_KEY, which `ps` does not show).",
)
@click.option(
    "--max-queue", default=64, show_default=True, type=click.IntRange(min=1), help="Requests waiting; more get 429."
)
@click.option(
    "--batch-wait-ms",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="How long a request waits for others to share its pipeline call while the pipeline is idle.",
)
@click.option(
    "--request-timeout",
    default=300.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds from a request's arrival to its answer; later: 504.",
)
@click.option(
    "--drain-timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds a SIGTERM waits for queued and running requests before the server exits anyway.",
)
@click.option("--default-steps", default=30, show_default=True, type=click.IntRange(min=1), help="When not given.")
@click.option(
    "--max-steps", default=150, show_default=True, type=click.IntRange(min=1), help="Most steps a request may ask."
)
@click.option("--model-name", help="The model's name in GET /v1/models (default: the artifact folder's name).")
@click.option(
    "--expect-digest",
    callback=expected_digest_option,
    metavar="sha256:HEX",
    help="Refuse to load an artifact whose digest is not this one.",
)
@click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="NAME=FILE",
    help="Load a LoRA (a file, or a folder of one) at start-up as NAME, which a request selects with `lora` or as "
    "`model`; repeatable.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
@clean_errors()
def main(
    artifact: Path,
    host: str,
    port: int,
    device: str | None,
    api_key: str | None,
    max_queue: int,
    batch_wait_ms: float,
    request_timeout: float,
    drain_timeout: float,
    default_steps: int,
    max_steps: int,
    model_name: str | None,
    expect_digest: str | None,
    loras: tuple[str, ...],
    log_level: str,
) -> None:
    """Serve ARTIFACT (written by fastdiff-export) over the OpenAI Images API: POST /v1/images/generations, GET
    /healthz, /readyz, /metrics. The model loads after the server starts listening; /readyz answers 200 once it is
    loaded and warmed up."""
    if default_steps > max_steps:
        raise FastDiffError(f"--default-steps {default_steps} is above --max-steps {max_steps}", "lower one of them")
    lora_files = parse_loras(loras)
    read_manifest(artifact)  # not an artifact: refused before the seconds of imports below
    prefetch(artifact)
    import_torch()
    import uvicorn

    from .app import create_app
    from .model import load_fastdiff
    from .server import DrainingServer
    from .service import ImageService

    name = model_name or artifact.name
    service = ImageService(
        lambda: load_fastdiff(artifact, device, expect_digest, name, lora_files),
        max_queue=max_queue,
        batch_wait_s=batch_wait_ms / 1000,
        request_timeout_s=request_timeout,
        default_steps=default_steps,
        max_steps=max_steps,
    )
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    app = create_app(service, api_key=api_key, model_name=name)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
    server = DrainingServer(config, service, drain_timeout)
    server.run()
    if service.state == "failed":
        error = service.load_error
        raise (
            error
            if isinstance(error, FastDiffError)
            else FastDiffError(f"cannot load {artifact}: {error}", "check the artifact with fastdiff-inspect --verify")
        )
    if server.forced:
        click.echo("error: stopped before the requests in flight finished", err=True)
        sys.exit(1)


def parse_loras(values: Sequence[str]) -> dict[str, Path]:
    """--lora NAME=FILE values -> {NAME: FILE}, refusing a value without a name or a file, a name given twice, and a
    file that does not exist (here, not seconds later in the load)."""
    loras: dict[str, Path] = {}
    for value in values:
        name, equals, file = value.partition("=")
        if not (equals and name and file):
            raise FastDiffError(f"--lora {value!r} is not NAME=FILE", "e.g. --lora pixel=loras/pixel.safetensors")
        if name in loras:
            raise FastDiffError(
                f"--lora names {name!r} twice ({loras[name]} and {file})", "give each LoRA its own name"
            )
        path = Path(file).expanduser()
        if not path.exists():
            raise FastDiffError(
                f"--lora {name}={file}: no such file", "check the path (relative to where the server starts)"
            )
        loras[name] = path
    return loras
