import dataclasses
import inspect

import pytest

from sdx4.options import MAX_NOISE_LEVEL, OptionsError, UpscaleOptions, option_defaults


def test_defaults_equal_diffusers_pipeline_defaults():
    from diffusers import StableDiffusionUpscalePipeline

    sig = inspect.signature(StableDiffusionUpscalePipeline.__call__).parameters
    d = option_defaults()
    assert d["steps"] == sig["num_inference_steps"].default == 75
    assert d["guidance"] == sig["guidance_scale"].default == 9.0
    assert d["noise_level"] == sig["noise_level"].default == 20
    assert d["eta"] == sig["eta"].default == 0.0
    assert d["num_images"] == sig["num_images_per_prompt"].default == 1
    assert d["prompt"] == "" and d["negative_prompt"] == "" and d["seed"] is None and d["method"] == "sd"


def test_options_are_frozen():
    o = UpscaleOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("noise_level", 351, "noise_level must be in 0..350; got 351"),
        ("noise_level", -1, "noise_level must be in 0..350; got -1"),
        ("noise_level", 2.5, "noise_level must be an integer in 0..350"),
        ("steps", 0, "steps must be in 1..500; got 0"),
        ("steps", 1000, "steps must be in 1..500; got 1000"),
        ("guidance", -1.0, "guidance must be in 0..100; got -1"),
        ("guidance", float("nan"), "guidance must be a number"),
        ("eta", 2.0, "eta must be in 0..1; got 2"),
        ("seed", -5, "seed must be in 0.."),
        ("num_images", 0, "num_images must be in 1..16; got 0"),
        ("method", "magic", "method must be one of sd, nearest, bilinear, bicubic, lanczos; got 'magic'"),
        ("prompt", 3, "prompt must be a string"),
        ("steps", True, "steps must be an integer"),
    ],
)
def test_bad_values_name_the_option_and_range(field, value, message):
    with pytest.raises(OptionsError) as e:
        UpscaleOptions(**{field: value})
    assert message in str(e.value)


def test_max_noise_level_is_350():
    assert MAX_NOISE_LEVEL == 350
    assert UpscaleOptions(noise_level=350).noise_level == 350


def test_with_seed_keeps_given_and_draws_missing():
    assert UpscaleOptions(seed=7).with_seed().seed == 7
    drawn = {UpscaleOptions().with_seed().seed for _ in range(5)}
    assert all(isinstance(s, int) and 0 <= s < 2**32 for s in drawn)
    assert len(drawn) > 1


def test_guidance_threshold():
    assert not UpscaleOptions(guidance=1.0).do_guidance
    assert not UpscaleOptions(guidance=0.5).do_guidance
    assert UpscaleOptions(guidance=1.01).do_guidance
