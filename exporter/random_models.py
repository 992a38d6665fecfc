"""Random-weight checkpoints that fastdiff builds itself, offline: no hub access needed.

- tiny-sdxl, the embedded default model: SDXL's architecture family (two CLIP text encoders, text-time
  conditioned UNet, 4-block VAE with scale factor 8) shrunk so that a CPU AOTInductor compile is fast.
- tiny-sd: the Stable Diffusion 1.x family (one CLIP text encoder, no added conditioning), shrunk the same way.
- tiny-pixart: the PixArt-α family (a DiT transformer with micro-conditioning, a T5 text encoder), shrunk the same way.
- sdxl-random, ssd-1b-random, sd15-random, pixart-random: the real architectures of SDXL base 1.0, Segmind's
  SSD-1B, Stable Diffusion 1.5 and PixArt-XL-2-1024-MS, for benchmarks (latency does not depend on weight values).

Weights are random but deterministic; the tokenizers are a tiny byte-level CLIP BPE, and for T5 a tiny unigram model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from fastdiff.runtime.format import FastDiffError

TINY_MODEL_ID = "tiny-sdxl"

MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# A few merges for common English pieces; the rest of the text falls back to single byte-level symbols.
MERGES = [
    ("t", "h"),
    ("i", "n"),
    ("a", "n"),
    ("e", "r"),
    ("o", "n"),
    ("r", "e"),
    ("th", "e</w>"),
    ("o", "f</w>"),
    ("a", "t</w>"),
    ("c", "at</w>"),
    ("in", "g</w>"),
    ("an", "d</w>"),
]


def cache_path(name: str) -> Path:
    """Where fastdiff keeps a model it builds: ``$FASTDIFF_CACHE`` (else ``~/.cache/fastdiff``) / name."""
    root = os.environ.get("FASTDIFF_CACHE") or Path.home() / ".cache" / "fastdiff"
    return Path(root).expanduser() / name


def default_tiny_path() -> Path:
    return cache_path(TINY_MODEL_ID)


def tiny_sdxl() -> Path:
    return build_tiny_sdxl(default_tiny_path())


def random_sdxl_base() -> Path:
    """SDXL base 1.0's architecture with random weights, saved in fp16 (5 GB) in the fastdiff cache."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return build_random_checkpoint(cache_path("sdxl-random"), sdxl_base_arch(), dtype=torch.float16, device=device)


def random_ssd_1b() -> Path:
    """SSD-1B's architecture with random weights, saved in fp16 (~4 GB) in the fastdiff cache."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return build_random_checkpoint(cache_path("ssd-1b-random"), ssd_1b_arch(), dtype=torch.float16, device=device)


def _byte_symbols() -> list[str]:
    """The 256 printable unicode symbols of byte-level BPE, in GPT-2/CLIP order (``!`` first)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [table[b] for b in [*printable, *others]]


def _vocab() -> dict[str, int]:
    """CLIP-style layout: bytes, bytes + ``</w>``, merged pieces, then bos and eos as the last two ids."""
    symbols = _byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in MERGES), BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def _tokenizer(pad_token: str) -> CLIPTokenizer:
    return CLIPTokenizer(
        vocab=_vocab(),
        merges=list(MERGES),
        pad_token=pad_token,
        model_max_length=MAX_LENGTH,
    )


# T5's special tokens take its first ids (pad 0, eos 1, unk 2); then a few whole words, then single characters.
T5_WORDS = ["a", "an", "the", "of", "photo", "cat", "astronaut", "riding", "horse", "jungle"]


def _t5_tokenizer() -> T5TokenizerFast:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -2.0) for w in T5_WORDS]
    pieces += [(chr(c), -5.0) for c in range(ord("!"), ord("~") + 1)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )


def _write_vocab_files(folder: Path) -> None:
    """Also write classic vocab.json + merges.txt (what the slow CLIPTokenizer of transformers 4.x reads)."""
    vocab = json.dumps(_vocab(), ensure_ascii=False, indent=1)
    (folder / "vocab.json").write_text(vocab + "\n", encoding="utf-8")
    merges = "".join(f"{a} {b}\n" for a, b in MERGES)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")


_TINY_CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_LENGTH,
}

TINY_ARCH = {
    "unet": {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [2, 4],
        "transformer_layers_per_block": [1, 1],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "cross_attention_dim": 64,  # hidden sizes of the two text encoders, 32 + 32
        "projection_class_embeddings_input_dim": 80,  # projection_dim + 6 time ids * 8
        "norm_num_groups": 32,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 16, 16, 16],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 128,
        "scaling_factor": 0.13025,
        "force_upcast": False,
    },
    # Both CLIP encoders are the same tiny size; as in SDXL, the first uses quick_gelu and the second gelu.
    "text_encoder": {**_TINY_CLIP, "hidden_act": "quick_gelu"},
    "text_encoder_2": {**_TINY_CLIP, "hidden_act": "gelu"},
    "scheduler": {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
    },
}


TINY_SD_ARCH = {
    "family": "sd",
    "unet": {
        **{k: v for k, v in TINY_ARCH["unet"].items() if not k.startswith(("addition_", "projection_class"))},
        "cross_attention_dim": 32,  # the text encoder's hidden size
    },
    "vae": TINY_ARCH["vae"],
    "text_encoder": TINY_ARCH["text_encoder"],
    "scheduler": {  # Stable Diffusion 1.5's scheduler_config.json
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
    },
}


TINY_PIXART_ARCH = {
    "family": "pixart",
    # Sample size 128, as PixArt-XL-2-1024-MS: the pipeline then feeds the resolution micro-conditioning.
    "transformer": {
        "sample_size": 128,
        "num_layers": 2,
        "num_attention_heads": 6,  # width 48: the micro-conditioning splits it in three
        "attention_head_dim": 8,
        "in_channels": 4,
        "out_channels": 8,  # learned variance, as PixArt-α
        "patch_size": 2,
        "cross_attention_dim": 48,
        "caption_channels": 32,  # the T5 encoder's d_model
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "num_embeds_ada_norm": 1000,
        "use_additional_conditions": True,
    },
    "vae": {**TINY_ARCH["vae"], "scaling_factor": 0.18215},
    "text_encoder": {
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": False,
        "use_cache": False,
    },
    "scheduler": {  # PixArt-α's: DPM-Solver++ (2M) over a linear beta schedule
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
        "solver_order": 2,
        "algorithm_type": "dpmsolver++",
        "lower_order_final": True,
    },
}


def sd15_arch() -> dict:
    """Stable Diffusion 1.5's architecture, for random-weight benchmarks: the UNet is diffusers'
    UNet2DConditionModel defaults with 768-wide cross-attention (859,520,964 parameters, SD 1.5's published count);
    the CLIP ViT-L/14 text encoder and the VAE are SDXL's first encoder and VAE (the same architectures), the VAE with
    SD's scaling factor."""
    sdxl = sdxl_base_arch()
    return {
        "family": "sd",
        "unet": {"sample_size": 64, "cross_attention_dim": 768},
        "vae": {**sdxl["vae"], "scaling_factor": 0.18215, "sample_size": 512},
        "text_encoder": sdxl["text_encoder"],
        "scheduler": TINY_SD_ARCH["scheduler"],
    }


def pixart_xl_arch() -> dict:
    """PixArt-XL-2-1024-MS's architecture, for random-weight benchmarks: the transformer is diffusers'
    PixArtTransformer2DModel defaults (which are that model's) with T5-XXL's 4096-wide captions; the text encoder is
    T5 v1.1 XXL's published config; the VAE is SDXL's architecture with SD's scaling factor (PixArt-α uses SD's VAE).
    Unlike sdxl-base-1.0.json, not checked against a downloaded config here."""
    return {
        "family": "pixart",
        "transformer": {"sample_size": 128, "caption_channels": 4096},
        "vae": {**sdxl_base_arch()["vae"], "scaling_factor": 0.18215},
        "text_encoder": {
            "vocab_size": 32128,
            "d_model": 4096,
            "d_kv": 64,
            "d_ff": 10240,
            "num_layers": 24,
            "num_heads": 64,
            "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128,
            "feed_forward_proj": "gated-gelu",
            "is_encoder_decoder": False,
            "use_cache": False,
        },
        "scheduler": TINY_PIXART_ARCH["scheduler"],
    }


def ssd_1b_arch() -> dict:
    """Segmind SSD-1B's architecture, for random-weight benchmarks: SDXL base with the UNet distilled to 4 transformer
    layers per down-path attention at the lowest resolution (SDXL: 10), per-layer depths on the way up of [4, 4, 10]
    and [2, 1, 1], and a mid block of one resnet. Read from ComfyUI's model detection table (comfy/model_detection.py,
    SSD_1B: transformer_depth [0, 0, 2, 2, 4, 4], transformer_depth_output [0, 0, 0, 1, 1, 2, 10, 4, 4],
    transformer_depth_middle -1), not from the model's own config, which is not available offline. The UNet has
    1,331,334,404 parameters, the 1.3B of Segmind's paper; read the same way, the table's Segmind-Vega entry gives
    down, mid and up blocks of 247, 31 and 460 M parameters, as Segmind publishes for Vega. Text encoders, VAE (the
    fp16-fix VAE has SDXL's architecture) and scheduler are SDXL base's."""
    sdxl = sdxl_base_arch()
    unet = {
        **sdxl["unet"],
        "transformer_layers_per_block": [1, 2, 4],
        "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], [1, 1, 1]],
        "mid_block_type": "UNetMidBlock2D",
    }
    return {**{k: v for k, v in sdxl.items() if k != "parameter_counts"}, "unet": unet}


def sdxl_base_arch() -> dict:
    """SDXL base 1.0's real architecture (configs/sdxl-base-1.0.json), for random-weight benchmarks."""
    path = Path(__file__).parent / "configs" / "sdxl-base-1.0.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:  # a file fastdiff ships: not the user's to fix
        raise FastDiffError(
            f"this fastdiff installation lacks {path.name}, which its package should hold ({path})",
            "reinstall fastdiff; if a fresh install from its wheel still lacks it, report it as a bug in fastdiff",
        ) from None


def _text_config(arch: dict, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    # The token ids must be the tokenizer's: CLIP pools at the first position holding eos_token_id.
    return CLIPTextConfig(
        **{k: v for k, v in arch.items() if k != "vocab_size"},
        vocab_size=max(len(tokenizer), arch.get("vocab_size", 0)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _scheduler(scheduler_class: type, arch: dict):
    # Schedulers keep their tables on the CPU (some go through numpy), whatever device the models are built on.
    with torch.device("cpu"):
        return scheduler_class(**arch["scheduler"])


def _build_pixart(arch: dict, seed: int) -> PixArtAlphaPipeline:
    tokenizer = _t5_tokenizer()
    torch.manual_seed(seed)
    t5 = arch["text_encoder"]
    vocab_size = max(len(tokenizer), t5.get("vocab_size", 0))
    config = T5Config(**{**t5, "vocab_size": vocab_size}, pad_token_id=0, eos_token_id=1)
    text_encoder = T5EncoderModel(config)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(**arch["transformer"])
    torch.manual_seed(seed)
    vae = AutoencoderKL(**arch["vae"])
    scheduler = _scheduler(DPMSolverMultistepScheduler, arch)
    return PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def _build_pipeline(arch: dict, seed: int) -> StableDiffusionXLPipeline | StableDiffusionPipeline | PixArtAlphaPipeline:
    if arch.get("family") == "pixart":
        return _build_pixart(arch, seed)
    tokenizer = _tokenizer(pad_token=EOS_TOKEN)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(arch["text_encoder"], tokenizer))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**arch["unet"])
    torch.manual_seed(seed)
    vae = AutoencoderKL(**arch["vae"])
    if arch.get("family") == "sd":
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_scheduler(PNDMScheduler, arch),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    tokenizer_2 = _tokenizer(pad_token="!")
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(arch["text_encoder_2"], tokenizer_2))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(EulerDiscreteScheduler, arch),
        force_zeros_for_empty_prompt=True,
    )


def build_random_checkpoint(
    path: str | os.PathLike, arch: dict, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> Path:
    """Write a random-weight checkpoint of architecture `arch` (SDXL, or family "sd" or "pixart"; diffusers folder
    layout) to ``path``.

    The same ``seed`` always gives byte-identical weights. The folder is built next to ``path`` and renamed
    into place; an existing complete checkpoint (one with model_index.json) is returned unchanged.
    """
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with torch.device(device):  # random init of a 2.6B-parameter UNet is much faster on a GPU
            pipe = _build_pipeline(arch, seed)
        if dtype != torch.float32:  # built in fp32; diffusers warns at any .to(dtype), even one that changes nothing
            pipe.to(dtype=dtype)
        pipe.save_pretrained(tmp, safe_serialization=True)
        for folder in ("tokenizer", "tokenizer_2") if arch.get("family") != "pixart" else ():
            if (tmp / folder).is_dir():
                _write_vocab_files(tmp / folder)
        try:
            tmp.rename(path)
        except OSError:
            if not (path / "model_index.json").is_file():  # else a concurrent build won the race
                raise FileExistsError(f"{path} exists but has no model_index.json") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_tiny_sdxl(path: str | os.PathLike, seed: int = 0) -> Path:
    """The tiny SDXL checkpoint (float32): the embedded default model, built offline in well under a second."""
    return build_random_checkpoint(path, TINY_ARCH, seed)


def tiny_sd() -> Path:
    """The tiny Stable Diffusion 1.x-family checkpoint (float32), built offline."""
    return build_random_checkpoint(cache_path("tiny-sd"), TINY_SD_ARCH)


def random_sd15() -> Path:
    """Stable Diffusion 1.5's architecture with random weights, saved in fp16 (~2 GB)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return build_random_checkpoint(cache_path("sd15-random"), sd15_arch(), dtype=torch.float16, device=device)


def random_pixart_xl() -> Path:
    """PixArt-XL-2-1024-MS's architecture with random weights, saved in fp16 (~11 GB, most of it T5-XXL)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return build_random_checkpoint(cache_path("pixart-random"), pixart_xl_arch(), dtype=torch.float16, device=device)


def tiny_pixart() -> Path:
    """The tiny PixArt-α-family checkpoint (float32), built offline."""
    return build_random_checkpoint(cache_path("tiny-pixart"), TINY_PIXART_ARCH)
