"""SDXL prompt encoding with the stock CLIP text encoders, as diffusers' StableDiffusionXLPipeline does it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from .errors import FastDiffError


def load_text_encoder(path: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A transformers text encoder saved with save_pretrained, of the class its config names."""
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
    return model.to(device).eval().requires_grad_(False)


def load_tokenizer(path: Path):
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise FastDiffError(f"cannot load tokenizer {path}: {e}", "the artifact is damaged: export again") from None


class SDXLTextConditioner:
    """Two CLIP encoders: penultimate hidden states of both, concatenated; pooled, projected output of the second."""

    def __init__(self, tokenizers: list, encoders: list[torch.nn.Module], force_zeros_for_empty_prompt: bool) -> None:
        self.tokenizers = tokenizers
        self.encoders = encoders
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    def _encode(self, prompts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders, strict=True):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=max_length or tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            if out[0].ndim == 2:  # only CLIPTextModelWithProjection returns a 2-d first output
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    @torch.no_grad()
    def __call__(
        self, prompts: list[str], negative_prompts: list[str] | None, guidance: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(embeds, pooled, negative embeds, negative pooled); the negatives are None without guidance."""
        embeds, pooled = self._encode(prompts)
        if not guidance:
            return embeds, pooled, None, None
        if negative_prompts is None and self.force_zeros_for_empty_prompt:
            return embeds, pooled, torch.zeros_like(embeds), torch.zeros_like(pooled)
        negative_prompts = negative_prompts or [""] * len(prompts)
        neg_embeds, neg_pooled = self._encode(negative_prompts, max_length=embeds.shape[1])
        return embeds, pooled, neg_embeds, neg_pooled
