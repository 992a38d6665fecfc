"""Where two variants of a speed record spend different GPU time per step, kernel by kernel.

    python bench/profile_diff.py bench/results/NAME/speed-sdxl.json "fastdiff sdxl-bf16" "diffusers torch.compile"

Variants are picked by the start of their name. Inductor numbers its Triton kernels per compile
(triton_poi_fused_gelu_mul_split_view_53 in one, _54 in the other), so kernels are grouped by name without that
number. Records written before the profiles kept every kernel have only the top 15 of each variant.
With --sources DIR (Inductor's cache, e.g. /tmp/torchinductor_$USER) the Triton code of the kernels behind the
largest differences is printed below the table: each distinct definition found under either variant's exact
(numbered) names, so two compiles' versions of a kernel can be read side by side. A cache shared by other compiles
can add versions of theirs that happen to have the same number.
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


KERNEL_DEF = re.compile(r"^def (triton_\w+)\(", re.MULTILINE)


def kernel_definitions(cache: Path, names: set[str]) -> dict[str, dict[str, set[str]]]:
    """The distinct definitions (decorator to last line, Inductor's number dropped) of the Triton kernels named
    `names` (profiler names: cut at 160 characters) in the cache's Python files (kernel files, and torch.compile's
    wrappers, which hold their kernels' code), by kernel group; each with the numbered names it was found under."""
    found: dict[str, dict[str, set[str]]] = defaultdict(dict)
    for path in sorted(cache.rglob("*.py")):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for match in KERNEL_DEF.finditer(text):
            name = match.group(1)
            if name not in names and name[:160] not in names:
                continue
            group = NUMBERED.sub("", name)
            found[group].setdefault(_definition(text, match.start()).replace(name, group), set()).add(name)
    return found


def _definition(text: str, start: int) -> str:
    decorator = text.rfind("\n@triton_heuristics", 0, start)
    lines = text[decorator + 1 if decorator >= 0 else start :].splitlines()
    body = next((i for i, line in enumerate(lines) if i and line.startswith("def ")), 0) + 1
    end = next((i for i in range(body, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    return "\n".join(lines[:end]).strip()


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
    names = {
        side: {k["name"] for k in r["unet_profile"].get("kernels", []) if NUMBERED.sub("", k["name"]) in groups}
        for side, r in (("A", a), ("B", b))
    }
    definitions = kernel_definitions(cache, names["A"] | names["B"])
    for group in groups:
        found = definitions.get(group, {})
        print(f"\n### `{group}`: {len(found)} distinct definition(s) in the cache")
        for code, numbered in found.items():
            sides = [f"{side}'s {', '.join(sorted(numbered & names[side]))}" for side in "AB" if numbered & names[side]]
            print(f"\nnamed as {'; '.join(sides)}\n```python\n{code}\n```")


if __name__ == "__main__":
    main()
