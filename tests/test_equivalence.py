"""The runtime generates what diffusers' StableDiffusionXLPipeline generates for the same checkpoint and inputs (fp32).

The compiled (AOTInductor) UNet and VAE decoder are not bit-identical to eager PyTorch: fused kernels round fp32
differently. Measured on the tiny model (CPU, AVX512), over up to 8 Euler steps with latents up to ~33 in magnitude:
latents differ by at most ~5.6e-5 absolute (relative L2 error ~1.7e-6), decoded images in [0, 1] by at most
~2.2e-6. The bounds below are a few times that; a real mistake (a wrong negative conditioning, time id, guidance
or noise draw) moves latents by 1e-1 or more, which test_tolerance_discriminates checks.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionXLPipeline,
)

from fastdiff.runtime import Resolution, load_pipeline
from fastdiff.runtime.format import MANIFEST_NAME, describe_files

LATENT_TOL = {"rtol": 1e-4, "atol": 1e-4}
IMAGE_TOL = {"rtol": 1e-4, "atol": 1e-5}
PROMPT = "a photo of a cat"
EXPORTED = [Resolution(64, 64), Resolution(96, 64)]  # conftest's EXPORT_RESOLUTIONS, width x height


def _call(pipe, seed: int, output_type: str, **kwargs):
    kwargs = {"prompt": PROMPT, "num_inference_steps": 3, "guidance_scale": 5.0, **kwargs}
    return pipe(**kwargs, generator=torch.Generator().manual_seed(seed), output_type=output_type).images


def _both(ours, reference, seed: int = 0, output_type: str = "latent", **kwargs):
    mine = _call(ours, seed, output_type, **kwargs)
    # diffusers' own default size is the UNet's sample size (128 here), so it is always given the size explicitly.
    kwargs.setdefault("height", 64)
    kwargs.setdefault("width", 64)
    theirs = _call(reference, seed, output_type, **kwargs)
    return mine, theirs


LATENT_CASES = [
    pytest.param({}, 0, id="default"),
    pytest.param({"prompt": "a dog and a tree in the rain"}, 1, id="prompt2-seed1"),
    pytest.param({"prompt": "an orange cat, studio lighting, 35mm"}, 1234, id="prompt3-seed1234"),
    pytest.param({"prompt": ""}, 7, id="empty-prompt-seed7"),
    pytest.param({"prompt": "Ünïcödé, 日本語 and emoji 🙂 " * 3}, 5, id="unicode"),
    pytest.param({"prompt": "a very long prompt " * 40, "negative_prompt": "blurry " * 90}, 6, id="truncated"),
    pytest.param({"num_inference_steps": 1}, 0, id="steps1"),
    pytest.param({"num_inference_steps": 8}, 3, id="steps8"),
    pytest.param({"guidance_scale": 1.0}, 0, id="guidance1-off"),
    pytest.param({"guidance_scale": 0.0}, 0, id="guidance0-off"),
    pytest.param({"guidance_scale": 9.0, "num_inference_steps": 8}, 5, id="guidance9-steps8"),
    pytest.param({"negative_prompt": None}, 2, id="negative-none-zeros"),
    pytest.param({"negative_prompt": ""}, 2, id="negative-empty"),
    pytest.param({"negative_prompt": "blurry, low quality"}, 2, id="negative-text"),
    pytest.param({"negative_prompt": "blurry", "guidance_scale": 1.0}, 2, id="negative-ignored-without-cfg"),
    pytest.param({"prompt": ["a cat", "a dog and a tree"], "negative_prompt": ["ugly", "blurry"]}, 4, id="list"),
    pytest.param({"prompt": ["a cat", "a dog"]}, 4, id="list-zero-negatives"),
    pytest.param({"num_images_per_prompt": 3}, 0, id="per-prompt3-chunked"),
    pytest.param({"num_images_per_prompt": 3, "guidance_scale": 0.0}, 0, id="per-prompt3-no-cfg"),
    pytest.param(
        {"prompt": ["a cat", "a dog"], "negative_prompt": ["ugly", ""], "num_images_per_prompt": 3},
        6,
        id="list-per-prompt3",
    ),
    pytest.param({"height": 64, "width": 96}, 0, id="96x64"),
    pytest.param({"height": 64, "width": 96, "num_images_per_prompt": 3, "num_inference_steps": 8}, 8, id="96x64-n3"),
]


def test_given_latents_and_step_callbacks_match(tiny_pipeline, reference_pipeline) -> None:
    """The initial latents given, a callback_on_step_end that sees every step's latents and replaces them once, and
    an interrupt from it, as in diffusers."""
    shape = (2, *tiny_pipeline.manifest.model.latent_shape(Resolution(96, 64)))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    seen: dict[str, list] = {"mine": [], "theirs": []}

    def callback(key: str):
        def on_step_end(pipe, i: int, t: torch.Tensor, tensors: dict) -> dict:
            seen[key].append((i, float(t), pipe.num_timesteps, tensors["latents"].clone()))
            if i == 2:
                pipe._interrupt = True  # the steps after this one are skipped
            return {"latents": tensors["latents"] * 0.5} if i == 1 else {}

        return on_step_end

    kwargs = {"height": 64, "width": 96, "num_images_per_prompt": 2, "num_inference_steps": 5, "latents": noise}
    mine = _call(tiny_pipeline, 0, "latent", callback_on_step_end=callback("mine"), **kwargs)
    theirs = _call(reference_pipeline, 0, "latent", callback_on_step_end=callback("theirs"), **kwargs)
    torch.testing.assert_close(mine, theirs, **LATENT_TOL)
    assert [s[:3] for s in seen["mine"]] == [s[:3] for s in seen["theirs"]] and len(seen["mine"]) == 3
    for (*_, a), (*_, b) in zip(seen["mine"], seen["theirs"], strict=True):
        torch.testing.assert_close(a, b, **LATENT_TOL)
    # The latents given are the noise: another seed for the generator changes nothing.
    again = _call(tiny_pipeline, 99, "latent", **{**kwargs, "num_inference_steps": 2})
    torch.testing.assert_close(again, _call(tiny_pipeline, 0, "latent", **{**kwargs, "num_inference_steps": 2}))
    assert not tiny_pipeline.interrupt  # a new call starts uninterrupted


@pytest.mark.parametrize(("kwargs", "seed"), LATENT_CASES)
def test_latents_match(tiny_pipeline, reference_pipeline, kwargs: dict, seed: int) -> None:
    mine, theirs = _both(tiny_pipeline, reference_pipeline, seed, **kwargs)
    prompts = 1 if isinstance(kwargs.get("prompt", PROMPT), str) else len(kwargs["prompt"])
    n = prompts * kwargs.get("num_images_per_prompt", 1)
    assert mine.shape == theirs.shape == (n, 4, kwargs.get("height", 64) // 8, kwargs.get("width", 64) // 8)
    assert mine.dtype == torch.float32
    assert torch.isfinite(mine).all()
    torch.testing.assert_close(mine, theirs, **LATENT_TOL)


def test_tolerance_discriminates(tiny_pipeline) -> None:
    """Differences that the cases above must catch are far outside the tolerance."""
    base = _call(tiny_pipeline, 0, "latent")
    variants = {
        "zero vs encoded empty negative": _call(tiny_pipeline, 0, "latent", negative_prompt=""),
        "other seed": _call(tiny_pipeline, 1, "latent"),
        "guidance 4.5": _call(tiny_pipeline, 0, "latent", guidance_scale=4.5),
        "other prompt": _call(tiny_pipeline, 0, "latent", prompt="a photo of a dog"),
    }
    for name, other in variants.items():
        assert not torch.allclose(base, other, **LATENT_TOL), name

    # and the same call twice is reproducible
    torch.testing.assert_close(base, _call(tiny_pipeline, 0, "latent"), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "seed"),
    [
        pytest.param({}, 0, id="default"),
        pytest.param({"num_inference_steps": 8, "negative_prompt": "blurry"}, 11, id="steps8-negative"),
        pytest.param({"guidance_scale": 0.0}, 3, id="no-cfg"),
        pytest.param({"prompt": ["a cat", "a dog"], "negative_prompt": ["ugly", "blurry"]}, 4, id="list"),
        pytest.param({"height": 64, "width": 96, "num_images_per_prompt": 3}, 5, id="96x64-n3"),
    ],
)
def test_np_images_match(tiny_pipeline, reference_pipeline, kwargs: dict, seed: int) -> None:
    mine, theirs = _both(tiny_pipeline, reference_pipeline, seed, output_type="np", **kwargs)
    prompts = 1 if isinstance(kwargs.get("prompt", PROMPT), str) else len(kwargs["prompt"])
    n = prompts * kwargs.get("num_images_per_prompt", 1)
    assert isinstance(mine, np.ndarray)
    assert mine.shape == theirs.shape == (n, kwargs.get("height", 64), kwargs.get("width", 64), 3)
    assert mine.dtype == np.float32
    assert mine.min() >= 0.0 and mine.max() <= 1.0
    assert mine.std() > 1e-3  # an image, not a constant
    torch.testing.assert_close(torch.from_numpy(mine), torch.from_numpy(theirs), **IMAGE_TOL)


@pytest.mark.parametrize(("height", "width", "per_prompt"), [(64, 64, 1), (64, 96, 3)])
def test_pil_images(tiny_pipeline, reference_pipeline, height: int, width: int, per_prompt: int) -> None:
    mine, theirs = _both(
        tiny_pipeline, reference_pipeline, 9, "pil", height=height, width=width, num_images_per_prompt=per_prompt
    )
    assert isinstance(mine, list) and len(mine) == len(theirs) == per_prompt
    for image, expected in zip(mine, theirs, strict=True):
        assert isinstance(image, PIL.Image.Image)
        assert image.mode == "RGB"
        assert image.size == (width, height)
        # float differences of ~1e-6 can flip a rounding to the next 8-bit level, no more
        diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
        assert diff.max() <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_pixels_round_as_diffusers(dtype: torch.dtype) -> None:
    """On a GPU the PIL images are rounded to 8 bits on the device: the same arithmetic as diffusers' numpy_to_pil."""
    from diffusers.image_processor import VaeImageProcessor

    from fastdiff.runtime.pipeline import uint8_pixels

    levels = torch.arange(256) / 255
    edges = torch.cat([levels, levels + 0.5 / 255, levels - 0.5 / 255]).clamp(0, 1)  # 8-bit levels and half-way points
    noise = torch.rand(2 * 3 * 32 * 32 - len(edges), generator=torch.Generator().manual_seed(0))
    images = torch.cat([edges, noise]).reshape(2, 3, 32, 32).to(dtype)
    expected = [np.asarray(p) for p in VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))]
    assert np.array_equal(uint8_pixels(images).numpy(), np.stack(expected))


def test_a_cut_prompt_is_reported(tiny_pipeline, caplog: pytest.LogCaptureFixture) -> None:
    """As diffusers warns: what the text encoder could not take is said, once per prompt, for negatives too."""
    with caplog.at_level(logging.WARNING, logger="fastdiff.runtime.text"):
        _call(tiny_pipeline, 0, "latent", prompt="a very long prompt " * 40, negative_prompt="blurry " * 90)
        _call(tiny_pipeline, 0, "latent", prompt="a short prompt", negative_prompt="blurry")
    cut = [r.getMessage() for r in caplog.records if r.name == "fastdiff.runtime.text"]
    assert len(cut) == 2 and all(m.startswith("prompt cut to its first 77 tokens") for m in cut), cut
    assert "'a very long prompt" in cut[0] and "'blurry blurry" in cut[1]


def test_default_resolution_is_first_exported(tiny_pipeline, reference_pipeline) -> None:
    """The tiny preset's default (128) was not exported here, so the runtime falls back to the smallest exported."""
    manifest = tiny_pipeline.manifest
    assert manifest.model.default_resolution == [128, 128]
    assert Resolution(128, 128) not in tiny_pipeline.resolutions
    assert tiny_pipeline.resolutions == EXPORTED
    mine, theirs = _both(tiny_pipeline, reference_pipeline, 0)  # no height/width for ours; 64x64 for diffusers
    assert mine.shape == (1, 4, 8, 8)
    torch.testing.assert_close(mine, theirs, **LATENT_TOL)
    explicit = _call(tiny_pipeline, 0, "latent", height=64, width=64)
    torch.testing.assert_close(mine, explicit, rtol=0, atol=0)


SCHEDULERS = [EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler]


@pytest.fixture(scope="module", params=SCHEDULERS, ids=lambda cls: cls.__name__)
def scheduler_case(request, tiny_artifact: Path, reference_pipeline, tmp_path_factory: pytest.TempPathFactory):
    """(runtime pipeline on a copy of the artifact saved with another scheduler, diffusers with the same one)."""
    cls = request.param
    copy = Path(shutil.copytree(tiny_artifact, tmp_path_factory.mktemp("scheduler") / cls.__name__))
    config_path = copy / "scheduler" / "scheduler_config.json"
    cls.from_config(json.loads(config_path.read_text())).save_pretrained(copy / "scheduler")
    assert json.loads(config_path.read_text())["_class_name"] == cls.__name__
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    rel = "scheduler/scheduler_config.json"
    manifest["files"][rel] = describe_files(copy)[rel]
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))

    ours = load_pipeline(copy, device="cpu", verify=True)  # verify: the updated manifest matches every file
    ours.set_progress_bar_config(disable=True)
    assert type(ours.scheduler) is cls
    reference = StableDiffusionXLPipeline(
        **{**reference_pipeline.components, "scheduler": cls.from_config(reference_pipeline.scheduler.config)}
    )
    reference.set_progress_bar_config(disable=True)
    return ours, reference


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"num_inference_steps": 8}, id="steps8"),
        pytest.param({"num_inference_steps": 3, "negative_prompt": "blurry"}, id="steps3-negative"),
        # more images than the compiled batch: an ancestral scheduler's per-step noise must still be drawn
        # for all images at once, as diffusers draws it
        pytest.param({"num_inference_steps": 8, "num_images_per_prompt": 3}, id="steps8-n3-chunked"),
        pytest.param({"num_inference_steps": 3, "guidance_scale": 0.0, "height": 64, "width": 96}, id="no-cfg-96x64"),
    ],
)
def test_other_scheduler_matches(scheduler_case, kwargs: dict) -> None:
    ours, reference = scheduler_case
    mine, theirs = _both(ours, reference, 3, **kwargs)
    assert torch.isfinite(mine).all()
    torch.testing.assert_close(mine, theirs, **LATENT_TOL)


def test_other_scheduler_changes_result(scheduler_case, tiny_pipeline) -> None:
    """The copied artifact really runs its own scheduler (else the comparison above would prove little)."""
    ours, _ = scheduler_case
    assert not torch.allclose(_call(ours, 3, "latent"), _call(tiny_pipeline, 3, "latent"), **LATENT_TOL)


def test_warm_up_changes_nothing(tiny_artifact: Path, tiny_pipeline) -> None:
    """load_pipeline(warmup=True) (the GPU default) runs every compiled module once before the first request; the
    results are the same to the bit, and the warm-up needs no scheduler."""
    from fastdiff.runtime import load_pipeline

    warm = load_pipeline(tiny_artifact, device="cpu", warmup=True)
    warm.set_progress_bar_config(disable=True)
    for kwargs in ({}, {"guidance_scale": 1.0, "height": 64, "width": 96}, {"num_images_per_prompt": 3}):
        torch.testing.assert_close(
            _call(warm, 0, "latent", **kwargs), _call(tiny_pipeline, 0, "latent", **kwargs), rtol=0, atol=0
        )
    warm.scheduler = None
    warm.warm_up()


def test_phases_are_named_in_profiles(tiny_pipeline) -> None:
    """A call's phases show in a torch.profiler trace under their names, in order (bench/common.py's timeline reads
    them); a latent-only call stops after the denoise loop."""
    from torch.profiler import ProfilerActivity, profile

    from fastdiff.runtime.pipeline import PHASES

    def phases(output_type: str) -> list[str]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _call(tiny_pipeline, 0, output_type)
        spans = sorted((e.time_range.start, e.name) for e in prof.events() if e.name.startswith("fastdiff::"))
        return [name.removeprefix("fastdiff::") for _, name in spans]

    assert phases("pil") == list(PHASES)
    assert phases("latent") == ["encode_prompt", "denoise"]
