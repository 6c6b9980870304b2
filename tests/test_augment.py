"""data.py's augmentations under the recipes' real conditions, and the image-folder reading.

test_data.py checks what each augmentation does on one small image; this file runs them
the way training does: every RandAugment operation at levels 0, 5 and 10 on CIFAR- and
ImageNet-sized images, one epoch of each default recipe's augmentation over a few
thousand images followed by the per-batch steps, extreme image shapes, pickling of every
transform and dataset (DataLoader workers started with 'spawn'), and the ImageNet folder
rules (hidden entries, empty class folders, differing class folders, corrupt files).
All data is made by the tests themselves.
"""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import data
import data_files
import data_randaugment
from data import DataError
from _fakedata import write_imagenet

CIFAR_POLICY = "rand-m9-n1-mstd0.4-inc1"     # the official cifar10.yml / cifar100.yml
IMAGENET_POLICY = "rand-m9-mstd0.5-inc1"     # the official ImageNet fine-tuning recipe
FILL = (125, 123, 114)                       # CIFAR-10's mean colour, as RandAugment passes it


def random_pil(w, h, seed=0):
    """An RGB image of random content, w x h."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------- RandAugment operations

@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("name", sorted(data_randaugment.RANDAUGMENT_OPS))
def test_every_op_at_levels_0_5_10(name, size):
    img = random_pil(size, size, seed=size)
    op = data_randaugment.RANDAUGMENT_OPS[name]
    for level in (0.0, 5.0, 10.0):
        for seed in range(4):  # both signs of the signed operations
            torch.manual_seed(seed)
            out = op(img, level, FILL)
            assert out.size == img.size and out.mode == "RGB", (name, level)


def test_posterize_level_10_keeps_no_bits():
    # 4 - int(10 / 10 * 4) = 0 bits: a black image, as Pillow < 13 gave (Pillow 13 refuses 0 bits)
    img = random_pil(32, 32)
    black = np.asarray(data_randaugment.RANDAUGMENT_OPS["PosterizeIncreasing"](img, 10.0, FILL))
    assert black.max() == 0
    # level 0 keeps 4 bits: the low 4 bits are cleared, the high ones kept
    four = np.asarray(data_randaugment.RANDAUGMENT_OPS["PosterizeIncreasing"](img, 0.0, FILL))
    assert np.array_equal(four, np.asarray(img) & 0xF0)
    for bits in range(1, 9):  # where Pillow accepts the number of bits, the same pixels as Pillow
        assert np.array_equal(np.asarray(data_randaugment._posterize(img, bits)), np.asarray(ImageOps.posterize(img, bits)))


def test_extreme_levels_of_colour_ops():
    img = random_pil(32, 32)
    arr = np.asarray(img)
    # solarize threshold 256 (level 0): unchanged; threshold 0 (level 10): every pixel inverted
    assert np.array_equal(np.asarray(data_randaugment.RANDAUGMENT_OPS["SolarizeIncreasing"](img, 0.0, FILL)), arr)
    assert np.array_equal(np.asarray(data_randaugment.RANDAUGMENT_OPS["SolarizeIncreasing"](img, 10.0, FILL)), 255 - arr)
    assert np.array_equal(np.asarray(data_randaugment._solarize_add(img, 0)), arr)
    added = np.asarray(data_randaugment._solarize_add(img, 110)).astype(int)
    low = arr < 128
    assert np.array_equal(added[low], np.minimum(255, arr[low].astype(int) + 110))
    assert np.array_equal(added[~low], arr[~low])
    # enhancement factors stay in [0.1, 1.9]: never 0 (a grey or black image), never negative
    torch.manual_seed(0)
    factors = [data_randaugment._enhance_factor(lv) for lv in (0.0, 5.0, 10.0) for _ in range(50)]
    assert min(factors) == pytest.approx(0.1) and max(factors) == pytest.approx(1.9)
    assert data_randaugment._enhance_factor(0.0) == 1.0


def test_randaugment_never_fails_at_the_clipped_magnitudes():
    # magnitude 10 with no spread: every operation at the level that broke Pillow 13
    ra = data.RandAugment("rand-m10-n3-mstd0-inc1")
    torch.manual_seed(0)
    for i in range(300):
        assert ra(random_pil(32, 32, seed=i)).size == (32, 32)


# ---------------------------------------------------------------- one epoch of each recipe

def _batch_steps(images, mean, std, mode, num_classes):
    """What train.py does to a batch after it arrives: normalise, erase, mix."""
    torch.manual_seed(1)
    x = data.normalize(images, mean, std)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    erased = data.random_erasing(x.clone(), prob=0.25, mode=mode)
    changed = (erased != x).flatten(1).any(1).float().mean().item()
    assert 0.1 < changed < 0.4  # about a quarter of the images get a rectangle
    y = torch.randint(num_classes, (len(x),))
    mixed, target = data.Mixup(0.8, 1.0, num_classes=num_classes)(erased, y)
    assert mixed.shape == x.shape and torch.allclose(target.sum(1), torch.ones(len(x)))


def test_one_epoch_of_the_cifar_recipe():
    n = 3000
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    info = data.get_dataset("cifar10")
    tf = data.CifarTrainTransform(padding=4, hflip=0.5, randaugment=data.RandAugment(CIFAR_POLICY, info.mean))
    torch.manual_seed(0)
    out = torch.stack([tf(img) for img in images])  # (N, 3, 32, 32)
    assert out.dtype == torch.uint8 and out.shape == (n, 3, 32, 32)
    _batch_steps(out, info.mean, info.std, "const", 10)


def test_one_epoch_of_the_imagenet_recipe():
    info = data.get_dataset("imagenet")
    ra = data.RandAugment(IMAGENET_POLICY, info.mean)
    train_tf, eval_tf = data.ImageNetTrainTransform(224, 0.5, ra), data.ImageNetEvalTransform(224)
    sizes = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    train, val = [], []
    for i in range(200):
        w, h = (int(v) for v in torch.randint(20, 500, (2,), generator=sizes))
        img = random_pil(w, h, seed=i)
        train.append(train_tf(img))
        if i % 10 == 0:
            val.append(eval_tf(img))
    assert all(t.dtype == torch.uint8 and t.shape == (3, 224, 224) for t in train + val)
    for start in range(0, len(train), 100):  # in batches, as a loader gives them
        _batch_steps(torch.stack(train[start:start + 100]), info.mean, info.std, "pixel", 1000)


# ---------------------------------------------------------------- random erasing, batched

def _erasing_reference(n, h, w, prob, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), seed=0):
    """timm's RandomErasing loop, one image at a time: (height, width, top, left) of each
    rectangle, or None for an image left alone."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        box = None
        if rng.random() < prob:
            for _ in range(10):
                area = h * w * rng.uniform(*scale)
                aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
                eh, ew = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
                if eh < h and ew < w:
                    box = (eh, ew, rng.integers(0, h - eh + 1), rng.integers(0, w - ew + 1))
                    break
        out.append(box)
    return out


def _ks(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()


@pytest.mark.parametrize("h, w", [(32, 32), (12, 40)])
def test_random_erasing_draws_timms_rectangles(h, w):
    n, prob = 3000, 0.6
    torch.manual_seed(0)
    out = data.random_erasing(torch.ones(n, 1, h, w), prob=prob, mode="const")
    got = []
    for img in out[:, 0]:
        rows, cols = torch.where(img == 0)
        if len(rows):
            top, left = rows.min().item(), cols.min().item()
            eh, ew = rows.max().item() - top + 1, cols.max().item() - left + 1
            assert eh * ew == len(rows)  # one filled rectangle
            got.append((eh, ew, top, left))
    ref = [box for box in _erasing_reference(n, h, w, prob) if box is not None]
    # the same share of images erased, and the same distribution of height, width and corner
    assert abs(len(got) - len(ref)) < 4 * np.sqrt(n * prob * (1 - prob))
    got, ref = np.array(got), np.array(ref)
    for k, what in enumerate(("height", "width", "top", "left")):
        assert _ks(got[:, k], ref[:, k]) < 0.06, what
    assert _ks(got[:, 0] * got[:, 1], ref[:, 0] * ref[:, 1]) < 0.06  # area


def test_random_erasing_fills():
    torch.manual_seed(0)
    x = torch.full((2000, 3, 16, 16), 5.0)
    rand = data.random_erasing(x.clone(), prob=1.0, mode="rand")
    erased = rand != 5.0
    colours = []
    for img, where in zip(rand, erased):
        if where.any():
            assert torch.equal(where[0], where[1]) and torch.equal(where[0], where[2])  # all channels alike
            c = img[:, where[0]]  # (3, pixels): one colour per image
            assert torch.equal(c, c[:, :1].expand_as(c))
            colours.append(c[:, 0])
    colours = torch.stack(colours)  # (images, 3): standard normal across images
    assert len(colours) > 1900 and colours.mean().abs() < 0.05 and abs(colours.std() - 1) < 0.05
    pixel = data.random_erasing(x.clone(), prob=1.0, mode="pixel")
    noise = pixel[pixel != 5.0]
    assert noise.mean().abs() < 0.02 and abs(noise.std() - 1) < 0.02
    half = data.random_erasing(x.clone().to(torch.bfloat16), prob=1.0, mode="pixel")
    assert half.dtype == torch.bfloat16 and (half != 5.0).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_steps_never_wait_for_the_device():
    dev = torch.device("cuda")
    info = data.get_dataset("imagenet")
    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, device=dev)
    y = torch.randint(1000, (16,), device=dev)
    mixup = data.Mixup(0.8, 1.0, num_classes=1000)
    data.normalize(images, info.mean, info.std)  # the first call puts mean and std on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any copy to the host or wait for the device raises
    try:
        for mode in ("const", "rand", "pixel"):
            x = data.random_erasing(data.normalize(images, info.mean, info.std), 0.25, mode)
            x, target = mixup(x, y)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert x.device.type == "cuda" and torch.allclose(target.sum(1), torch.ones(16, device=dev))


def test_normalize_keeps_its_constants():
    mean, std = (0.5, 0.25, 0.75), (0.1, 0.2, 0.3)
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    ref = (images.float() - torch.tensor(mean).view(1, 3, 1, 1) * 255) / (torch.tensor(std).view(1, 3, 1, 1) * 255)
    with torch.inference_mode():  # the first call may come from evaluation
        first = data.normalize(images, mean, std)
    again = data.normalize(images, list(mean), list(std))  # lists (from a config) hit the same cache entry
    assert torch.allclose(first, ref) and torch.equal(first, again)
    x = images.float()
    data.normalize(x, mean, std)
    assert torch.equal(x, images.float())  # a float input is left as it was
    assert data._mean_std_255.cache_info().currsize >= 1


# ---------------------------------------------------------------- crops on extreme shapes

@pytest.mark.parametrize("w, h", [(1, 1), (2, 3), (7, 5), (1000, 1), (1, 1000), (3000, 2)])
def test_crops_of_tiny_and_thin_images(w, h):
    img = random_pil(w, h)
    torch.manual_seed(0)
    for _ in range(10):
        assert data.random_resized_crop(img, 224).size == (224, 224)
    # (32, not 224: the whole image is resized before the centre is cut, 256 x 768000 pixels for 3000 x 2)
    assert data.resize_center_crop(img, 32).size == (32, 32)
    assert data.ImageNetTrainTransform(32, randaugment=data.RandAugment(IMAGENET_POLICY))(img).shape == (3, 32, 32)
    assert data.ImageNetEvalTransform(32)(img).shape == (3, 32, 32)


def test_center_crop_of_images_smaller_than_the_crop():
    # upscaled until the shorter side is 256, then the central 224 x 224: a small image is
    # enlarged, never padded
    for w, h in ((50, 50), (100, 90), (20, 200)):
        arr = np.zeros((h, w, 3), np.uint8)
        arr[:, w // 2:] = 255  # left half black, right half white
        out = np.asarray(data.resize_center_crop(Image.fromarray(arr), 224))
        assert out.shape == (224, 224, 3)
        assert out[:, :100].max() < 10 and out[:, 124:].min() > 245, (w, h)


# ---------------------------------------------------------------- pickling (spawn / forkserver workers)

def _transforms():
    mean = data.get_dataset("cifar10").mean
    return [
        data.RandAugment(CIFAR_POLICY, mean),
        data.CifarTrainTransform(4, 0.5, data.RandAugment(CIFAR_POLICY, mean)),
        data.CifarTrainTransform(0, 0.5, None),
        data.ImageNetTrainTransform(224, 0.5, data.RandAugment(IMAGENET_POLICY)),
        data.ImageNetEvalTransform(224),
    ]


def test_every_transform_pickles():
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    for tf in _transforms():
        copy = pickle.loads(pickle.dumps(tf))
        # the copy draws the same augmentation from the same random state
        arg = data.to_pil(img) if isinstance(tf, (data.RandAugment, data.ImageNetTrainTransform,
                                                  data.ImageNetEvalTransform)) else img
        torch.manual_seed(3)
        a = tf(arg)
        torch.manual_seed(3)
        b = copy(arg)
        a, b = (np.asarray(v) if isinstance(v, Image.Image) else v.numpy() for v in (a, b))
        assert np.array_equal(a, b), tf


def test_datasets_pickle(tmp_path):
    images, labels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.arange(4)
    ra = data.RandAugment(CIFAR_POLICY)
    ds = pickle.loads(pickle.dumps(data.TensorImages(images, labels, data.CifarTrainTransform(4, 0.5, ra))))
    assert ds[1][0].shape == (3, 32, 32) and ds[1][1] == 1
    root = write_imagenet(tmp_path / "inet", per_class=2)
    classes, samples = data_files.find_images(root / "train")
    for tf in (data.ImageNetTrainTransform(32, 0.5, ra), data.ImageNetEvalTransform(32)):
        ds = pickle.loads(pickle.dumps(data.ImageFiles(samples, classes, tf)))
        img, label = ds[3]
        assert img.shape == (3, 32, 32) and label == 1


def test_loader_with_spawned_worker():
    images, labels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8)
    ds = data.TensorImages(images, labels, data.CifarTrainTransform(4, 0.5, data.RandAugment(CIFAR_POLICY)))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, multiprocessing_context="spawn")
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8 and y.tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------- ImageNet folders

def test_hidden_entries_are_ignored(tmp_path):
    root = write_imagenet(tmp_path / "inet", per_class=2)
    train = root / "train"
    # what Jupyter, macOS and other tools leave behind
    (train / ".ipynb_checkpoints").mkdir()
    (train / ".ipynb_checkpoints" / "img-checkpoint.JPEG").write_bytes((train / "n01" / "img_0.JPEG").read_bytes())
    (train / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (train / "n02" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (train / "n02" / "._img_0.JPEG").write_bytes(b"\0\5\026\7AppleDouble")
    (train / "n03" / ".thumbnails").mkdir()
    (train / "n03" / ".thumbnails" / "t.jpg").write_bytes((train / "n01" / "img_0.JPEG").read_bytes())
    classes, samples = data_files.find_images(train)
    assert classes == ["n01", "n02", "n03"]
    assert [label for _, label in samples] == [0, 0, 1, 1, 2, 2]
    assert all("/." not in p.replace(os.sep, "/") for p, _ in samples)


def test_empty_class_folder_is_named(tmp_path):
    root = write_imagenet(tmp_path / "inet", per_class=2)
    for split in ("train", "val"):
        empty = root / split / "n00_empty"
        empty.mkdir()
        (empty / "notes.txt").write_text("no images here")
        with pytest.raises(DataError, match=f"{split}.*n00_empty.*no images"):
            data_files.find_images(root / split)
        (empty / "notes.txt").unlink()
        empty.rmdir()
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        data_files.find_images(tmp_path / "nothing")


def test_differing_class_folders_are_named(tmp_path):
    data_files.check_same_classes(["a", "b"], ["a", "b"], tmp_path)
    with pytest.raises(DataError) as e:
        data_files.check_same_classes(["n01", "n02", "n03"], ["n01", "n03", "n04", "n05"], tmp_path)
    msg = str(e.value)
    assert "different class folders" in msg and str(tmp_path) in msg
    assert "only in train: n02" in msg and "only in val: n04, n05" in msg
    many = [f"c{i:04d}" for i in range(100)]
    with pytest.raises(DataError, match=r"only in val: c0000, .* and 90 more"):
        data_files.check_same_classes([], many, tmp_path)


def test_verify_images_names_the_first_bad_file(tmp_path):
    root = write_imagenet(tmp_path / "inet", per_class=3)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "val" / "n02" / "img_9.png")
    classes, samples = data_files.find_images(root / "val")
    data_files.verify_images(samples)  # all good: returns quietly
    (root / "val" / "n02" / "img_1.JPEG").write_bytes(b"not a jpeg")
    (root / "val" / "n03" / "img_0.JPEG").write_bytes(b"")
    with pytest.raises(DataError, match=r"n02.img_1.JPEG.*(corrupt|not an image)"):
        data_files.verify_images(samples)
    png = (root / "val" / "n02" / "img_9.png").read_bytes()
    (root / "val" / "n02" / "img_1.JPEG").write_bytes((root / "val" / "n01" / "img_0.JPEG").read_bytes())
    (root / "val" / "n03" / "img_0.JPEG").write_bytes((root / "val" / "n01" / "img_0.JPEG").read_bytes())
    data_files.verify_images(samples)
    # a flipped bit in the PNG's pixel data: its chunk's checksum no longer matches
    (root / "val" / "n02" / "img_9.png").write_bytes(png[:45] + bytes([png[45] ^ 0xFF]) + png[46:])
    with pytest.raises(DataError, match=r"img_9.png"):
        data_files.verify_images(samples)
