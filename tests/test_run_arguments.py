"""What a generation is asked for: fastdiff-run's options and the pipeline call's arguments are refused when they
make no sense or name what the artifact was not exported for, before anything is generated."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import invoke_cli
from diffusers.callbacks import SDCFGCutoffCallback
from helpers import INVALID_RES, assert_clean_error, images_in, run

from fastdiff.runtime import FastDiffError, load_pipeline, parse_resolution

EXPORTED = "64x64, 96x64"  # how messages list conftest's EXPORT_RESOLUTIONS


def test_unexported_resolution(tiny_artifact: Path, tiny_pipeline, tmp_path: Path) -> None:
    proc = run(tiny_artifact, tmp_path, "--res", "128")
    assert_clean_error(proc, "128x128", EXPORTED)
    with pytest.raises(FastDiffError, match=EXPORTED):
        tiny_pipeline("a cat", num_inference_steps=1, height=128, width=128)
    with pytest.raises(FastDiffError, match=EXPORTED):
        load_pipeline(tiny_artifact, device="cpu", resolutions=["128"])
    with pytest.raises(FastDiffError, match=EXPORTED):  # one resolution given as a string, not its characters
        load_pipeline(tiny_artifact, device="cpu", resolutions="128")
    with pytest.raises(FastDiffError, match="no resolution asked for"):
        load_pipeline(tiny_artifact, device="cpu", resolutions=[])
    assert images_in(tmp_path) == []


def test_transposed_resolution_is_not_exported(tiny_pipeline) -> None:
    with pytest.raises(FastDiffError, match=r"64x96 \(width x height\) was not exported"):
        tiny_pipeline("a cat", num_inference_steps=1, height=96, width=64)


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_non_positive_steps_cli(tiny_artifact: Path, tmp_path: Path, steps: str) -> None:
    proc = invoke_cli(
        "fastdiff-run", str(tiny_artifact), "-p", "a cat", "--steps", steps, "--out", str(tmp_path / "i.png")
    )
    assert_clean_error(proc, "--steps", steps, usage=True)
    assert images_in(tmp_path) == []


@pytest.mark.parametrize("steps", [0, -3, 1.5, True])
def test_non_positive_steps_api(tiny_pipeline, steps) -> None:
    with pytest.raises(FastDiffError, match="num_inference_steps must be a positive integer"):
        tiny_pipeline("a cat", num_inference_steps=steps, height=64, width=64)


def test_bad_call_arguments_api(tiny_pipeline) -> None:
    with pytest.raises(FastDiffError, match="guidance_scale must be a finite number"):
        tiny_pipeline("a cat", num_inference_steps=1, guidance_scale=float("nan"))
    with pytest.raises(FastDiffError, match="num_images_per_prompt"):
        tiny_pipeline("a cat", num_inference_steps=1, num_images_per_prompt=0)
    with pytest.raises(FastDiffError, match="negative prompts for"):
        tiny_pipeline(["a", "b"], negative_prompt=["x"], num_inference_steps=1)
    with pytest.raises(FastDiffError, match="give both height and width"):
        tiny_pipeline("a cat", num_inference_steps=1, height=64)
    with pytest.raises(FastDiffError, match="output_type"):
        tiny_pipeline("a cat", num_inference_steps=1, output_type="bmp")
    for count in (2, 3):  # diffusers refuses a generator list that is not one per image, too
        generators = [torch.Generator().manual_seed(i) for i in range(count)]
        with pytest.raises(FastDiffError, match=rf"{count} generators for 1 image(?!s)"):
            tiny_pipeline("a cat", num_inference_steps=1, generator=generators)


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"prompt": None}, "prompt must be a string or a non-empty list of strings, got None"),
        ({"prompt": 5}, "prompt must be a string"),
        ({"prompt": []}, "prompt must be a string"),
        ({"prompt": ["a", 5]}, "prompt must be a string"),
        ({"negative_prompt": 5}, "negative_prompt must be a string"),
        ({"guidance_scale": "5"}, "guidance_scale must be a finite number, got '5'"),
        ({"width": "abc", "height": 64}, "height and width must be positive integers"),
        ({"width": 64.9, "height": 64}, "height and width must be positive integers"),
        ({"generator": "x"}, "generator must be a torch.Generator or a list of them"),
        ({"generator": [torch.Generator(), 1]}, "generator must be a torch.Generator or a list of them"),
        ({"latents": torch.zeros(1, 4, 8, 9)}, "latents must be a tensor of shape (1, 4, 8, 8) for this call, got"),
        ({"latents": [0.0]}, "latents must be a tensor of shape (1, 4, 8, 8) for this call, got list"),
        ({"callback_on_step_end": "x"}, "callback_on_step_end must be callable"),
        (
            {"callback_on_step_end": lambda *a: {}, "callback_on_step_end_tensor_inputs": ["prompt_embeds"]},
            "callback_on_step_end_tensor_inputs asks for 'prompt_embeds'; this pipeline offers only latents",
        ),
        (
            {"callback_on_step_end": SDCFGCutoffCallback(cutoff_step_ratio=0.5)},  # a diffusers PipelineCallback
            "callback_on_step_end (its tensor_inputs) asks for 'prompt_embeds'",
        ),
        ({"callback_on_step_end": lambda *a: {"latents": None}}, "the latents callback_on_step_end returned must be"),
        ({"cross_attention_kwargs": {"scale": 0.5, "ip_adapter_masks": 1}}, "'ip_adapter_masks' is not supported"),
        ({"cross_attention_kwargs": {"scale": float("inf")}}, "cross_attention_kwargs' scale must be a finite number"),
        ({"cross_attention_kwargs": {"scale": "0.5"}}, "cross_attention_kwargs' scale must be a finite number"),
        ({"cross_attention_kwargs": 0.5}, "cross_attention_kwargs must be a dict, got 0.5"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) else None,
)
def test_call_arguments_of_the_wrong_type_api(tiny_pipeline, kwargs: dict, phrase: str) -> None:
    """The API's errors are FastDiffErrors for wrongly typed arguments too, not a TypeError from deep inside."""
    with pytest.raises(FastDiffError, match=re.escape(phrase)):
        tiny_pipeline(**{"prompt": "a cat", "num_inference_steps": 1, **kwargs})


def test_call_arguments_of_other_types_that_diffusers_takes_api(tiny_pipeline) -> None:
    """A numpy number or a 0-d tensor as the guidance, sizes as floats without a fraction, prompts in a tuple."""
    import numpy as np

    def latents(**kwargs):
        call = {"prompt": "a cat", "num_inference_steps": 1, "height": 64, "width": 64, "output_type": "latent"}
        return tiny_pipeline(**{**call, **kwargs}, generator=torch.Generator().manual_seed(0)).images

    expected = latents(guidance_scale=5.0)
    for kwargs in (
        {"guidance_scale": torch.tensor(5.0)},
        {"guidance_scale": np.float32(5.0)},
        {"guidance_scale": 5.0, "height": 64.0, "width": np.int64(64)},
        {"guidance_scale": 5.0, "prompt": ("a cat",)},
    ):
        torch.testing.assert_close(latents(**kwargs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("guidance", ["nan", "inf"])
def test_guidance_not_finite_cli(tiny_artifact: Path, tmp_path: Path, guidance: str) -> None:
    proc = run(tiny_artifact, tmp_path, "--guidance", guidance)
    assert_clean_error(proc, "--guidance", f"{guidance} is not a finite number", usage=True)
    assert images_in(tmp_path) == []


def test_seed_out_of_range_cli(tiny_artifact: Path, tmp_path: Path) -> None:
    proc = run(tiny_artifact, tmp_path, "--seed", str(2**64))
    assert_clean_error(proc, "--seed", usage=True)
    assert images_in(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_run_device_cuda_without_gpu(tiny_artifact: Path, tmp_path: Path) -> None:
    assert_clean_error(run(tiny_artifact, tmp_path, "--device", "cuda"), "no CUDA GPU is visible", "--device cpu")
    assert images_in(tmp_path) == []
    for device in ("cuda", "cuda:1", torch.device("cuda", 0)):
        with pytest.raises(FastDiffError, match="no CUDA GPU is visible"):
            load_pipeline(tiny_artifact, device=device)


def test_run_unknown_device(tiny_artifact: Path, tmp_path: Path) -> None:
    assert_clean_error(run(tiny_artifact, tmp_path, "--device", "tpu"), "unknown device 'tpu'")


@pytest.mark.parametrize(("res", "phrase"), INVALID_RES)
def test_invalid_res_api(tiny_artifact: Path, res: str, phrase: str) -> None:
    with pytest.raises(FastDiffError, match=re.escape(phrase)):
        parse_resolution(res)
    with pytest.raises(FastDiffError, match=re.escape(phrase)):
        load_pipeline(tiny_artifact, device="cpu", resolutions=[res])


def test_run_invalid_res(tiny_artifact: Path, tmp_path: Path) -> None:
    assert_clean_error(run(tiny_artifact, tmp_path, "--res", "100"), "not a multiple of 8", "e.g. 96")
    assert images_in(tmp_path) == []


def test_a_scheduler_that_cannot_run_the_steps(tiny_pipeline) -> None:
    """DDIM refuses more steps than the model was trained with: a FastDiffError (fastdiff-run: one line, exit 2)."""
    from diffusers import DDIMScheduler

    scheduler = tiny_pipeline.scheduler
    tiny_pipeline.scheduler = DDIMScheduler.from_config(scheduler.config)
    try:
        with pytest.raises(FastDiffError, match="DDIMScheduler cannot run 2000 steps"):
            tiny_pipeline("a cat", num_inference_steps=2000)
    finally:
        tiny_pipeline.scheduler = scheduler
