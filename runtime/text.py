"""Prompt encoding as diffusers does it: SDXL concatenates both CLIP encoders' penultimate hidden states and takes
the second encoder's pooled, projected embedding; SD 1.x takes its one encoder's final hidden states; PixArt-α takes
its T5 encoder's final hidden states and passes their attention mask on to the transformer. Which hidden states a
compiled encoder returns was fixed at export.

Tokenizers run through the `tokenizers` library (the artifact's tokenizer.json has the padding and truncation built
in); the encoders are compiled packages, or, for artifacts exported with stock encoders, transformers models.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .errors import FastDiffError

log = logging.getLogger(__name__)

# (ids, attention mask) -> (hidden states, pooled embedding or None)
TextEncoder = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


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


def check_vocabulary(tokenizer: Tokenizer, embedding_rows: int, path: Path) -> None:
    """Refuse a tokenizer that can yield ids its text encoder has no embedding for: the encoder's lookup would read
    out of bounds (a process abort on the CPU, a device-side assert that ends the CUDA context on a GPU)."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > embedding_rows:
        raise FastDiffError(
            f"tokenizer {path} has {size} tokens; its text encoder embeds only {embedding_rows}",
            "the artifact's files do not belong together: export the model again",
        )


EMBEDDING_SUFFIXES = ("token_embedding.weight", "embed_tokens.weight", "shared.weight")  # CLIP's; T5's (two names)


def embedding_rows(weights: dict[str, torch.Tensor], path: Path, recorded: int | None = None) -> int:
    """How many token ids a compiled text encoder embeds: the rows of its token embedding among its weights, which
    must be the vocabulary its package was compiled for where the manifest records it (a weights header reshaped
    at the same byte size would otherwise pass)."""
    rows = {t.shape[0] for name, t in weights.items() if name.endswith(EMBEDDING_SUFFIXES) and t.dim() == 2}
    if len(rows) != 1:
        raise FastDiffError(f"cannot tell the vocabulary of text encoder {path}", "export the model again")
    found = rows.pop()
    if recorded is not None and found != recorded:
        raise FastDiffError(
            f"text encoder {path} embeds {found} tokens; its package was compiled for {recorded}",
            "the artifact is damaged or was tampered with: export the model again",
        )
    return found


def load_stock_text_encoder(
    path: Path, dtype: torch.dtype, device: torch.device, penultimate: bool
) -> tuple[TextEncoder, int]:
    """A transformers text encoder saved with save_pretrained, of the class its config names, and how many token ids
    it embeds. A CLIP encoder returns its penultimate layer's hidden states if `penultimate` (SDXL), else its final
    ones (SD 1.x)."""
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

    def encode_t5(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, None]:
        return model(ids, attention_mask=mask).last_hidden_state, None

    def encode_clip(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(ids, output_hidden_states=penultimate)  # CLIP as diffusers calls it: no attention mask
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return (out.hidden_states[-2] if penultimate else out.last_hidden_state), pooled

    rows = model.get_input_embeddings().num_embeddings
    return (encode_t5 if arch == "T5EncoderModel" else encode_clip), rows


@dataclass(frozen=True)
class CompiledTextEncoder:
    """A compiled encoder package (or its CUDA-graph replay) as a TextEncoder: it takes the mask only if it was
    exported with one (T5), and returns the pooled embedding only if it was exported with one (CLIP)."""

    module: Callable
    masked: bool  # exported with the attention mask as an input

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.module(ids, mask) if self.masked else self.module(ids)
        return (out, None) if isinstance(out, torch.Tensor) else out


Conditioning = dict[str, torch.Tensor]  # denoiser input name -> one row per prompt


@dataclass(frozen=True)
class TextConditioner:
    """Prompts in; the denoiser's text inputs out, by input name: `encoder_hidden_states`, and `text_embeds` (the
    pooled embedding, SDXL) or `encoder_attention_mask` (PixArt-α) where the model takes them."""

    tokenizers: list[Tokenizer]
    encoders: list[TextEncoder]
    force_zeros_for_empty_prompt: bool
    device: torch.device
    max_batch: int  # most prompts per encoder call (compiled encoders have a bounded batch)
    pooled: bool  # whether the denoiser takes the last encoder's pooled embedding (SDXL)
    vocab_rows: list[int]  # token ids each encoder embeds: a larger id would be read out of bounds
    masked: bool = False  # whether the denoiser takes the text's attention mask (PixArt-α)
    lowercase: bool = False  # prompts lowercased and stripped first (PixArt-α)

    def _encode(self, prompts: list[str]) -> Conditioning:
        if self.lowercase:
            prompts = [p.lower().strip() for p in prompts]
        hidden, cond, truncated = [], {}, {}
        for tokenizer, encoder, rows in zip(self.tokenizers, self.encoders, self.vocab_rows, strict=True):
            encodings = tokenizer.encode_batch(prompts)
            for prompt, encoding in zip(prompts, encodings, strict=True):
                if encoding.overflowing:
                    truncated[prompt] = tokenizer.truncation["max_length"]
            ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
            if int(ids.max()) >= rows:  # on the host, before the ids reach compiled code (padding and special ids too)
                raise FastDiffError(
                    f"the tokenizer gave token id {int(ids.max())}; its text encoder embeds {rows}",
                    "the artifact's files do not belong together: export the model again",
                )
            mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
            outs = [
                encoder(i.to(self.device), m.to(self.device))
                for i, m in zip(ids.split(self.max_batch), mask.split(self.max_batch), strict=True)
            ]
            hidden.append(torch.cat([h for h, _ in outs]))
            if self.pooled:  # only the last encoder's counts
                cond["text_embeds"] = torch.cat([p for _, p in outs])
            if self.masked:
                cond["encoder_attention_mask"] = mask.to(self.device)
        for prompt, max_length in truncated.items():  # diffusers warns too
            log.warning("prompt cut to its first %d tokens (the text encoder takes no more): %.60r", max_length, prompt)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), **cond}

    @torch.no_grad()
    def __call__(
        self, prompts: list[str], negative_prompts: list[str] | None, guidance: bool
    ) -> tuple[Conditioning, Conditioning | None]:
        """The conditioning of the prompts, and of the negative prompts (None without guidance)."""
        cond = self._encode(prompts)
        if not guidance:
            return cond, None
        if negative_prompts is None and self.force_zeros_for_empty_prompt:
            return cond, {name: torch.zeros_like(t) for name, t in cond.items()}
        return cond, self._encode(negative_prompts or [""] * len(prompts))
