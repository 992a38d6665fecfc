"""Where two variants of a speed record spend different GPU time per step, kernel by kernel.

    python bench/profile_diff.py bench/results/NAME/speed-sdxl.json "fastdiff sdxl-bf16" "diffusers torch.compile"

Variants are picked by the start of their name. Inductor numbers its Triton kernels per compile
(triton_poi_fused_gelu_mul_split_view_53 in one, _54 in the other), so kernels are grouped by name without that
number. Records written before the profiles kept every kernel have only the top 15 of each variant.
With --sources DIR (Inductor's cache, e.g. /tmp/torchinductor_$USER) the Triton source of the kernels behind the
largest differences is printed below the table: every cached kernel of either variant's exact (numbered) name, so
two compiles' versions of a kernel can be read side by side. A cache shared by other compiles can add versions of
theirs that happen to have the same number.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

NUMBERED = re.compile(r"_\d+$")


def by_kernel(profile: dict) -> dict[str, tuple[float, int]]:
    """ms per step and calls per step, by kernel name without Inductor's number."""
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for k in profile.get("kernels") or profile["top_kernels"]:
        group = groups[NUMBERED.sub("", k["name"])]
        group[0] += k["ms_per_call"]
        group[1] += k["calls"]
    return {name: (ms, int(calls)) for name, (ms, calls) in groups.items()}


def triton_sources(cache: Path, names: set[str]) -> dict[str, list[Path]]:
    """Cached Triton source files by the kernel name they define, for the given (possibly truncated) names."""
    found: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(cache.rglob("*.py")):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for match in re.finditer(r"^def (triton_\w+)\(", text, re.MULTILINE):
            if any(match.group(1).startswith(n) for n in names):
                found[NUMBERED.sub("", match.group(1))].append(path)
    return found


def pick(results: list[dict], prefix: str) -> dict:
    matches = [r for r in results if r["variant"].startswith(prefix) and "unet_profile" in r]
    if len(matches) != 1:
        names = ", ".join(r["variant"] for r in results if "unet_profile" in r)
        raise SystemExit(f"{len(matches)} profiled variants start with {prefix!r}; the record has: {names}")
    return matches[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("record", type=Path, help="a JSON record of bench/speed.py --profile")
    parser.add_argument("a", help="a variant's name, or its start")
    parser.add_argument("b", help="the other variant")
    parser.add_argument("--top", type=int, default=20, help="how many of the largest differences to list")
    parser.add_argument("--sources", type=Path, help="Inductor's cache folder: print the differing kernels' code")
    parser.add_argument("--source-kernels", type=int, default=4, help="how many Triton kernels' code to print")
    args = parser.parse_args()
    results = json.loads(args.record.read_text())["results"]
    a, b = pick(results, args.a), pick(results, args.b)
    ka, kb = by_kernel(a["unet_profile"]), by_kernel(b["unet_profile"])
    rows = sorted(
        ((ka.get(n, (0.0, 0)), kb.get(n, (0.0, 0)), n) for n in ka.keys() | kb.keys()),
        key=lambda row: -abs(row[0][0] - row[1][0]),
    )
    print(f"A: {a['variant']} ({a['unet_profile']['gpu_ms_per_call']:.2f} ms per step)")
    print(f"B: {b['variant']} ({b['unet_profile']['gpu_ms_per_call']:.2f} ms per step)")
    print("\n| A - B ms | A ms (calls) | B ms (calls) | kernel |\n|---|---|---|---|")
    for (ms_a, calls_a), (ms_b, calls_b), name in rows[: args.top]:
        print(f"| {ms_a - ms_b:+.3f} | {ms_a:.3f} ({calls_a}) | {ms_b:.3f} ({calls_b}) | `{name[:90]}` |")
    if args.sources:
        print_sources(args.sources, [n for *_, n in rows if n.startswith("triton_")][: args.source_kernels], a, b)


def print_sources(cache: Path, groups: list[str], a: dict, b: dict) -> None:
    numbered = {
        k["name"] for r in (a, b) for k in r["unet_profile"].get("kernels", []) if NUMBERED.sub("", k["name"]) in groups
    }
    sources = triton_sources(cache, numbered)
    for group in groups:
        paths = sources.get(group, [])
        print(f"\n### `{group}`: {len(paths)} cached version(s)")
        for path in paths:
            print(f"\n{path}\n```python\n{path.read_text(errors='replace').strip()}\n```")


if __name__ == "__main__":
    main()
