"""Where the cold start's imports go: `import torch`, then the runtime's scheduler import (diffusers.schedulers, as
load_pipeline does it), each in a fresh interpreter, with the modules that took longest (python -X importtime), by
their own time and with what they imported.

    python3 bench/probe_imports.py [--scheduler EulerDiscreteScheduler] [--top 15]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

SCHEDULER_IMPORT = """
import sys, time
import torch
from fastdiff.runtime.scheduler import import_scheduler_class
t0 = time.perf_counter()
import_scheduler_class(sys.argv[1])
print(f"scheduler import {time.perf_counter() - t0:.3f} s", file=sys.stderr)
"""


def importtime(code: str, *args: str, top: int) -> None:
    """Run `code` with -X importtime; print its own stderr, then the modules with the most self time."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code, *args], capture_output=True, text=True, check=True
    )
    rows, other = [], []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "self [us]" not in line:
            self_us, cumulative_us, module = line.removeprefix("import time:").split("|")
            rows.append((int(self_us), int(cumulative_us), module.strip()))
        else:
            other.append(line)
    total = sum(r[0] for r in rows) / 1e6
    print(f"{len(rows)} modules, {total:.3f} s of import time in all; longest by self time:")
    for self_us, cumulative_us, module in sorted(rows, reverse=True)[:top]:
        print(f"  {self_us / 1e6:7.3f} s self {cumulative_us / 1e6:7.3f} s cumulative  {module}")
    print("longest with what they imported (torch's own modules left out):")
    others = [(cumulative_us, module) for _, cumulative_us, module in rows if not module.startswith("torch")]
    for cumulative_us, module in sorted(others, reverse=True)[:top]:
        print(f"  {cumulative_us / 1e6:7.3f} s cumulative  {module}")
    print("\n".join(other))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scheduler", default="EulerDiscreteScheduler")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    print("== import torch")
    importtime("import torch", top=args.top)
    print(f"== import torch, then the runtime's import of {args.scheduler}")
    importtime(SCHEDULER_IMPORT, args.scheduler, top=args.top)


if __name__ == "__main__":
    main()
