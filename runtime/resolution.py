"""Image resolutions: parsing `--res` values and naming them the same way everywhere."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FastDiffError

MIN_SIDE = 64
MAX_SIDE = 4096


@dataclass(frozen=True, order=True)
class Resolution:
    width: int
    height: int

    @property
    def key(self) -> str:
        return f"{self.width}x{self.height}"

    def __str__(self) -> str:
        return self.key


def parse_resolution(text: str | int | Resolution, multiple_of: int = 8) -> Resolution:
    """Parse "1024" (square) or "WxH" (width x height), checking that each side is sane."""
    if isinstance(text, Resolution):
        res = text
    else:
        parts = str(text).strip().lower().split("x")
        try:
            sides = [int(p) for p in parts]
        except ValueError:
            sides = []
        if len(sides) not in (1, 2):
            raise FastDiffError(
                f"invalid resolution {text!r}",
                "give one number for a square image (1024) or WIDTHxHEIGHT (832x1216)",
            )
        res = Resolution(sides[0], sides[-1])
    for side in (res.width, res.height):  # range first, so the rounding hint below is always a valid size
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise FastDiffError(
                f"invalid resolution {res}: sides must be between {MIN_SIDE} and {MAX_SIDE} pixels",
                "pick a resolution the model was trained for, e.g. 1024 for SDXL",
            )
    for side in (res.width, res.height):
        if side % multiple_of:
            raise FastDiffError(
                f"invalid resolution {res}: {side} is not a multiple of {multiple_of}",
                f"round each side to a multiple of {multiple_of}, e.g. {max(side // multiple_of, 1) * multiple_of}",
            )
    return res
