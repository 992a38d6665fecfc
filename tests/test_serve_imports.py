"""The slim runtime path never imports the server's or Ray's code: `import fastdiff.runtime`, `load_pipeline` and a
generation, in a fresh interpreter, leave fastapi, starlette, uvicorn, prometheus_client, ray and
fastdiff.runtime.serve out of sys.modules; importing the server then brings them in (the probe sees imports)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SERVER_MODULES = ("fastapi", "starlette", "uvicorn", "prometheus_client", "ray", "fastdiff.runtime.serve")

PROBE = textwrap.dedent(
    """
    import json, sys
    import fastdiff.runtime
    from fastdiff.runtime import load_pipeline
    pipe = load_pipeline(sys.argv[1], device="cpu")
    pipe.set_progress_bar_config(disable=True)
    pipe("a cat", num_inference_steps=1)
    names = json.loads(sys.argv[2])
    loaded = lambda: sorted({m for m in sys.modules for n in names if m == n or m.startswith(n + ".")})
    runtime = loaded()
    import fastdiff.runtime.serve.ray_app
    print(json.dumps({"runtime": runtime, "server": loaded()}))
    """
)


def test_runtime_imports_no_server_code(tiny_artifact: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(tiny_artifact), json.dumps(SERVER_MODULES)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.splitlines()[-1])
    assert seen["runtime"] == []
    assert {name.split(".")[0] for name in seen["server"]} >= {"fastapi", "prometheus_client", "ray", "fastdiff"}
