"""Prompt encoding as diffusers does it: SDXL concatenates both CLIP encoders' penultimate hidden states and takes
the second encoder's pooled, projected embedding; SD 1.x takes its one encoder's final hidden states. Which hidden
states a compiled encoder returns was fixed at export.

Tokenizers run through the `tokenizers` library (the artifact's tokenizer.json has SDXL's padding and truncation
built in); the encoders are compiled packages, or, for artifacts exported with stock encoders, transformers models.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .errors import FastDiffError

TextEncoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # ids -> (hidden states, pooled)


def load_tokenizer(path: Path, max_length: int) -> Tokenizer:
    """The artifact's tokenizer, which must pad and truncate to `max_length` tokens by itself."""
    try:
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:
        raise FastDiffError(f"cannot load tokenizer {path}: {e}", "the artifact is damaged: export again") from None
    padding, truncation = tokenizer.padding or {}, tokenizer.truncation or {}
    if padding.get("length") != max_length or truncation.get("max_length") != max_length:
        raise FastDiffError(
            f"tokenizer {path} does not pad and truncate to {max_length} tokens",
            "the artifact is damaged or was written by an older fastdiff: export it again",
        )
    return tokenizer


def load_stock_text_encoder(path: Path, dtype: torch.dtype, device: torch.device) -> TextEncoder:
    """A transformers text encoder saved with save_pretrained, of the class its config names."""
    import transformers  # only artifacts exported with stock text encoders need it

    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        arch = json.loads((path / "config.json").read_text())["architectures"][0]
        model = getattr(transformers, arch).from_pretrained(path, dtype=dtype)
    except Exception as e:
        raise FastDiffError(f"cannot load text encoder {path}: {e}", "the artifact is damaged: export again") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    model = model.to(device).eval().requires_grad_(False)

    def encode(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(ids, output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.hidden_states[-2], pooled

    return encode


class TextConditioner:
    def __init__(
        self,
        tokenizers: list[Tokenizer],
        encoders: list[TextEncoder],
        force_zeros_for_empty_prompt: bool,
        device: torch.device,
        max_batch: int,
        pooled: bool,
    ) -> None:
        self.tokenizers = tokenizers
        self.encoders = encoders
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.device = device
        self.max_batch = max_batch  # most prompts per encoder call (compiled encoders have a bounded batch)
        self.pooled = pooled  # whether the UNet takes the last encoder's pooled embedding (SDXL)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders, strict=True):
            ids = torch.tensor([e.ids for e in tokenizer.encode_batch(prompts)], dtype=torch.long)
            outs = [encoder(chunk.to(self.device)) for chunk in ids.split(self.max_batch)]
            hidden.append(torch.cat([h for h, _ in outs]))
            pooled = torch.cat([p for _, p in outs]) if self.pooled else None  # only the last encoder's counts
        return torch.cat(hidden, dim=-1), pooled

    @torch.no_grad()
    def __call__(
        self, prompts: list[str], negative_prompts: list[str] | None, guidance: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(embeds, pooled, negative embeds, negative pooled); pooled ones are None unless the model uses them,
        the negatives are None without guidance."""
        embeds, pooled = self._encode(prompts)
        if not guidance:
            return embeds, pooled, None, None
        if negative_prompts is None and self.force_zeros_for_empty_prompt:
            return embeds, pooled, torch.zeros_like(embeds), None if pooled is None else torch.zeros_like(pooled)
        neg_embeds, neg_pooled = self._encode(negative_prompts or [""] * len(prompts))
        return embeds, pooled, neg_embeds, neg_pooled
