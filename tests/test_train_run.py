"""sdx4.train on the tiny random model: a real learning signal, resume == uninterrupted (bit for bit), and the LoRA
file diffusers' load_lora_weights reads (same UNet output)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdx4.options import LoadOptions
from sdx4.train import TrainOptions, train
from sdx4.train.loop import load_for_training
from sdx4.train.lora_file import add_lora, save_lora
from sdx4.train.step import StepModel, batch_loss, draw, stack


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared, loaded 2-core machine two spinning threads make each tiny op ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hr")
    for i in range(3):
        arr = np.random.RandomState(i).randint(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"im{i}.png")
    (folder / "im1.txt").write_text("a prompt")
    return folder


def fp32(model_dir):
    return LoadOptions(model=str(model_dir), device="cpu")


def lora_tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def test_the_loss_on_a_fixed_batch_falls_by_half_within_a_few_dozen_steps(
    tiny_model_dir,
):
    components, embeds = load_for_training(fp32(tiny_model_dir), "fp32", [""])
    unet = components.unet
    params = add_lora(unet, TrainOptions(rank=8), seed=0)
    unet.train()
    model = StepModel(
        unet,
        components.vae,
        components.scheduler,
        components.low_res_scheduler,
        350,
        torch.device("cpu"),
        None,
    )
    rng = np.random.RandomState(0)
    hr = torch.from_numpy(rng.randint(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    lr = torch.from_numpy(rng.randint(0, 256, (2, 8, 8, 3), dtype=np.uint8))
    draws = stack(
        [draw(torch.Generator().manual_seed(i), model, (8, 8)) for i in range(2)]
    )
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(30):
        loss = batch_loss(model, hr, lr, embeds[""].repeat(2, 1, 1), draws)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] <= 0.5 * losses[0], losses
    assert all(
        p.grad is None for p in unet.parameters() if not p.requires_grad
    )  # the frozen weights got none


def test_resume_after_an_interruption_gives_the_same_weights_bit_for_bit(
    tiny_model_dir, hr_dir, tmp_path
):
    options = TrainOptions(
        steps=4,
        crop=32,
        grad_accumulation=2,
        checkpoint_every=2,
        val_every=0,
        precision="fp32",
        learning_rate=1e-3,
    )
    straight = train(hr_dir, tmp_path / "straight", options, load=fp32(tiny_model_dir))

    class Killed(Exception):
        pass

    def kill_at_3(event):
        if event["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        train(
            hr_dir,
            tmp_path / "resumed",
            options,
            load=fp32(tiny_model_dir),
            progress=kill_at_3,
        )
    assert not (tmp_path / "resumed" / "lora.safetensors").exists()
    resumed = train(
        hr_dir, tmp_path / "resumed", options, load=fp32(tiny_model_dir), resume=True
    )
    assert resumed.resumed_from == 2
    a, b = lora_tensors(straight.lora), lora_tensors(resumed.lora)
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(
        a[k].abs().sum() > 0 for k in a if "lora.up" in k or "lora_B" in k
    )  # the adapter did train
    log_a = [
        json.loads(x)
        for x in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()
    ]
    log_b = [
        json.loads(x)
        for x in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in log_b] == [
        1,
        2,
        3,
        4,
    ]  # the interrupted step 3 is not logged twice
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    assert (
        set(log_a[0]) == {"step", "loss", "lr", "samples", "seconds"}
        and log_a[-1]["samples"] == 8
    )


def test_diffusers_load_lora_weights_reads_our_file_to_the_same_unet_output(
    tiny_model_dir, tmp_path
):
    from diffusers import StableDiffusionUpscalePipeline

    components, _ = load_for_training(fp32(tiny_model_dir), "fp32", [""])
    unet = components.unet
    add_lora(
        unet, TrainOptions(rank=4, alpha=8.0), seed=0
    )  # alpha != rank: the scale must come through
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.requires_grad:
                p.copy_(
                    torch.randn(p.shape, generator=g) * 0.05
                )  # lora_B starts at zero: make it matter
    path = save_lora(
        tmp_path / "lora.safetensors",
        unet,
        {"base_model": str(tiny_model_dir), "steps": "0"},
    )

    x = torch.randn(1, 7, 16, 16, generator=g)
    emb = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    t, level = torch.tensor([500]), torch.tensor([20])
    unet.eval()
    with torch.no_grad():
        ours = unet(x, t, encoder_hidden_states=emb, class_labels=level).sample
        unet.disable_adapters()
        base = unet(x, t, encoder_hidden_states=emb, class_labels=level).sample
        unet.enable_adapters()

    pipe = StableDiffusionUpscalePipeline.from_pretrained(
        tiny_model_dir, torch_dtype=torch.float32
    )
    pipe.load_lora_weights(path)
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=emb, class_labels=level).sample
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert all(k.startswith("unet.") for k in keys)
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["unet.r"] == 4 and adapter["unet.lora_alpha"] == 8.0
    assert meta["sdx4_base_model"] == str(tiny_model_dir) and meta["sdx4_steps"] == "0"


def test_pairs_a_validation_folder_and_loader_workers_run_end_to_end(
    tiny_model_dir, tmp_path
):
    from sdx4.quality.metrics import psnr_y

    hr, lr, val = tmp_path / "hr", tmp_path / "lr", tmp_path / "val"
    for folder in (hr, lr, val):
        folder.mkdir()
    for i in range(2):
        big = np.random.RandomState(i).randint(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(big).save(hr / f"p{i}.png")
        Image.fromarray(big[::4, ::4].copy()).save(
            lr / f"p{i}.png"
        )  # a real "low-res" pair: 12x12
    Image.fromarray(
        np.random.RandomState(7).randint(0, 256, (40, 40, 3), dtype=np.uint8)
    ).save(val / "v.png")
    options = TrainOptions(
        steps=2,
        crop=32,
        precision="fp32",
        val_every=2,
        val_steps=2,
        workers=1,
        checkpoint_every=0,
    )
    result = train(
        hr,
        tmp_path / "run",
        options,
        load=fp32(tiny_model_dir),
        pairs=lr,
        val_dir=val,
        metrics={"psnr_y": psnr_y},
    )
    assert result.steps == 2 and result.lora.is_file()
    (record,) = result.validation
    assert (
        record["images"] == 1
        and np.isfinite(record["lora_psnr_y"])
        and np.isfinite(record["bicubic_psnr_y"])
    )
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (
        run["pairs"] == str(lr)
        and run["val_dir"] == str(val)
        and run["status"] == "done"
    )


def test_a_trained_lora_file_gives_the_same_image_in_sdx4_and_in_diffusers(tiny_model_dir, tmp_path):
    """The whole path a user takes: the file `sdx4 train` writes (alpha != rank, attention AND convolution
    targets) used with `sdx4.load(loras=[...])` gives diffusers' `load_lora_weights` image within 1/255."""
    import sdx4
    from diffusers import StableDiffusionUpscalePipeline

    components, _ = load_for_training(fp32(tiny_model_dir), "fp32", [""])
    unet = components.unet
    add_lora(unet, TrainOptions(rank=4, alpha=2.0, targets="attn+conv"), seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in unet.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    path = save_lora(tmp_path / "lora.safetensors", unet, {"base_model": str(tiny_model_dir), "steps": "0"})
    image = Image.fromarray(np.random.RandomState(5).randint(0, 256, (24, 24, 3), dtype=np.uint8))
    run = {"prompt": "a cat", "steps": 3, "guidance": 7.5, "noise_level": 20, "seed": 11}

    up = sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32", low_memory=False, loras=[str(path)])
    ours = np.asarray(up(image, **run).image, dtype=np.int16)
    base = np.asarray(
        sdx4.load(str(tiny_model_dir), device="cpu", dtype="fp32", low_memory=False)(image, **run).image, dtype=np.int16
    )
    pipe = StableDiffusionUpscalePipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path))
    theirs = pipe(
        prompt=run["prompt"], image=image, num_inference_steps=run["steps"], guidance_scale=run["guidance"],
        noise_level=run["noise_level"], generator=torch.Generator("cpu").manual_seed(run["seed"]),
    ).images[0]
    theirs = np.asarray(theirs, dtype=np.int16)
    assert np.abs(ours - base).max() > 3  # the LoRA changes the image
    assert np.abs(ours - theirs).max() <= 1
