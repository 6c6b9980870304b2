"""data.py: reading each format, download with md5 check, clear errors, and what each augmentation does.

All data is written by the tests in the official formats (tests/_fakedata.py); nothing is
read from ../shared or the network (the "download" comes from a server on 127.0.0.1).
"""
import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import data
import data_events  # noqa: F401 (adds the event-camera datasets to data.DATASETS)
import data_randaugment
from data import DataError
from _fakedata import cifar_archive, write_cifar, write_imagenet


def texture(h=32, w=32, seed=0):
    """A uint8 (3, h, w) image with detail everywhere, so any geometric or colour change shows."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------- dataset descriptions

@pytest.mark.parametrize("name", list(data.DATASETS))
def test_dataset_descriptions_are_complete(name):
    spec = data.get_dataset(name)
    assert spec.name == name and spec.title and spec.num_classes >= 2
    if spec.input_kind == "pixels":  # (event counts are not normalised: mean and std None)
        assert len(spec.mean) == len(spec.std) == spec.in_channels
        assert all(0 < s < 1 for s in spec.std) and all(0 < m < 1 for m in spec.mean)
    else:
        assert spec.mean is None and spec.std is None and spec.to_model is not None
    assert spec.image_size == spec.recipe["img_size"] and spec.recipe["model"]
    assert callable(spec.fetch) and callable(spec.reader)
    # class names: written out, or readable from disk
    assert len(spec.class_names) == spec.num_classes or (not spec.class_names and spec.list_classes)


def test_cifar_class_names():
    assert data.get_dataset("cifar10").class_names[:3] == ("airplane", "automobile", "bird")
    names = data.get_dataset("cifar100").class_names
    # the official meta file lists the fine labels alphabetically
    assert len(set(names)) == 100 and list(names) == sorted(names)
    assert (names[0], names[30], names[99]) == ("apple", "dolphin", "worm")


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(DataError, match="unknown dataset 'mnist'; choose one of cifar10, cifar100, imagenet"):
        data.get_dataset("mnist")
    with pytest.raises(DataError, match="choose one of"):
        data.build_datasets("mnist", "data")


def test_test_set_alone(tmp_path):
    write_cifar(tmp_path, n_test=16)
    test = data.build_test_set("cifar10", tmp_path, test_subset=4)
    assert len(test) == 4 and test[0][0].shape == (3, 32, 32)
    # ImageNet: evaluation reads val/ and needs no train/
    root = write_imagenet(tmp_path / "inet", per_class=2)
    import shutil
    shutil.rmtree(root / "train")
    test = data.build_test_set("imagenet", root, img_size=32)
    assert len(test) == 6 and test.classes == ["n01", "n02", "n03"]
    assert data.get_dataset("imagenet").class_names_from(root) == ("n01", "n02", "n03")
    with pytest.raises(DataError, match="holds train/ and val/"):
        data.prepare("imagenet", root)
    with pytest.raises(DataError, match="ImageNet not found.*holds val/"):
        data.build_test_set("imagenet", tmp_path / "nowhere")


# ---------------------------------------------------------------- CIFAR files

@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_load_cifar_official_layout(tmp_path, name):
    train_x, train_y, test_x, test_y = write_cifar(tmp_path, name, per_file=4, n_test=6)
    x, y = data.load_cifar(name, tmp_path, train=True, download_missing=False)
    assert x.dtype == torch.uint8 and x.shape == (len(train_x), 3, 32, 32)
    # rows hold the R, G, B planes one after another: channel 0 is the first 1024 bytes
    assert torch.equal(x, torch.from_numpy(train_x))
    assert torch.equal(y, torch.from_numpy(train_y))
    x, y = data.load_cifar(name, tmp_path, train=False, download_missing=False)
    assert torch.equal(x, torch.from_numpy(test_x)) and torch.equal(y, torch.from_numpy(test_y))


def test_build_datasets_cifar_subsets_and_items(tmp_path):
    write_cifar(tmp_path, per_file=8, n_test=20)
    train, test = data.build_datasets("cifar10", tmp_path, subset=10, test_subset=5, download_missing=False)
    assert len(train) == 10 and len(test) == 5
    img, label = test[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and 0 <= int(label) < 10
    # the test subset is evenly spaced over the file (a class-sorted file still gives every class)
    full = data.build_datasets("cifar10", tmp_path, download_missing=False)[1]
    assert torch.equal(test[1][0], full[4][0])


def test_missing_cifar_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_cifar("cifar10", tmp_path, train=True, download_missing=False)
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and "cifar-10-batches-py" in msg and str(tmp_path) in msg
    assert "c58f30108f718f92721af3b95e74349a" in msg  # the md5 to check a hand-made copy against


def test_corrupt_cifar_file_gives_clear_error(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])  # truncated, as by an interrupted copy
    with pytest.raises(DataError, match="data_batch_3 is corrupt"):
        data.load_cifar("cifar10", tmp_path, train=True, download_missing=False)


def test_wrong_content_gives_clear_error(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, f, protocol=2)
    with pytest.raises(DataError, match=r"shape \(N, 3072\)"):
        data.load_cifar("cifar10", tmp_path, train=False, download_missing=False)
    with open(path, "wb") as f:  # a CIFAR-100 file where CIFAR-10 is expected
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [0, 1, 2, 3]}, f, protocol=2)
    with pytest.raises(DataError, match="lacks the keys"):
        data.load_cifar("cifar10", tmp_path, train=False, download_missing=False)


class _RunsCode:
    """A pickle that would create a file when loaded with plain pickle.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_data_file_cannot_run_code(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _RunsCode(str(marker)), b"labels": []}, f, protocol=2)
    with pytest.raises(DataError, match="refusing to load"):
        data.load_cifar("cifar10", tmp_path, train=True, download_missing=False)
    assert not marker.exists()


# ---------------------------------------------------------------- download, md5, extraction



def _point_at(monkeypatch, url, md5):
    monkeypatch.setitem(data.CIFAR, "cifar10", {**data.CIFAR["cifar10"], "url": url, "md5": md5})


def test_download_checks_md5_and_extracts(tmp_path, http_server, monkeypatch):
    www, base = http_server
    archive = cifar_archive(tmp_path / "build", per_file=3, n_test=5)
    (www / "cifar.tar.gz").write_bytes(archive)
    _point_at(monkeypatch, f"{base}/cifar.tar.gz", hashlib.md5(archive).hexdigest())
    root = tmp_path / "data"
    x, y = data.load_cifar("cifar10", root, train=True)
    assert x.shape == (15, 3, 32, 32)
    assert (root / "cifar-10-python.tar.gz").read_bytes() == archive  # kept, checked
    assert not list(root.glob("*.part"))


def test_download_with_wrong_md5_is_refused_and_removed(tmp_path, http_server, monkeypatch):
    www, base = http_server
    (www / "cifar.tar.gz").write_bytes(cifar_archive(tmp_path / "build"))
    _point_at(monkeypatch, f"{base}/cifar.tar.gz", "0" * 32)
    root = tmp_path / "data"
    with pytest.raises(DataError, match="corrupt: md5"):
        data.load_cifar("cifar10", root, train=True)
    assert os.listdir(root) == []  # neither the archive nor a partial file is left to be trusted


def test_offline_download_fails_fast_with_instructions(tmp_path, monkeypatch):
    import socket
    with socket.socket() as s:  # a port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _point_at(monkeypatch, f"http://127.0.0.1:{port}/cifar-10-python.tar.gz", "0" * 32)
    with pytest.raises(DataError) as e:
        data.load_cifar("cifar10", tmp_path, train=True)
    msg = str(e.value)
    assert "could not download" in msg and "copy the archive into" in msg and "--data-dir" in msg


def test_archive_copied_by_hand_is_checked_and_unpacked(tmp_path, monkeypatch):
    archive = cifar_archive(tmp_path / "build", per_file=2, n_test=3)
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(archive)
    _point_at(monkeypatch, "http://127.0.0.1:9/unused", hashlib.md5(archive).hexdigest())
    x, _ = data.load_cifar("cifar10", root, train=False)
    assert x.shape == (3, 3, 32, 32)
    # a damaged archive is named, not half-used
    (root / "cifar-10-python.tar.gz").write_bytes(archive[:-10])
    for f in (root / "cifar-10-batches-py").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="is not the official"):
        data.load_cifar("cifar10", root, train=False)


# ---------------------------------------------------------------- ImageNet folders

def test_imagenet_folders(tmp_path):
    write_imagenet(tmp_path / "imagenet", per_class=3, size=(48, 40))
    train, test = data.build_datasets("imagenet", tmp_path, img_size=32, randaugment="rand-m9-mstd0.5-inc1")
    assert train.classes == ["n01", "n02", "n03"] and len(train) == 9 and len(test) == 9
    img, label = train[4]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and label == 1
    img, label = test[8]
    assert img.shape == (3, 32, 32) and label == 2
    # evaluation: resize + centre crop of a uniform image keeps its colour exactly
    assert img[0].float().std() < 2 and abs(img[0].float().mean() - (60 * 2 + 20)) < 3


def test_imagenet_errors(tmp_path):
    with pytest.raises(DataError, match="ImageNet not found.*train/n01440764"):
        data.build_datasets("imagenet", tmp_path)
    root = write_imagenet(tmp_path / "inet")
    os.rename(root / "val" / "n03", root / "val" / "other")
    with pytest.raises(DataError, match="different class folders"):
        data.build_datasets("imagenet", root)
    os.rename(root / "val" / "other", root / "val" / "n03")
    (root / "train" / "n02" / "img_0.JPEG").write_bytes(b"not a jpeg")
    train, _ = data.build_datasets("imagenet", root, img_size=32)
    with pytest.raises(DataError, match=r"img_0.JPEG.*corrupt"):
        train[3]


# ---------------------------------------------------------------- per-image augmentations

def test_random_crop_with_padding_shifts_and_pads_with_zeros():
    img = texture() | 1  # no zero pixels of its own
    torch.manual_seed(0)
    shifts = set()
    for _ in range(50):
        out = data.random_crop(img, 32, padding=4)
        assert out.shape == img.shape
        padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
        found = [(t, l) for t in range(9) for l in range(9) if torch.equal(padded[:, t:t + 32, l:l + 32], out)]
        assert len(found) == 1
        shifts.add(found[0])
    assert len(shifts) > 10  # many different shifts, each one a window of the zero-padded image
    assert data.random_crop(img, 32, padding=0).equal(img)


def test_horizontal_flip():
    img = texture()
    assert torch.equal(data.random_hflip(img, p=1.0), img.flip(-1))
    assert torch.equal(data.random_hflip(img, p=0.0), img)
    torch.manual_seed(0)
    flipped = sum(torch.equal(data.random_hflip(img, 0.5), img.flip(-1)) for _ in range(200))
    assert 70 < flipped < 130


def test_randaugment_policy_parsing():
    ra = data.RandAugment("rand-m9-n1-mstd0.4-inc1")
    assert (ra.magnitude, ra.num_ops, ra.magnitude_std) == (9.0, 1, 0.4)
    ra = data.RandAugment("rand-m9-mstd0.5-inc1")
    assert (ra.magnitude, ra.num_ops, ra.magnitude_std) == (9.0, 2, 0.5)  # timm's default n=2
    assert len(ra.ops) == 15
    for bad in ("auto-m9", "rand-m9-x3-inc1", "rand-mnine-inc1", "rand-m9-n1"):
        with pytest.raises(DataError):
            data.RandAugment(bad)


@pytest.mark.parametrize("name", sorted(data_randaugment.RANDAUGMENT_OPS))
def test_each_randaugment_op_changes_the_image(name):
    # low contrast and a skewed histogram, so that AutoContrast and Equalize have work to do
    img = data.to_pil((texture(seed=1).float() ** 2 / 510 + 40).to(torch.uint8))
    torch.manual_seed(0)
    out = data_randaugment.RANDAUGMENT_OPS[name](img, 9.0, (125, 123, 114))
    assert out.size == img.size and out.mode == "RGB"
    assert not np.array_equal(np.asarray(out), np.asarray(img)), name


def test_randaugment_applies_each_op_half_of_the_time():
    ra = data.RandAugment("rand-m9-n1-mstd0.4-inc1")
    img = data.to_pil(texture(seed=2))
    torch.manual_seed(0)
    changed = sum(not np.array_equal(np.asarray(ra(img)), np.asarray(img)) for _ in range(200))
    assert 70 < changed < 130


def test_cifar_train_transform_order_and_types():
    tf = data.CifarTrainTransform(padding=4, hflip=0.5, randaugment=data.RandAugment("rand-m9-n1-mstd0.4-inc1"))
    torch.manual_seed(0)
    out = tf(texture())
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert torch.equal(data.CifarTrainTransform(padding=0, hflip=0.0)(texture()), texture())


def test_random_resized_crop_and_center_crop():
    arr = np.zeros((60, 80, 3), np.uint8)
    arr[:, 40:] = 255  # left half black, right half white
    pil = Image.fromarray(arr)
    torch.manual_seed(0)
    outs = [np.asarray(data.random_resized_crop(pil, 16)) for _ in range(20)]
    assert all(o.shape == (16, 16, 3) for o in outs)
    assert len({o.mean().round(1) for o in outs}) > 5  # regions of different size and place
    whole = data.random_resized_crop(pil, 16, scale=(1.0, 1.0), ratio=(80 / 60, 80 / 60))
    assert np.allclose(np.asarray(whole).mean(), 127.5, atol=8)  # the whole image, resized
    center = np.asarray(data.resize_center_crop(pil, 32, crop_pct=0.875))
    assert center.shape == (32, 32, 3)
    # shorter side 60 -> 36, width 80 -> 48; the central 32 columns straddle the edge
    assert center[:, :14].max() < 10 and center[:, 18:].min() > 245


# ---------------------------------------------------------------- per-batch steps

def test_normalize():
    mean, std = (0.5, 0.25, 0.75), (0.1, 0.2, 0.3)
    images = torch.tensor([round(255 * m) for m in mean], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    x = data.normalize(images, mean, std)
    assert x.dtype == torch.float32 and x.abs().max() < 0.05
    white = data.normalize(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8), mean, std)
    assert torch.allclose(white.flatten(), torch.tensor([(1 - m) / s for m, s in zip(mean, std)]))


def test_random_erasing_fills_one_rectangle():
    torch.manual_seed(0)
    x = torch.ones(64, 3, 32, 32)
    out = data.random_erasing(x.clone(), prob=1.0, mode="const")
    for img in out:
        rows, cols = torch.where(img[0] == 0)
        area = len(rows)
        assert 0.02 * 1024 * 0.7 <= area <= 1024 / 3 * 1.3
        # a rectangle: its bounding box is full, and every channel is erased alike
        assert area == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert torch.equal(img[0] == 0, img[2] == 0)
    assert torch.equal(data.random_erasing(x.clone(), prob=0.0), x)
    some = data.random_erasing(x.clone(), prob=0.25)
    erased = sum(bool((img == 0).any()) for img in some)
    assert 5 <= erased <= 30
    noisy = data.random_erasing(x.clone(), prob=1.0, mode="pixel")
    assert (noisy != 1).sum(dim=(1, 2, 3)).min() > 0 and noisy[noisy != 1].std() > 0.5
    with pytest.raises(DataError):
        data.random_erasing(x, mode="blur")


def test_mixup_blends_batch_with_its_reverse():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    out, t = data.Mixup(mixup_alpha=0.5, num_classes=10)(x, y)
    lam = t[0, 0].item()
    assert 0 < lam < 1 and torch.allclose(t.sum(1), torch.ones(6))
    assert torch.allclose(t[0, 5], torch.tensor(1 - lam))  # image 0 is mixed with image 5
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    out, t = data.Mixup(0.0, 0.0, num_classes=10)(x, y)  # disabled: one-hot targets, images untouched
    assert torch.equal(out, x) and torch.equal(t, torch.nn.functional.one_hot(y, 10).float())


def test_cutmix_pastes_a_box_and_weights_targets_by_area():
    torch.manual_seed(1)
    x = torch.zeros(4, 1, 16, 16)
    x[0], x[3] = 1.0, 2.0
    y = torch.tensor([0, 1, 2, 3])
    for _ in range(5):
        out, t = data.Mixup(cutmix_alpha=1.0, num_classes=4)(x, y)
        pasted = (out[0] == 2.0).float().mean().item()  # share of image 0 now showing image 3
        assert torch.isclose(t[0, 3], torch.tensor(pasted)) and torch.isclose(t[0, 0], torch.tensor(1 - pasted))
        assert set(out[0].unique().tolist()) <= {1.0, 2.0}


def test_loader_order_depends_on_seed_and_epoch_only(tmp_path):
    write_cifar(tmp_path, per_file=8)
    train, _ = data.build_datasets("cifar10", tmp_path, download_missing=False)

    def order(epoch, rank=0, world=1, seed=0):
        loader = data.make_loader(train, 4, train=True, seed=seed, rank=rank, world_size=world)
        loader.sampler.set_epoch(epoch)
        return list(loader.sampler)

    assert order(0) == order(0) and order(0) != order(1) and order(0) != order(0, seed=1)
    halves = order(3, 0, 2) + order(3, 1, 2)
    assert sorted(halves) == list(range(40)) and len(data.make_loader(train, 4, True, world_size=2)) == 5
