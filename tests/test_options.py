import dataclasses
import inspect

import pytest

import sdx4
from sdx4.options import (
    DEFAULT_MODEL,
    MAX_NOISE_LEVEL,
    LoadOptions,
    OptionsError,
    UpscaleOptions,
    option_defaults,
    parse_size,
)


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
        ("method", "magic", "method must be one of sd, nearest, bilinear, bicubic, lanczos, realesrgan, realesrgan-anime; got 'magic'"),
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


# ---- LoadOptions and err.option ---------------------------------------------------------------------

#: A bad value for every field of UpscaleOptions and LoadOptions (a field added without one fails below).
BAD_VALUES = {
    UpscaleOptions: {
        "prompt": 3, "negative_prompt": None, "steps": 0, "guidance": 101.0, "noise_level": 351, "eta": -0.5,
        "seed": -1, "num_images": 17, "method": "magic", "scheduler": "plms", "scale": 1, "color_fix": "sepia",
        "tile_size": 4, "tile_overlap": -1, "tile_batch": 65, "tile_blend": "hard", "max_memory": 2**20,
        "vae_attention_window": 8,
        "color_mode": "grey", "bit_depth": 12, "width": 0, "height": 70000,
        "preset": "turbo", "gan_weights": "my_net.pth",
    },
    LoadOptions: {
        "model": "", "device": "tpu", "dtype": "fp8", "vae_dtype": "fp16", "low_memory": "yes", "compile": 1,
        "weight_cache": "no",
        "loras": "style.safetensors",
    },
}  # fmt: skip


@pytest.mark.parametrize(
    "options_type, name",
    [(t, f.name) for t in BAD_VALUES for f in dataclasses.fields(t)],
    ids=lambda x: x if isinstance(x, str) else x.__name__,
)
def test_every_bad_option_carries_its_field_name_in_err_option(options_type, name):
    with pytest.raises(OptionsError) as e:
        options_type(**{name: BAD_VALUES[options_type][name]})
    assert e.value.option == name
    assert str(e.value).startswith(f"{name} must be")  # the message still names it first, byte-identical


def test_a_bad_size_names_max_memory_and_err_option_survives_pickling():
    import pickle

    with pytest.raises(OptionsError) as e:
        parse_size("6 bananas")
    assert e.value.option == "max_memory"
    again = pickle.loads(pickle.dumps(e.value))  # Ray ships exceptions between processes
    assert (type(again), str(again), again.option) == (OptionsError, str(e.value), "max_memory")
    assert OptionsError("not about one field").option is None


def test_load_options_defaults_are_those_of_sdx4_load():
    assert option_defaults(LoadOptions) == {
        "model": DEFAULT_MODEL, "device": "auto", "dtype": "auto", "vae_dtype": "fp32", "low_memory": None,
        "compile": False, "weight_cache": True, "loras": (),
    }  # fmt: skip
    load = inspect.signature(sdx4.load).parameters
    for name in ("device", "dtype", "vae_dtype", "low_memory", "compile", "weight_cache", "loras"):
        assert load[name].default == option_defaults(LoadOptions)[name], name
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoadOptions().device = "cpu"  # type: ignore[misc]


@pytest.mark.parametrize(
    "field, value, message",
    [  # the texts model/placement.py's resolve_placement has always given (tests/test_models.py asserts them)
        ("device", "tpu", "device must be auto, cpu, cuda, cuda:N or mps; got 'tpu'"),
        ("device", "cuda:x", "device must be auto, cpu, cuda, cuda:N or mps; got 'cuda:x'"),
        ("device", None, "device must be auto, cpu, cuda, cuda:N or mps; got None"),
        ("dtype", "fp8", "dtype must be auto, fp32, fp16 or bf16; got 'fp8'"),
        ("vae_dtype", "fp16", "vae_dtype must be fp32 or bf16 (fp16 decodes to NaN); got 'fp16'"),
        ("low_memory", "yes", "low_memory must be True, False or None (by device); got 'yes'"),
        ("compile", 1, "compile must be True or False; got 1"),
        ("model", "", "model must be a Hub id or a local folder in diffusers layout; got ''"),
        ("model", None, "model must be a string; got NoneType None"),
    ],
)
def test_bad_load_options_name_the_value_and_what_is_allowed(field, value, message):
    with pytest.raises(OptionsError) as e:
        LoadOptions(**{field: value})
    assert str(e.value) == message


def test_good_load_options_are_accepted_as_given():
    o = LoadOptions(model="./m", device="cuda:1", dtype="bf16", vae_dtype="bf16", low_memory=False, compile=True)
    assert (o.model, o.device, o.dtype, o.vae_dtype, o.low_memory, o.compile) == ("./m", "cuda:1", "bf16", "bf16", False, True)
    assert o.replace(device="cpu").device == "cpu" and o.device == "cuda:1"
    with pytest.raises(OptionsError, match="device must be"):
        o.replace(device="gpu")  # replace validates again


def test_load_options_round_trip_through_asdict_and_json_and_a_ray_job():
    import json

    from sdx4.batch.job import BatchJob
    from sdx4.batch.ray import job_from_dict, job_to_dict

    o = LoadOptions(model="./m", device="cpu", dtype="fp32", low_memory=True, compile=True)
    assert LoadOptions(**json.loads(json.dumps(dataclasses.asdict(o)))) == o
    assert o.to_dict() == dataclasses.asdict(o)
    job = BatchJob("in", "out", UpscaleOptions(steps=3, seed=1), load=o, recursive=True)
    back = job_from_dict(json.loads(json.dumps(job_to_dict(job))))
    assert (back.load, back.options) == (o, job.options)
    assert BatchJob("in", "out").load == LoadOptions()
