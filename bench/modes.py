"""Every mode side by side, one process each, in one run: diffusers eager and torch.compile (reduce-overhead) on a
checkpoint, and fastdiff artifacts of it, at each batch and step count: ms per image, images per second, the step
time, peak memory, and one denoiser step's error against diffusers eager fp32.

    python bench/modes.py --checkpoint CHECKPOINT --artifact fp8=ART [--artifact bf16=ART2] \
        [--baselines eager,compile] [--batches 1,2,4,8] [--steps 20,30] --out bench/results/NAME

Writes OUT/modes.json and OUT/modes.md (the table, with the command and the environment), and each mode's
throughput.py results beside them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def run(args: list[str]) -> None:
    print("$", shlex.join(args), flush=True)
    subprocess.run([sys.executable, str(HERE / "throughput.py"), *args], check=True)


def table(modes: dict[str, dict]) -> list[str]:
    lines = [
        "| mode | batch | steps | ms per image | images/s | step ms | peak GiB | step error vs fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, record in modes.items():
        error = record.get("step_error")
        for r in record["rows"]:
            cells = [
                name,
                str(r["batch"]),
                str(r["steps"]),
                f"{r['ms_per_image']:.1f}",
                f"{r['images_per_s']:.2f}",
                f"{r['step_ms']:.2f}" if "step_ms" in r else "-",
                f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-",
                f"{100 * error:.2f} %" if error is not None else "-",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the diffusers checkpoint the artifacts were exported from")
    parser.add_argument("--artifact", action="append", default=[], metavar="NAME=DIR", help="a fastdiff artifact")
    parser.add_argument("--baselines", default="eager,compile", help="diffusers modes: eager, compile (or none)")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--steps", default="20,30")
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", required=True, type=Path, help="a folder for the results")
    args = parser.parse_args()
    baselines = [b for b in args.baselines.split(",") if b and b != "none"]
    if unknown := [b for b in baselines if b not in ("eager", "compile")]:
        parser.error(f"unknown baseline {unknown[0]!r}")
    artifacts = dict(spec.split("=", 1) for spec in args.artifact)
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--res", str(args.res), "--device", args.device]
    reference = args.out / "reference.pt"
    run(
        [
            "--diffusers",
            args.checkpoint,
            "--make-reference",
            str(reference),
            *common,
        ]
    )
    timed = [*common, "--batches", args.batches, "--steps", args.steps, "--runs", str(args.runs)]
    timed += ["--warmup", str(args.warmup), "--reference", str(reference)]
    modes = {f"diffusers {mode}": ["--diffusers", args.checkpoint, "--mode", mode] for mode in baselines}
    modes |= {f"fastdiff {name}": ["--artifact", path] for name, path in artifacts.items()}
    results = {}
    for name, source in modes.items():
        out = args.out / name.replace(" ", "-")
        run([*source, *timed, "--out", str(out)])  # one process per mode: no mode's memory or caches in another's
        results[name] = json.loads(out.with_suffix(".json").read_text())
    environment = next(iter(results.values()))["environment"] if results else {}
    (args.out / "modes.json").write_text(json.dumps({"modes": results, "command": sys.argv}, indent=2))
    lines = [f"`{shlex.join(['python', *sys.argv])}`", "", *table(results), "", f"environment: `{environment}`"]
    (args.out / "modes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
