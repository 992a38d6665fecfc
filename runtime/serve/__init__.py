"""fastdiff-serve: the OpenAI Images API over an artifact, with dynamic batching, probes, metrics and a graceful drain
(FastAPI + uvicorn + prometheus_client, the `serve` extra), and its Ray Serve application (ray_app, the `ray` extra).

Nothing here is imported by `fastdiff.runtime` or `load_pipeline`: a process that only generates never imports the
server's dependencies.
"""
