"""Tiny datasets in the official on-disk formats, written by the tests themselves.

CIFAR: the "python version" layout (a pickle per batch: a dict with bytes keys,
b"data" a (N, 3072) uint8 array of R, G, B planes, b"labels" or b"fine_labels"
a list). ImageNet: train/ and val/ folders with one sub-folder of JPEG files
per class.
"""
import io
import os
import pickle
import tarfile

import numpy as np
from PIL import Image

CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def cifar_images(n, seed):
    """n images that a simple classifier can tell apart: a class-dependent colour plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    base = np.array([[(c * 25) % 256, (c * 70) % 256, (255 - c * 25) % 256] for c in range(10)], dtype=np.float64)
    images = base[labels][:, :, None, None] + rng.normal(0, 30, (n, 3, 32, 32))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def write_cifar(root, name="cifar10", per_file=8, n_test=16, seed=0):
    """Write a tiny CIFAR in the official layout under root; return (train images, labels, test images, labels)."""
    folder, train_files, test_files, label_key, _ = CIFAR_FILES[name]
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    out = []
    for files, n in ((train_files, per_file), (test_files, n_test)):
        all_x, all_y = [], []
        for j, f in enumerate(files):
            x, y = cifar_images(n, seed + 100 * len(out) + j)
            rows = x.reshape(n, 3072)  # (N, 3, 32, 32) -> (N, 3072): R, G, B planes
            with open(os.path.join(root, folder, f), "wb") as fh:
                pickle.dump({b"batch_label": f.encode(), label_key: y.tolist(), b"data": rows,
                             b"filenames": [b"x.png"] * n}, fh, protocol=2)
            all_x.append(x)
            all_y.append(y)
        out += [np.concatenate(all_x), np.concatenate(all_y)]
    return out


def cifar_archive(root, name="cifar10", **kw):
    """Bytes of a .tar.gz holding a tiny CIFAR folder, as the official archive does."""
    src = os.path.join(root, "src")
    write_cifar(src, name, **kw)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(os.path.join(src, CIFAR_FILES[name][0]), arcname=CIFAR_FILES[name][0])
    return buf.getvalue()


def write_imagenet(root, classes=("n01", "n02", "n03"), per_class=3, size=(48, 40)):
    """train/ and val/ of class folders of JPEG files; every class has its own colour."""
    for split in ("train", "val"):
        for c, cls in enumerate(classes):
            d = os.path.join(root, split, cls)
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                arr = np.full((size[1], size[0], 3), (60 * c + 20, 200 - 50 * c, 10 * i), dtype=np.uint8)
                Image.fromarray(arr).save(os.path.join(d, f"img_{i}.JPEG"), quality=95)
    return root
