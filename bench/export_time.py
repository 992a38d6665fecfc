"""Export time: one fastdiff-export run (any arguments), its wall time and each phase's from the exporter's log.

    python bench/export_time.py --out /tmp/r/export-buckets -- sdxl-random --res 1024 --res 1152x896 \
        --res 896x1152 --res 1216x832 --res 832x1216 --jobs auto --out /tmp/art/buckets

SDXL's five aspect buckets on 16 cores is issue 29's export-time target (12 minutes). With --jobs N the per-package
compile times overlap: their sum against the wall time says how much the workers ran side by side.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import environment, write_results

DONE = re.compile(r"\[fastdiff-export\] (.+?): done in ([\d.]+) s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results (.json and .md) go to OUT")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, export_args = parser.parse_args(argv[:split]), argv[split + 1 :]
    if not export_args:
        parser.error("fastdiff-export's arguments go after --")
    code = "import sys; from fastdiff.exporter.cli import main; sys.argv[0] = 'fastdiff-export'; main()"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *export_args], stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".log").write_text(proc.stderr)
    phases = [(name, float(seconds)) for name, seconds in DONE.findall(proc.stderr)]
    compiles = {name.removeprefix("AOTInductor compile "): s for name, s in phases if name.startswith("AOTInductor")}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record = {
        "environment": environment(device),
        "export_args": export_args,
        "returncode": proc.returncode,
        "wall_s": wall,
        "phases_s": dict(phases),
        "compile_sum_s": sum(compiles.values()),
        "cores": len(os.sched_getaffinity(0)),
    }
    lines = [
        f"fastdiff-export {' '.join(export_args)}: exit {proc.returncode}, {wall:.0f} s wall on {record['cores']} "
        f"cores; package compiles {record['compile_sum_s']:.0f} s in all",
        "",
        "| package | compile (s) |",
        "|---|---|",
        *(f"| {name} | {seconds:.1f} |" for name, seconds in compiles.items()),
        "",
    ]
    write_results(args.out, record, "\n".join(lines))
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
