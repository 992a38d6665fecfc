"""The serving benchmarks run on the CPU against the tiny model, a few requests each, so that the GPU run later is
known to work: the load comparison (offline pipeline, fastdiff-serve, diffusers behind the same API, through
bench/serve_load.py) and the replica start; and the load generator refuses targets off this machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import serve_compare  # noqa: E402
import serve_load  # noqa: E402
import serve_start  # noqa: E402


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1:8000", "http://example.com", "http://192.168.1.2", "ftp://127.0.0.1", "127.0.0.1:8000"]
)
def test_load_generator_refuses_other_hosts(url: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        serve_load.main(["--url", url, "--requests", "1"])
    assert info.value.code == 2 and "only http(s)://127.0.0.1" in capsys.readouterr().err


def test_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [serve_load.percentile(values, q) for q in (50, 95, 99, 100)] == [50, 95, 99, 100]
    assert serve_load.percentile([3.0], 99) == 3.0


def test_load_comparison_on_the_cpu(tiny_artifact: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "serve-load"
    args = ["--artifact", str(tiny_artifact), "--model", str(tiny_checkpoint), "--res", "64x64", "--steps", "2"]
    args += ["--concurrency", "1,2", "--requests", "3", "--device", "cpu", "--dtype", "fp32", "--out", str(out)]
    assert serve_compare.main(args) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["offline"]["batch"] == 2 and record["offline"]["images_per_s"] > 0
    for server in ("fastdiff-serve", "diffusers"):
        for c in ("1", "2"):
            load = record["servers"][server][c]
            assert load["ok"] == 3 and load["statuses"] == {"200": 3}
            assert 0 < load["latency_s"]["p50"] <= load["latency_s"]["p99"]
    assert "| diffusers | 2 |" in out.with_suffix(".md").read_text()


def test_replica_start_on_the_cpu(tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "serve-start"
    args = ["--artifact", str(tiny_artifact), "--device", "cpu", "--runs", "1", "--out", str(out)]
    assert serve_start.main(args) == 0
    (run,) = json.loads(out.with_suffix(".json").read_text())["runs"]["fastdiff-serve"]
    assert 0 < run["load_s"] < run["ready_s"]
