"""sdx4.train without a model: the options, the data (crops, pairs, captions, degradation) and every bad input
refused before any work (no model is loaded by these tests)."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdx4.options import LoadOptions, OptionsError
from sdx4.train import CheckpointError, TrainInputError, TrainOptions, train
from sdx4.train import data as data_mod
from sdx4.train.checkpoint import list_checkpoints, save_checkpoint


def write_images(folder, sizes, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        arr = np.random.RandomState(seed + i).randint(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"im{i}.png")
    return folder


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("rank", 0, "rank must be in 1..1024; got 0"),
        ("learning_rate", -1e-4, "learning_rate must be in"),
        ("crop", 30, "multiple of 4"),
        ("targets", "to_q,,conv1", "comma-separated list"),
        ("precision", "int8", "precision must be one of auto, fp32, bf16, fp16"),
        ("warmup_steps", 20, "warmup_steps must be in 0..10"),
        ("gradient_checkpointing", 1, "True or False"),
    ],
)
def test_train_options_refuse_bad_values_naming_the_field(field, value, words):
    with pytest.raises(OptionsError) as e:
        TrainOptions(steps=10, **{field: value})
    assert e.value.option == field
    assert words in str(e.value)


def test_target_presets_expand_and_explicit_lists_are_kept():
    assert (
        "conv1" in TrainOptions().target_modules
        and "to_q" in TrainOptions().target_modules
    )  # default attn+conv
    assert "conv1" not in TrainOptions(targets="attn").target_modules
    assert TrainOptions(targets="to_q, conv_shortcut").target_modules == (
        "to_q",
        "conv_shortcut",
    )
    assert (
        TrainOptions(rank=8).lora_alpha == 8.0
        and TrainOptions(rank=8, alpha=4).lora_alpha == 4.0
    )


def test_a_sample_is_a_function_of_its_index_and_bicubic_is_the_default_degradation(
    tmp_path,
):
    folder = write_images(tmp_path / "hr", [(80, 64)])
    ds = data_mod.scan(folder, TrainOptions(crop=32))
    ex = ds.examples[0]
    a = data_mod.make_sample(
        ex, TrainOptions(crop=32), np.random.default_rng(data_mod.sample_seed(0, 5, 0))
    )
    b = data_mod.make_sample(
        ex, TrainOptions(crop=32), np.random.default_rng(data_mod.sample_seed(0, 5, 0))
    )
    c = data_mod.make_sample(
        ex, TrainOptions(crop=32), np.random.default_rng(data_mod.sample_seed(0, 6, 0))
    )
    assert a[0].shape == (32, 32, 3) and a[1].shape == (8, 8, 3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])  # another index, another crop
    expected = np.asarray(
        Image.fromarray(a[0]).resize((8, 8), Image.Resampling.BICUBIC)
    )
    assert np.array_equal(a[1], expected)
    real = data_mod.make_sample(
        ex, TrainOptions(crop=32, degradation="realistic"), np.random.default_rng(1)
    )
    assert real[1].shape == (8, 8, 3)
    assert not np.array_equal(
        real[1],
        np.asarray(Image.fromarray(real[0]).resize((8, 8), Image.Resampling.BICUBIC)),
    )


def test_every_image_is_used_once_per_epoch():
    seen = [data_mod.example_index(3, i, 5) for i in range(10)]
    assert sorted(seen[:5]) == list(range(5)) and sorted(seen[5:]) == list(range(5))


def test_pairs_give_the_matching_low_res_crop(tmp_path):
    hr = write_images(tmp_path / "hr", [(64, 48)])
    lr = tmp_path / "lr"
    lr.mkdir()
    small = np.random.RandomState(9).randint(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(small).save(lr / "im0.png")
    ds = data_mod.scan(hr, TrainOptions(crop=32), pairs=lr)
    crop, low = data_mod.make_sample(
        ds.examples[0], TrainOptions(crop=32), np.random.default_rng(0)
    )
    full = np.asarray(Image.open(hr / "im0.png"))
    ys, xs = np.where(full[:, :, 0] == crop[0, 0, 0])  # find the crop's origin
    origin = [
        (y, x)
        for y, x in zip(ys, xs)
        if y <= 16 and x <= 32 and np.array_equal(full[y : y + 32, x : x + 32], crop)
    ]
    (y, x) = origin[0]
    assert y % 4 == 0 and x % 4 == 0
    assert np.array_equal(low, small[y // 4 : y // 4 + 8, x // 4 : x // 4 + 8])


def test_mismatched_pairs_are_refused_with_the_file_named(tmp_path):
    hr = write_images(tmp_path / "hr", [(64, 64), (64, 64)])
    lr = write_images(tmp_path / "lr", [(16, 16)])  # im1 has no pair
    with pytest.raises(
        TrainInputError, match=r"no low-res image for 1 high-res image.*im1\.png"
    ):
        data_mod.scan(hr, TrainOptions(crop=32), pairs=lr)
    write_images(lr, [(16, 16), (20, 16)])  # im1 is not a quarter
    with pytest.raises(
        TrainInputError, match=r"im1\.png: 20x16 is not a quarter of its high-res pair"
    ):
        data_mod.scan(hr, TrainOptions(crop=32), pairs=lr)


def test_prompts_come_from_captions_then_sidecars_then_empty(tmp_path):
    hr = write_images(tmp_path / "hr", [(32, 32)] * 3)
    (hr / "im1.txt").write_text("a sidecar prompt\n")
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"path": "im0.png", "prompt": "from the file"}) + "\n")
    ds = data_mod.scan(hr, TrainOptions(crop=32), captions=caps)
    assert [e.prompt for e in ds.examples] == ["from the file", "a sidecar prompt", ""]
    csv = tmp_path / "caps.csv"
    csv.write_text("path,prompt\nnope.png,x\n")
    with pytest.raises(TrainInputError, match="1 name.*match no image.*nope.png"):
        data_mod.scan(hr, TrainOptions(crop=32), captions=csv)


def test_small_images_are_refused_or_padded(tmp_path):
    hr = write_images(tmp_path / "hr", [(24, 40)])
    with pytest.raises(
        TrainInputError,
        match=r"smaller than the 32 px crop \(im0\.png \(24x40\)\): use a smaller --crop or --pad-small",
    ):
        data_mod.scan(hr, TrainOptions(crop=32))
    ds = data_mod.scan(hr, TrainOptions(crop=32, pad_small=True))
    crop, low = data_mod.make_sample(
        ds.examples[0], TrainOptions(crop=32, pad_small=True), np.random.default_rng(0)
    )
    assert crop.shape == (32, 32, 3) and low.shape == (8, 8, 3)


def test_corrupt_files_are_skipped_and_listed(tmp_path):
    hr = write_images(tmp_path / "hr", [(32, 32)])
    (hr / "broken.png").write_bytes(b"not a png at all")
    (hr / "notes.md").write_text("not an image: ignored")
    ds = data_mod.scan(hr, TrainOptions(crop=32))
    assert [e.hr.name for e in ds.examples] == ["im0.png"]
    assert len(ds.skipped) == 1 and ds.skipped[0][0].endswith("broken.png")
    (hr / "im0.png").unlink()
    with pytest.raises(
        TrainInputError, match="no usable training images: 1 unreadable"
    ):
        data_mod.scan(hr, TrainOptions(crop=32))


def test_an_empty_or_missing_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainInputError, match="empty: holds no images"):
        train(tmp_path / "empty", tmp_path / "run", TrainOptions(crop=32))
    with pytest.raises(TrainInputError, match="nope: no such folder"):
        train(tmp_path / "nope", tmp_path / "run", TrainOptions(crop=32))
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_a_folder_with_another_run_is_refused_before_any_work(tmp_path):
    hr = write_images(tmp_path / "hr", [(32, 32)])
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(
        json.dumps(
            {
                "options": TrainOptions(crop=32).to_dict(),
                "model": "m",
                "fingerprint": "x",
            }
        )
    )
    load = LoadOptions(model=str(tmp_path / "no-model"))
    with pytest.raises(
        TrainInputError,
        match="holds another training run .*resume it with --resume or choose another folder",
    ):
        train(hr, run, TrainOptions(crop=32), load=load)
    with pytest.raises(TrainInputError, match=r"other settings.*rank \(16 -> 4\)"):
        train(hr, run, TrainOptions(crop=32, rank=4), load=load, resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(TrainInputError, match="is not empty and holds no training run"):
        train(hr, tmp_path / "other", TrainOptions(crop=32), load=load)
    with pytest.raises(TrainInputError, match="nothing to resume"):
        train(hr, tmp_path / "fresh", TrainOptions(crop=32), load=load, resume=True)


def test_out_of_disk_while_checkpointing_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch
):
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(tmp_path, 1, 1, layer, opt, sched, None, keep=2)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(tmp_path, 2, 2, layer, opt, sched, None, keep=2)
    assert e.value.errno == errno.ENOSPC
    assert "cannot write checkpoint step 2" in str(
        e.value
    ) and "out of disk space" in str(e.value)
    assert "the last good checkpoint (step-0000001) is kept" in str(e.value)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-0000001"
    ]  # no partial folder


def test_the_data_fingerprint_changes_with_an_image_or_a_prompt_sidecar(tmp_path):
    hr = write_images(tmp_path / "hr", [(32, 32)] * 2)
    first = data_mod.scan(hr, TrainOptions(crop=32)).fingerprint
    assert data_mod.scan(hr, TrainOptions(crop=32)).fingerprint == first
    (hr / "im0.txt").write_text("a new prompt")
    with_prompt = data_mod.scan(hr, TrainOptions(crop=32)).fingerprint
    assert with_prompt != first
    write_images(hr, [(32, 32), (36, 32)])  # im1 changes size
    assert data_mod.scan(hr, TrainOptions(crop=32)).fingerprint != with_prompt
