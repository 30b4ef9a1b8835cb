"""The core loop on a tiny random model: parity with diffusers, determinism, sizes, guidance passes."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdx4.engine.loop import pad_to_multiple
from sdx4.options import OptionsError, UpscaleOptions


def diffusers_pipeline(components):
    from diffusers import StableDiffusionUpscalePipeline

    c = components
    pipe = StableDiffusionUpscalePipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        unet=c.unet,
        low_res_scheduler=c.low_res_scheduler,
        scheduler=c.scheduler,
        max_noise_level=c.max_noise_level,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


PARITY_CASES = [
    # prompt, negative prompt, guidance, noise level, images per prompt
    ("a photo of a cat", "", 9.0, 20, 1),
    ("a photo of a cat", "blurry, low quality", 9.0, 0, 1),
    ("a photo of a cat", "blurry, low quality", 4.5, 350, 1),
    ("the cat", "noise", 1.0, 20, 1),  # guidance off: one UNet pass, negative prompt unused
    ("the cat", "noise", 9.0, 100, 2),
]


@pytest.mark.parametrize("prompt, negative, guidance, noise_level, n", PARITY_CASES)
def test_same_seed_same_image_as_diffusers(tiny_upscaler, rng_image, prompt, negative, guidance, noise_level, n):
    image = Image.fromarray(rng_image(32, 24, seed=noise_level))
    ours = tiny_upscaler(
        image, prompt=prompt, negative_prompt=negative, guidance=guidance, noise_level=noise_level, steps=3,
        seed=1234, num_images=n,
    )
    ref = diffusers_pipeline(tiny_upscaler.components)(
        prompt=prompt,
        negative_prompt=negative,
        image=image,
        guidance_scale=guidance,
        noise_level=noise_level,
        num_inference_steps=3,
        num_images_per_prompt=n,
        generator=torch.Generator("cpu").manual_seed(1234),
    ).images
    assert len(ours.images) == len(ref) == n
    for a, b in zip(ours.images, ref):
        a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
        assert a.shape == b.shape == (128, 96, 3)
        assert np.abs(a - b).max() <= 1
        assert a.std() > 5  # a real image, not a constant that would match anything


def test_parity_fails_when_the_seed_differs(tiny_upscaler, rng_image):
    """The parity check is sensitive: a different random stream gives a visibly different image."""
    image = Image.fromarray(rng_image(32, 24))
    ours = tiny_upscaler(image, prompt="a cat", steps=3, seed=1)
    ref = diffusers_pipeline(tiny_upscaler.components)(
        prompt="a cat", image=image, num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(2)
    ).images[0]
    assert np.abs(np.asarray(ours.image, dtype=np.int16) - np.asarray(ref, dtype=np.int16)).max() > 10


def test_same_seed_same_bytes_different_seed_different_output(tiny_upscaler, rng_image):
    image = rng_image(24, 16)
    a = np.asarray(tiny_upscaler(image, steps=2, seed=5).image)
    b = np.asarray(tiny_upscaler(image, steps=2, seed=5).image)
    c = np.asarray(tiny_upscaler(image, steps=2, seed=6).image)
    assert a.tobytes() == b.tobytes()
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1


def test_random_seed_is_drawn_and_reported(tiny_upscaler, rng_image):
    image = rng_image(16, 16)
    r = tiny_upscaler(image, steps=2)
    assert isinstance(r.seed, int)
    again = tiny_upscaler(image, steps=2, seed=r.seed)
    assert np.asarray(again.image).tobytes() == np.asarray(r.image).tobytes()


@pytest.mark.parametrize("h, w", [(13, 7), (1, 1), (1, 17), (9, 33), (40, 8)])
def test_any_size_gives_exactly_4x(tiny_upscaler, rng_image, h, w):
    r = tiny_upscaler(rng_image(h, w), steps=1, seed=0)
    assert r.image.size == (4 * w, 4 * h)
    assert r.metadata["output_size"] == [4 * w, 4 * h]


def test_padding_reflects_and_is_cropped_back():
    x = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(1, 2, 3, 5)
    y, (h, w) = pad_to_multiple(x, 4)
    assert y.shape == (1, 2, 4, 8) and (h, w) == (3, 5)
    assert torch.equal(y[..., :3, :5], x)
    assert torch.equal(y[..., 3, :5], x[..., 1, :])  # reflect, not zeros
    tiny = torch.ones(1, 1, 1, 1)
    assert pad_to_multiple(tiny, 8)[0].shape == (1, 1, 8, 8)  # 1 px: replicate


def count_unet_calls(upscaler, monkeypatch):
    calls = []
    unet = upscaler.components.unet
    original = unet.forward

    def spy(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return original(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", spy)
    return calls


@pytest.mark.parametrize("guidance, batch", [(1.0, 1), (0.0, 1), (9.0, 2)])
def test_guidance_at_most_one_runs_a_single_unet_pass(tiny_upscaler, rng_image, monkeypatch, guidance, batch):
    calls = count_unet_calls(tiny_upscaler, monkeypatch)
    tiny_upscaler(rng_image(16, 16), steps=3, seed=0, guidance=guidance)
    assert calls == [batch] * 3


def test_input_types_agree(tiny_upscaler, rng_image, tmp_path):
    arr = rng_image(20, 12)
    path = tmp_path / "in.png"
    Image.fromarray(arr).save(path)
    inputs = {
        "pil": Image.fromarray(arr),
        "numpy_uint8": arr,
        "numpy_float": arr.astype(np.float32) / 255.0,
        "tensor_chw_float": torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0,
        "tensor_1chw_uint8": torch.from_numpy(arr).permute(2, 0, 1)[None],
        "path": str(path),
    }
    outs = {k: np.asarray(tiny_upscaler(v, steps=2, seed=3).image) for k, v in inputs.items()}
    ref = outs.pop("pil")
    for name, out in outs.items():
        assert out.tobytes() == ref.tobytes(), name


def test_alpha_is_kept_and_upscaled_classically(tiny_upscaler, rng_image):
    rgba = rng_image(12, 10, channels=4)
    r = tiny_upscaler(rgba, steps=1, seed=0)
    assert r.image.mode == "RGBA" and r.image.size == (40, 48)
    expected = Image.fromarray(rgba[:, :, 3]).resize((40, 48), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(r.image.getchannel("A")), np.asarray(expected))
    rgb_only = tiny_upscaler(rgba[:, :, :3], steps=1, seed=0)
    assert np.array_equal(np.asarray(r.image.convert("RGB")), np.asarray(rgb_only.image))


def test_metadata_has_every_parameter(tiny_upscaler, rng_image, tiny_model_dir):
    r = tiny_upscaler(rng_image(8, 8), prompt="p", negative_prompt="n", steps=2, guidance=3.0, noise_level=40, seed=9)
    m = r.metadata
    assert (m["prompt"], m["negative_prompt"], m["steps"], m["guidance"], m["noise_level"], m["seed"]) == (
        "p", "n", 2, 3.0, 40, 9,
    )
    assert m["model"] == str(tiny_model_dir) and m["random_weights"] is True
    assert m["sdx4_version"] and m["unet_dtype"] == "fp32" and m["vae_dtype"] == "fp32"
    assert set(m["timings"]) == {"text_encoding", "denoising", "decoding"}


def test_progress_is_reported_and_can_cancel(tiny_upscaler, rng_image):
    seen = []
    tiny_upscaler(rng_image(8, 8), steps=4, seed=0, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    class Stop(Exception):
        pass

    def cancel(i, n):
        if i == 2:
            raise Stop

    with pytest.raises(Stop):
        tiny_upscaler(rng_image(8, 8), steps=4, seed=0, progress=cancel)


def test_noise_level_above_the_models_maximum_is_refused(tiny_upscaler, rng_image, monkeypatch):
    monkeypatch.setattr(tiny_upscaler.components, "max_noise_level", 100)
    with pytest.raises(OptionsError, match=r"noise_level must be in 0..100; got 150"):
        tiny_upscaler(rng_image(8, 8), steps=1, seed=0, noise_level=150)


def test_bad_inputs_are_named(tiny_upscaler):
    from sdx4.imageio import ImageInputError

    with pytest.raises(ImageInputError, match="expected an HxWxC array"):
        tiny_upscaler(np.zeros((2, 3, 4, 5), dtype=np.uint8), steps=1)
    with pytest.raises(ImageInputError, match=r"float image must be in \[0, 1\]"):
        tiny_upscaler(np.full((4, 4, 3), 2.0, dtype=np.float32), steps=1)
    with pytest.raises(ImageInputError, match="unsupported input type int"):
        tiny_upscaler(5, steps=1)
    with pytest.raises(ImageInputError, match="no such file"):
        tiny_upscaler("/nonexistent/x.png", steps=1)


def test_classical_method_through_the_same_interface_needs_no_model(rng_image):
    import sdx4

    arr = rng_image(10, 7)
    r = sdx4.upscale(arr, method="lanczos")
    assert r.image.size == (28, 40)
    assert np.array_equal(np.asarray(r.image), np.asarray(Image.fromarray(arr).resize((28, 40), Image.Resampling.LANCZOS)))
    with pytest.raises(ValueError, match="needs the model"):
        sdx4.upscale(arr, method="sd")


def test_upscaler_runs_classical_methods_too(tiny_upscaler, rng_image):
    arr = rng_image(10, 7)
    r = tiny_upscaler(arr, UpscaleOptions(method="bicubic"))
    assert np.array_equal(np.asarray(r.image), np.asarray(Image.fromarray(arr).resize((28, 40), Image.Resampling.BICUBIC)))
    assert r.metadata["method"] == "bicubic" and "seed" not in r.metadata
