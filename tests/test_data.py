"""Image folders: transforms from the model's data config, mode conversion, subsets,
folder errors, broken and non-image files, deterministic loading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from codeq_cli.data.sampling import GlobalBatchSampler, ShardSampler
from codeq_cli.data.folders import (
    Broken,
    ImageFolder,
    build_datasets,
    build_transform,
    eval_folder,
    image_mode,
    load_image,
    parse_subset,
)
from codeq_cli.data.loader import Batch, build_loader, collate, track
from codeq_cli.errors import DataError, UsageError
from codeq_cli.models.factory import DataConfig
from codeq_cli.data.transforms import eval_resize

CFG = DataConfig((3, 16, 16), (0.5, 0.4, 0.3), (0.25, 0.2, 0.1), "bicubic", 0.8)
COLOURS = [(200, 30, 30), (30, 180, 60), (40, 60, 220), (220, 200, 40), (150, 50, 200)]


def make_folder(
    root: Path,
    classes=("cat", "dog", "fox"),
    per_class: int = 4,
    val_per_class: int = 2,
    modes=("RGB",),
    size=(24, 20),
) -> Path:
    """``root/{train,val}/<class>/*.png``: small images, one colour per class.

    A local helper (fast: no per-pixel loops); ``modes`` cycles PIL modes.
    """
    for split, count in (("train", per_class), ("val", val_per_class)):
        for ci, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                # the class colour in two channels, a gradient in the third: crops differ
                r, g, _ = Image.new("RGB", size, COLOURS[ci % len(COLOURS)]).split()
                grad = Image.linear_gradient("L").rotate(90 * (i % 4)).resize(size)
                img = Image.merge("RGB", (r, g, grad))
                mode = modes[(ci + i) % len(modes)]
                if mode == "P-transparent":
                    img = img.convert("P")
                    img.info["transparency"] = 0
                elif mode != "RGB":
                    img = img.convert(mode)
                img.save(folder / f"{name}_{i:03d}.png")
    return root


def truncated_png(path: Path) -> Path:
    full = path.with_suffix(".full.png")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(full)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data")


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


# -- transforms follow the data config --------------------------------------------------------
@pytest.mark.parametrize(
    "cfg,resize",
    [
        (DataConfig((3, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 0.875), 256),
        (DataConfig((3, 288, 288), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.95), math.floor(288 / 0.95)),
        (DataConfig((3, 32, 48), (0.1, 0.2, 0.3), (0.3, 0.2, 0.1), "nearest", 1.0), (32, 48)),
        (DataConfig((1, 28, 28), (0.5,), (0.25,), "bilinear", 0.9), math.floor(28 / 0.9)),
    ],
)
def test_transforms_match_the_data_config(cfg, resize):
    _, h, w = cfg.input_size
    interp = InterpolationMode(cfg.interpolation)
    train = build_transform(cfg, True).transforms
    assert isinstance(train[0], T.RandomResizedCrop)
    assert tuple(train[0].size) == (h, w) and train[0].interpolation == interp and train[0].scale == (0.08, 1.0)
    assert isinstance(train[1], T.RandomHorizontalFlip)
    assert isinstance(train[-2], T.ToTensor)
    assert list(train[-1].mean) == list(cfg.mean) and list(train[-1].std) == list(cfg.std)

    ev = build_transform(cfg, False).transforms
    assert isinstance(ev[0], T.Resize) and ev[0].size == resize and ev[0].interpolation == interp
    assert eval_resize(cfg) == resize
    assert isinstance(ev[1], T.CenterCrop) and tuple(ev[1].size) == (h, w)
    assert list(ev[-1].mean) == list(cfg.mean) and list(ev[-1].std) == list(cfg.std)


def test_train_options_crop_scale_and_no_flip():
    steps = build_transform(CFG, True, crop_scale=(0.5, 1.0), hflip=False).transforms
    assert steps[0].scale == (0.5, 1.0)
    assert not any(isinstance(s, T.RandomHorizontalFlip) for s in steps)


def test_eval_transform_values_are_normalized_with_the_config():
    img = Image.new("RGB", (40, 30), (255, 102, 0))
    x = build_transform(CFG, False)(img)
    assert x.shape == (3, 16, 16)
    expected = torch.tensor([(1.0 - 0.5) / 0.25, (0.4 - 0.4) / 0.2, (0.0 - 0.3) / 0.1])
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)


def test_unknown_interpolation_and_channel_counts_are_usage_errors():
    with pytest.raises(UsageError, match="interpolation 'sinc'"):
        build_transform(DataConfig(interpolation="sinc"), False)
    with pytest.raises(UsageError, match="4 input channels"):
        image_mode(DataConfig((4, 16, 16), (0.5,) * 4, (0.5,) * 4))
    with pytest.raises(UsageError, match="mean/std have 2/2 values"):
        build_transform(DataConfig((3, 16, 16), (0.5, 0.5), (0.5, 0.5)), False)


def test_timm_random_interpolation_is_bilinear():
    steps = build_transform(DataConfig(interpolation="random"), True).transforms
    assert steps[0].interpolation == InterpolationMode.BILINEAR


# -- image modes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "P-transparent", "LA", "CMYK"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    root = make_folder(tmp_path / "d", classes=("a",), per_class=1, val_per_class=1, modes=(mode if mode != "CMYK" else "RGB",))
    path = next((root / "train" / "a").iterdir())
    if mode == "CMYK":
        path = path.with_suffix(".jpg")
        Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(path)
    assert Image.open(path).mode == ("P" if mode.startswith("P") else mode)
    assert load_image(str(path), "RGB").mode == "RGB"


def test_mixed_modes_load_as_three_channels(tmp_path):
    root = make_folder(tmp_path / "d", modes=("RGB", "L", "RGBA", "P"))
    train, val, _ = build_datasets(root, CFG)
    for ds in (train, val):
        for i in range(len(ds)):
            x, _ = ds[i]
            assert x.shape == (3, 16, 16)


def test_one_channel_model_reads_greyscale(tmp_path):
    root = make_folder(tmp_path / "d", modes=("RGB", "RGBA", "P"))
    cfg = DataConfig((1, 16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", 1.0)
    train, val, _ = build_datasets(root, cfg)
    assert train.mode == val.mode == "L"
    x, _ = val[0]
    assert x.shape == (1, 16, 16)
    # an RGB mean/std on a one-channel model is averaged
    assert build_transform(cfg, False).transforms[-1].mean == [0.5]


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    import numpy as np

    path = tmp_path / "g16.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    assert load_image(str(path), "L").getpixel((0, 0)) == 128


# -- datasets and subsets -----------------------------------------------------------------------------
def test_build_datasets_lists_classes_and_samples(folder):
    train, val, classes = build_datasets(folder, CFG)
    assert classes == ["cat", "dog", "fox"] == train.classes == val.classes
    assert len(train) == 12 and len(val) == 6
    assert sorted(set(train.targets)) == [0, 1, 2]
    assert train.stats.images == 12 and train.stats.ignored == 0
    x, y = train[0]
    assert x.shape == (3, 16, 16) and isinstance(y, int)


@pytest.mark.parametrize("subset,per_train,per_val", [(0.5, 5, 2), ("0.5", 5, 2), ("25%", 2, 1), (3, 3, 3), ("3", 3, 3), (100, 10, 4)])
def test_subset_fraction_and_count_per_class(tmp_path, subset, per_train, per_val):
    root = make_folder(tmp_path / "d", per_class=10, val_per_class=4)
    train, val, _ = build_datasets(root, CFG, subset=subset, seed=0)
    for ds, per in ((train, per_train), (val, per_val)):
        counts = [ds.targets.count(c) for c in range(3)]
        assert counts == [per] * 3, counts
        assert ds.stats.images == len(ds)


def test_subset_is_deterministic_with_the_seed(tmp_path):
    root = make_folder(tmp_path / "d", per_class=12, val_per_class=2)
    a, _, _ = build_datasets(root, CFG, subset=0.25, seed=1)
    b, _, _ = build_datasets(root, CFG, subset=0.25, seed=1)
    c, _, _ = build_datasets(root, CFG, subset=0.25, seed=2)
    assert a.samples == b.samples
    assert a.samples != c.samples


def test_subset_can_spare_val(tmp_path):
    root = make_folder(tmp_path / "d", per_class=6, val_per_class=4)
    train, val, _ = build_datasets(root, CFG, subset=2, subset_val=False)
    assert len(train) == 6 and len(val) == 12


@pytest.mark.parametrize("bad", [0, -3, 1.0, 1.5, 0.0, "abc", "0", "", True, "150%"])
def test_bad_subset_is_a_usage_error(bad):
    with pytest.raises(UsageError) as info:
        parse_subset(bad)
    assert _one_line(info.value).startswith("--subset")


def test_parse_subset():
    assert parse_subset(None) is None
    assert parse_subset("0.1") == 0.1 and parse_subset("10%") == 0.1
    assert parse_subset("50") == 50 and parse_subset(7) == 7


# -- folder errors: one line each ----------------------------------------------------------------------
def test_data_not_given():
    with pytest.raises(UsageError, match=r"^--data is required"):
        build_datasets(None, CFG)


def test_data_missing(tmp_path):
    with pytest.raises(DataError, match=r"--data '.*nope' does not exist; pass a folder with train/ and val/"):
        build_datasets(tmp_path / "nope", CFG)


def test_data_is_a_file(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"")
    with pytest.raises(DataError, match="is a file, not a folder"):
        build_datasets(tmp_path / "x.tar", CFG)


@pytest.mark.parametrize("drop,message", [("train", "has no train/ folder"), ("val", "has no val/ folder")])
def test_missing_split(folder, drop, message):
    import shutil

    shutil.rmtree(folder / drop)
    with pytest.raises(DataError) as info:
        build_datasets(folder, CFG)
    assert message in _one_line(info.value)


def test_folder_of_class_folders_without_splits(tmp_path):
    root = tmp_path / "flat"
    make_folder(tmp_path / "tmp")
    (tmp_path / "tmp" / "train").rename(root)
    with pytest.raises(DataError) as info:
        build_datasets(root, CFG)
    msg = _one_line(info.value)
    assert "has no train/ or val/ folder" in msg and "split it into train/<class>/ and val/<class>/" in msg


def test_images_without_class_folders(folder):
    import shutil

    for c in ("cat", "dog", "fox"):
        for f in (folder / "train" / c).iterdir():
            shutil.move(str(f), folder / "train" / f.name)
        (folder / "train" / c).rmdir()
    with pytest.raises(DataError, match="train holds images but no class folders"):
        build_datasets(folder, CFG)


def test_split_without_anything(folder):
    import shutil

    shutil.rmtree(folder / "val")
    (folder / "val").mkdir()
    with pytest.raises(DataError, match="val has no class folders"):
        build_datasets(folder, CFG)


def test_empty_class_folder_is_named(folder):
    (folder / "train" / "emu").mkdir()
    (folder / "val" / "emu").mkdir()
    (folder / "train" / "emu" / "readme.txt").write_text("x")
    with pytest.raises(DataError) as info:
        build_datasets(folder, CFG)
    msg = _one_line(info.value)
    assert "class folder in" in msg and "train has no images: emu" in msg


def test_no_images_at_all(tmp_path):
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            (tmp_path / split / c / "x.txt").write_text("not an image")
    with pytest.raises(DataError) as info:
        build_datasets(tmp_path, CFG)
    msg = _one_line(info.value)
    assert "train holds no images (2 other files)" in msg and ".jpg" in msg


def test_class_mismatch_names_the_differing_classes(folder):
    (folder / "val" / "fox").rename(folder / "val" / "wolf")
    (folder / "val" / "cat").rename(folder / "val" / "lynx")
    with pytest.raises(DataError) as info:
        build_datasets(folder, CFG)
    msg = _one_line(info.value)
    assert "only in train/: cat, fox" in msg and "only in val/: lynx, wolf" in msg


def test_hidden_folders_and_files_are_ignored(folder):
    (folder / "train" / ".ipynb_checkpoints").mkdir()
    (folder / "train" / "cat" / ".DS_Store").write_bytes(b"\0")
    (folder / "train" / "cat" / ".hidden.png").write_bytes(b"\0")
    train, _, classes = build_datasets(folder, CFG)
    assert classes == ["cat", "dog", "fox"] and len(train) == 12
    assert train.stats.ignored == 2


# -- non-image and broken files --------------------------------------------------------------------------
def test_non_image_files_are_ignored_and_counted(folder):
    (folder / "train" / "cat" / "labels.csv").write_text("a,b")
    (folder / "train" / "dog" / "notes.TXT").write_text("x")
    (folder / "train" / "dog" / "UPPER.PNG").write_bytes((folder / "train" / "dog" / "dog_000.png").read_bytes())
    (folder / "val" / "fox" / "x.json").write_text("{}")
    train, val, _ = build_datasets(folder, CFG)
    assert len(train) == 13 and train.stats.ignored == 2
    assert val.stats.ignored == 1
    assert "2 non-image files ignored" in train.stats.summary()


def test_nested_folders_inside_a_class_are_read(folder):
    sub = folder / "train" / "cat" / "more"
    sub.mkdir()
    (sub / "extra.png").write_bytes((folder / "train" / "cat" / "cat_000.png").read_bytes())
    train, _, _ = build_datasets(folder, CFG)
    assert len(train) == 13


def test_broken_and_truncated_images_are_skipped_and_counted(tmp_path):
    root = make_folder(tmp_path / "d", per_class=10)
    truncated_png(root / "train" / "dog" / "dog_900.png")
    (root / "train" / "fox" / "fox_900.jpg").write_bytes(b"this is not a jpeg")
    train, _, _ = build_datasets(root, CFG)
    assert len(train) == 32
    assert isinstance(train[train.samples.index((str(root / "train" / "fox" / "fox_900.jpg"), 2))], Broken)
    loader = build_loader(train, batch_sampler=GlobalBatchSampler(len(train), 8, seed=0))
    delivered = sum(len(y) for _, y in loader)
    assert delivered == 30  # 4 batches of 8: 32 samples, 2 of them broken
    st = train.stats
    assert (st.loaded, st.skipped) == (30, 2)
    assert set(st.broken) == {str(root / "train" / "dog" / "dog_900.png"), str(root / "train" / "fox" / "fox_900.jpg")}
    assert "truncated" in st.broken[str(root / "train" / "dog" / "dog_900.png")]
    assert "2 unreadable images skipped" in st.summary()
    # a second epoch counts the loads again, the files once
    list(loader)
    assert (st.loaded, st.skipped, len(st.broken)) == (60, 4, 2)
    assert st.to_dict()["skipped"] == 4


def test_too_many_broken_images_is_a_data_error(tmp_path):
    root = make_folder(tmp_path / "d", per_class=5)
    for i in range(3):
        (root / "train" / "cat" / f"bad_{i}.jpg").write_bytes(b"junk")
    train, _, _ = build_datasets(root, CFG)  # 3 of 18 broken: 17%
    with pytest.raises(DataError) as info:
        list(build_loader(train, batch_size=4))
    msg = _one_line(info.value)
    assert "unreadable" in msg and "over the 10% limit" in msg and "bad_" in msg
    # a looser limit lets the epoch finish
    assert sum(len(y) for _, y in build_loader(train, batch_size=4, max_broken=0.2)) == 15


def test_a_batch_of_only_broken_images_is_empty(tmp_path):
    batch = collate([Broken("a.jpg", "junk"), Broken("b.jpg", "junk")])
    images, targets = batch
    assert images.numel() == 0 and targets.numel() == 0 and targets.dtype == torch.long
    assert batch.broken == [("a.jpg", "junk"), ("b.jpg", "junk")] and batch.size == 2


def test_track_counts_in_the_main_process_with_workers(tmp_path):
    root = make_folder(tmp_path / "d", per_class=8)
    (root / "train" / "cat" / "bad.png").write_bytes(b"junk")
    train, _, _ = build_datasets(root, CFG)
    plain = DataLoader(train, batch_size=5, num_workers=2, collate_fn=collate)
    n = sum(len(y) for _, y in track(plain, train.stats))
    assert n == 24 and train.stats.skipped == 1 and train.stats.loaded == 24


def test_pinning_goes_through_batch_and_keeps_the_broken_list(monkeypatch):
    from torch.utils.data._utils.pin_memory import pin_memory

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self.clone())  # no CUDA needed
    batch = collate([(torch.zeros(3, 2, 2), 1), Broken("a.jpg", "junk")])
    pinned = pin_memory(batch)  # what DataLoader(pin_memory=True) calls on each batch
    assert isinstance(pinned, Batch) and pinned.broken == [("a.jpg", "junk")] and pinned.size == 2
    images, targets = pinned
    assert images.shape == (1, 3, 2, 2) and targets.tolist() == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_batch_keeps_broken_list_when_pinned():
    batch = collate([(torch.zeros(3, 2, 2), 1), Broken("a.jpg", "junk")])
    pinned = batch.pin_memory()
    assert isinstance(pinned, Batch) and pinned.broken == [("a.jpg", "junk")] and pinned[0].is_pinned()


# -- loaders: deterministic order and augmentation --------------------------------------------------------
def _epoch(loader):
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def test_training_order_and_augmentation_follow_seed_and_epoch(folder):
    train, _, _ = build_datasets(folder, CFG)
    state = torch.get_rng_state()

    def epoch(seed, n, workers=0):
        sampler = GlobalBatchSampler(len(train), 4, seed=seed)
        sampler.set_epoch(n)
        return _epoch(build_loader(train, batch_sampler=sampler, workers=workers, seed=seed))

    x1, y1 = epoch(3, 0)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    torch.manual_seed(12345)  # and does not matter
    x2, y2 = epoch(3, 0)
    assert torch.equal(y1, y2) and torch.equal(x1, x2)
    x3, _ = epoch(4, 0)
    assert not torch.equal(x1, x3)
    _, e1 = epoch(3, 1)
    assert not torch.equal(y1, e1)  # another epoch, another order
    xw, yw = epoch(3, 0, workers=2)  # worker processes change nothing
    assert torch.equal(xw, x1) and torch.equal(yw, y1)


def test_eval_loader_keeps_file_order_and_drop_last(folder):
    _, val, _ = build_datasets(folder, CFG)
    _, y = _epoch(build_loader(val, 4))
    assert y.tolist() == val.targets
    assert len(build_loader(val, 4, drop_last=True)) == 1


def test_seeded_item_draws_augmentation_from_the_seed(folder):
    train, _, _ = build_datasets(folder, CFG)
    state = torch.get_rng_state()
    a, _ = train[(0, 99)]
    b, _ = train[(0, 99)]
    c, _ = train[(0, 100)]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)


def test_eval_loader_takes_a_shard_sampler(folder):
    _, val, _ = build_datasets(folder, CFG)
    parts = [_epoch(build_loader(val, 4, sampler=ShardSampler(len(val), rank, 2)))[1].tolist() for rank in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(val.targets) and len(parts[0]) == len(parts[1]) == 3


def test_bad_loader_arguments():
    ds = ImageFolder("x", [], [])
    with pytest.raises(UsageError):
        build_loader(ds, 0)
    with pytest.raises(UsageError):
        build_loader(ds, 1, workers=-1)


# -- eval folders ----------------------------------------------------------------------------------------------
def test_eval_folder_prefers_val(folder):
    ds = eval_folder(folder, CFG)
    assert Path(ds.root).name == "val" and len(ds) == 6
    assert isinstance(ds.transform.transforms[0], T.Resize)


def test_eval_folder_accepts_a_folder_of_class_folders(folder):
    ds = eval_folder(folder / "val", CFG)
    assert ds.classes == ["cat", "dog", "fox"] and len(ds) == 6


def test_eval_folder_maps_to_the_checkpoint_classes(folder):
    import shutil

    shutil.rmtree(folder / "val" / "cat")
    ds = eval_folder(folder, CFG, class_names=["ant", "cat", "dog", "fox"])
    assert ds.classes == ["ant", "cat", "dog", "fox"]
    assert sorted(set(ds.targets)) == [2, 3]
    with pytest.raises(DataError, match="class folders the model does not know: dog, fox"):
        eval_folder(folder, CFG, class_names=["ant", "cat"])


def test_eval_folder_errors(tmp_path, folder):
    import shutil

    with pytest.raises(DataError, match="does not exist"):
        eval_folder(tmp_path / "nope", CFG)
    shutil.rmtree(folder / "val")
    with pytest.raises(DataError, match="has train/ but no val/ folder"):
        eval_folder(folder, CFG)
