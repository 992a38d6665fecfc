"""Modules with flat tensor signatures, the shapes torch.export compiles.

`torch.export` flattens dict inputs in insertion order, so the compiled signatures take plain tensors in a fixed,
documented order (recorded in the manifest as `inputs`) and the runtime calls them positionally.
"""

from __future__ import annotations

import torch
from torch import nn

VAE_DECODER_INPUTS = ["latents"]


class UNetStep(nn.Module):
    """One UNet evaluation (Stable Diffusion 1.x): noisy latents, timestep and text states in, predicted noise out."""

    inputs = ["sample", "timestep", "encoder_hidden_states"]

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class SDXLUNetStep(UNetStep):
    """One SDXL UNet evaluation, with the pooled text embedding and the micro-conditioning time ids."""

    inputs = [*UNetStep.inputs, "text_embeds", "time_ids"]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond, return_dict=False)[0]


class PixArtStep(nn.Module):
    """One PixArt-α transformer evaluation: latents, timestep, T5 states and their attention mask in, the predicted
    noise out (the learned-variance half of the output dropped, as diffusers' pipeline does)."""

    inputs = ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        config = transformer.config
        self.latent_channels = config.in_channels
        self.learned_sigma = config.out_channels // 2 == config.in_channels

    def predict(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        micro_conditions: dict[str, torch.Tensor | None],
    ) -> torch.Tensor:
        out = self.transformer(
            sample,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            timestep=timestep.expand(sample.shape[0]),
            added_cond_kwargs=micro_conditions,
            return_dict=False,
        )[0]
        return out[:, : self.latent_channels] if self.learned_sigma else out

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        micro = {"resolution": None, "aspect_ratio": None}
        return self.predict(sample, timestep, encoder_hidden_states, encoder_attention_mask, micro)


class PixArtMicroConditionedStep(PixArtStep):
    """PixArt-α's 1024² models (transformer sample size 128) also take the image resolution (height, width) and
    aspect ratio (height / width)."""

    inputs = [*PixArtStep.inputs, "resolution", "aspect_ratio"]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        resolution: torch.Tensor,
        aspect_ratio: torch.Tensor,
    ) -> torch.Tensor:
        micro = {"resolution": resolution, "aspect_ratio": aspect_ratio}
        return self.predict(sample, timestep, encoder_hidden_states, encoder_attention_mask, micro)


class VAEDecode(nn.Module):
    """Denoised latents in, an image in [0, 1] out: unscaling, VAE decode and denormalisation in one graph."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        config = vae.config
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        self.scaling_factor = float(config.scaling_factor)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        self.has_stats = mean is not None and std is not None
        if self.has_stats:
            self.register_buffer("latents_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=True)
            self.register_buffer("latents_std", torch.tensor(std).view(1, -1, 1, 1), persistent=True)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if self.has_stats:
            latents = latents * self.latents_std / self.scaling_factor + self.latents_mean
        else:
            latents = latents / self.scaling_factor
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        image = self.decoder(latents)
        return (image * 0.5 + 0.5).clamp(0, 1)


TEXT_ENCODER_INPUTS = ["input_ids"]
T5_ENCODER_INPUTS = ["input_ids", "attention_mask"]


class CLIPTextEncode(nn.Module):
    """Token ids in; the conditioning out: hidden states (SDXL takes the penultimate layer's, SD 1.x the final,
    normalised ones) and the pooled embedding (projected `text_embeds` for CLIPTextModelWithProjection,
    `pooler_output` otherwise)."""

    def __init__(self, encoder: nn.Module, penultimate: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.penultimate = penultimate

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(input_ids, output_hidden_states=self.penultimate)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        return hidden, pooled


class T5TextEncode(nn.Module):
    """Token ids and their attention mask in, the T5 encoder's final hidden states out (PixArt-α)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids, attention_mask=attention_mask).last_hidden_state
