"""Datasets and the official training recipe's augmentations for QKFormer.

QKFormer ("QKFormer: Hierarchical Spiking Transformer using Q-K Attention", Zhou et al.,
NeurIPS 2024) states little about its data: for CIFAR only the epochs and the batch size.
Everything else here comes from the official code, which trained with the timm library's
pipeline (CIFAR: timm's train.py with cifar10.yml / cifar100.yml; ImageNet: the MAE
fine-tuning script). This file writes that pipeline out in plain PyTorch, numpy and Pillow
so that every step can be read, and it knows nothing about the model. In reading order:

* The dataset descriptions (DatasetSpec; the table DATASETS near the end): classes, image
  size, channels, normalisation, the official recipe and the two functions that fetch and
  read the data. train.py and evaluate.py read them and never test a dataset's name: a new
  dataset is a new entry.
* The augmentations, in the order a training image meets them:
  - per image, in DataLoader workers on uint8 data (no float conversion until the batch is
    on the device): crop (CIFAR: pad and crop; ImageNet: random resized crop), horizontal
    flip, RandAugment;
  - per batch, on the device after the batch arrives (as timm's "prefetcher"):
    normalisation with the dataset's mean and std, random erasing, mixup.
* Reading: CIFAR-10/100 from the official pickle files, kept in memory as one uint8 tensor
  (N, 3, 32, 32) (150 MB for CIFAR's training set); ImageNet-1K from train/ and val/
  folders of class folders of JPEG files.
* ``make_loader``: a DataLoader over a DistributedSampler, for one process and for many
  alike: the order of the images depends only on (seed, epoch), which makes ``--resume`` exact.

Wings: data_files.py (downloads, md5, safe unpacking, image checks, DataError),
data_randaugment.py (RandAugment's operations), data_events.py (CIFAR10-DVS and DVS128
Gesture, added to DATASETS when imported).

All randomness comes from torch's generator (never Python's ``random`` or numpy's), so that
one seed and one saved generator state pin down a run. Errors a user can cause raise
``DataError`` with a message that says what to do.
"""
import functools
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import data_files
from data_files import DataError  # part of this file's interface: callers catch data.DataError
import data_randaugment


# ----------------------------------------------------------------------------
# Dataset descriptions: what train.py and evaluate.py know about a dataset
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetSpec:
    """Everything the scripts know about one dataset, written once (the table is DATASETS).

    train.py and evaluate.py read these fields and never test a dataset's name,
    so adding a dataset is one new DATASETS entry and its two functions:

        fetch(spec, data_dir, download_missing)  make sure the data is on disk
            (download it if allowed) or raise DataError saying where to put it;
            run once, by one process, before any process reads the data.
        reader(spec, data_dir, train, img_size, subset, augment, download_missing, **options)
            -> Dataset of (uint8 image (in_channels, H, W), label) pairs: the
            training split with augment's per-image augmentations (an
            Augmentation) or the test split without; subset: keep about N
            images (None: all); options: the run settings named in
            spec.options (event data: T and dvs_split; its samples are float
            event counts (T, in_channels, H, W)).

    Use them through the methods prepare(), build() and class_names_from().
    """
    name: str                 # the --dataset name, e.g. "cifar10"
    title: str                # for people, e.g. "CIFAR-10"
    num_classes: int
    # Names in label order. An empty tuple when they are only known from the
    # data on disk (ImageNet: its class folders); class_names_from(data_dir)
    # then reads them with list_classes.
    class_names: tuple
    image_size: int           # the side of the (square) images the model sees by default
    in_channels: int
    mean: tuple               # per channel, on the 0..1 scale: normalisation on the device
    std: tuple
    # The official recipe this dataset trains with by default (train.py's
    # settings: model preset, schedule, augmentation), overridable per option.
    recipe: dict = field(compare=False, repr=False)
    fetch: Callable = field(compare=False, repr=False)
    reader: Callable = field(compare=False, repr=False)
    list_classes: Callable = field(default=None, compare=False, repr=False)  # (spec, data_dir) -> tuple
    small: bool = False       # small enough to train on a CPU (train.py's --recipe cpu)
    data_hint: str = ""       # what --data-dir must hold, for --help
    # Run settings the reader takes besides the common ones, by name (event data:
    # the number of frames T and the split); build() passes them, drops the rest.
    options: tuple = ()
    # The per-batch steps (normalize, random erasing, mixup) work batch first, on
    # (B, C, H, W). to_model turns their output into the model's input (None: as it
    # is); event data rides through them as (B, T*2, H, W): data_events.event_batch_to_model.
    to_model: Callable = field(default=None, compare=False, repr=False)
    # What the first layer sees: "pixels" (real values: multiply-accumulates) or
    # "event counts" (sums of events: accumulates); evaluate.py's energy follows it.
    input_kind: str = "pixels"

    def prepare(self, data_dir, download_missing=True):
        """Make sure the data is on disk (downloading it if allowed and possible)."""
        self.fetch(self, data_dir, download_missing)

    def build(self, data_dir, train, img_size=None, subset=None, augment=None, download_missing=True,
              **options):
        """The training split (with augment's augmentations) or the test split, as a Dataset.
        options: run settings (e.g. T=16); those named in self.options go to the reader."""
        if img_size is not None and img_size < 1:
            raise DataError(f"--img-size must be positive, got {img_size}")
        taken = {k: v for k, v in options.items() if k in self.options and v is not None}
        return self.reader(self, data_dir, train, img_size, subset, augment or Augmentation(),
                           download_missing, **taken)

    def model_input(self, x):
        """The output of the per-batch steps (batch first) -> what the model takes."""
        return x if self.to_model is None else self.to_model(x)

    def class_names_from(self, data_dir=None):
        """The class names in label order: class_names, or read from the data on disk when
        they are only known there (ImageNet: the sorted class folder names of val/)."""
        if self.class_names or self.list_classes is None:
            return self.class_names
        if data_dir is None:
            raise DataError(f"the class names of {self.title} are read from its files: give the data folder")
        return tuple(self.list_classes(self, data_dir))


@dataclass(frozen=True)
class Augmentation:
    """The per-image augmentations of a training split (the test split gets none).

    crop_padding: pad by this many pixels and crop back at a random place (CIFAR);
    hflip: horizontal flip probability; randaugment: a timm policy string or 'none'.
    """
    crop_padding: int = 0
    hflip: float = 0.5
    randaugment: str = "none"

    def randaugment_for(self, spec):
        """The RandAugment of the policy (filling with the dataset's mean colour), or None."""
        if self.randaugment in (None, "", "none"):
            return None
        return RandAugment(self.randaugment, spec.mean)


def get_dataset(name):
    """The DatasetSpec of a --dataset name, or a DataError listing the choices."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


# ----------------------------------------------------------------------------
# Per-image augmentations (uint8 tensors (3, H, W) and PIL images)
# ----------------------------------------------------------------------------
# Which recipe uses what: the official cifar10.yml / cifar100.yml ask for a flip
# and RandAugment (no crop: see CIFAR_RECIPE), the ImageNet script for a random
# resized crop, a flip and RandAugment; the paper's CIFAR setup names none of them.
# The classic CIFAR pad-and-crop is here for the CPU recipe (train_settings.CPU_RECIPE).

def _uniform(lo, hi):
    # every draw from torch's generator, whose state checkpoints save (exact resume)
    return lo + (hi - lo) * torch.rand(()).item()


def _coin(p):
    # p == 0 draws no number, so switching an augmentation off leaves the other draws alone
    return p > 0 and torch.rand(()).item() < p


def to_pil(img):
    # RandAugment and the ImageNet crops are Pillow operations, as in timm
    return Image.fromarray(img.permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)


def from_pil(pil):
    # back to the uint8 tensor the loader stacks into batches
    return torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def random_crop(img, size, padding):
    """Pad with `padding` zero pixels on each side, then cut a random size x size window.

    The standard CIFAR augmentation: the object shifts by up to `padding`
    pixels, with black borders entering from the edges.
    """
    if padding > 0:
        img = F.pad(img, (padding, padding, padding, padding))
    h, w = img.shape[-2:]
    top = int(torch.randint(0, h - size + 1, ()))
    left = int(torch.randint(0, w - size + 1, ()))
    return img[:, top:top + size, left:left + size]


def random_hflip(img, p=0.5):
    # a flipped object is still the same class: a free, label-preserving augmentation
    return img.flip(-1) if _coin(p) else img


def random_resized_crop(pil, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Inception-style crop: a random region covering `scale` of the area with an
    aspect ratio in `ratio`, resized (bicubic) to size x size. As torchvision's
    RandomResizedCrop, which the official ImageNet recipe used."""
    width, height = pil.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(*scale)
        aspect = math.exp(_uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, ()))
            left = int(torch.randint(0, width - w + 1, ()))
            break
    else:  # ten misses (very elongated image): fall back to a centre crop
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            w, h = int(round(height * ratio[1])), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return pil.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))


def resize_center_crop(pil, size, crop_pct=0.875):
    """Evaluation view of ImageNet: shorter side to size / crop_pct (224 -> 256), then the central size x size."""
    scale_size = int(math.floor(size / crop_pct))
    width, height = pil.size
    if width <= height:
        new_w, new_h = scale_size, int(round(scale_size * height / width))
    else:
        new_w, new_h = int(round(scale_size * width / height)), scale_size
    pil = pil.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return pil.crop((left, top, left + size, top + size))


class RandAugment:
    """RandAugment (Cubuk et al. 2020) as timm runs it, from a policy string such as 'rand-m9-n1-mstd0.4-inc1'.

    Each of n layers picks one operation uniformly at random (timm's table:
    data_randaugment.RANDAUGMENT_OPS) and applies it with probability 0.5 at a
    magnitude drawn around m. m: magnitude (0..10); n: operations per image (timm's default 2);
    mstd: the magnitude is drawn from a normal(m, mstd) per operation, clipped
    to 0..10; inc1: the "increasing" operation set (the only one written here).
    Operations that move pixels fill the uncovered area with the dataset's
    mean colour, as timm does.
    """

    def __init__(self, policy, mean=(0.5, 0.5, 0.5)):
        self.policy = policy
        self.magnitude, self.num_ops, self.magnitude_std = data_randaugment.parse_policy(policy)
        self.ops = list(data_randaugment.RANDAUGMENT_OPS.items())
        self.fill = tuple(min(255, round(255 * c)) for c in mean)

    def __call__(self, pil):
        for _ in range(self.num_ops):
            # ops are drawn with replacement, and each runs only half of the time
            name, op = self.ops[int(torch.randint(len(self.ops), ()))]
            if not _coin(0.5):
                continue
            level = self.magnitude
            if self.magnitude_std > 0:
                level = level + self.magnitude_std * torch.randn(()).item()
            level = min(10.0, max(0.0, level))
            pil = op(pil, level, self.fill)
        return pil

    def __repr__(self):
        return f"RandAugment({self.policy!r})"


class CifarTrainTransform:
    """uint8 (3, 32, 32) -> uint8 (3, 32, 32): crop with padding, flip, then RandAugment.

    Same order as timm's pipeline (crop, flip, auto-augment). Cheap enough to
    run in the main process when RandAugment is off.
    """

    def __init__(self, padding=4, hflip=0.5, randaugment=None):
        self.padding, self.hflip, self.randaugment = padding, hflip, randaugment

    def __call__(self, img):
        if self.padding:
            img = random_crop(img, img.shape[-1], self.padding)
        img = random_hflip(img, self.hflip)
        if self.randaugment is not None:
            img = from_pil(self.randaugment(to_pil(img)))
        return img


class ImageNetTrainTransform:
    """PIL image -> uint8 (3, size, size): random resized crop, flip, RandAugment."""

    def __init__(self, size=224, hflip=0.5, randaugment=None, scale=(0.08, 1.0)):
        self.size, self.hflip, self.randaugment, self.scale = size, hflip, randaugment, scale

    def __call__(self, pil):
        pil = random_resized_crop(pil, self.size, self.scale)
        if _coin(self.hflip):
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            pil = self.randaugment(pil)
        return from_pil(pil)


class ImageNetEvalTransform:
    """PIL image -> uint8 (3, size, size): resize and central crop, the same view every time."""

    def __init__(self, size=224, crop_pct=0.875):
        self.size, self.crop_pct = size, crop_pct

    def __call__(self, pil):
        return from_pil(resize_center_crop(pil, self.size, self.crop_pct))


# ----------------------------------------------------------------------------
# Per-batch steps on the device: normalisation, random erasing, mixup/cutmix
# ----------------------------------------------------------------------------
# Random erasing and mixup are the official configs' (reprob, mixup, ...: see the
# recipes); the paper's CIFAR setup names neither.

@functools.lru_cache(maxsize=16)
def _mean_std_255(mean, std, device):
    """mean * 255 and std * 255 as (1, C, 1, 1) float tensors on `device`, made once per device.

    Built from Python lists on every call, they would cost a copy from
    pageable host memory each step, which waits for the device to catch up:
    the CPU could never run ahead of the GPU.
    """
    with torch.inference_mode(False):  # ordinary tensors, even if first asked for under inference_mode
        mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255  # (C,) -> (1, C, 1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255
        return mean.to(device), std.to(device)


def normalize(images, mean, std):
    """uint8 (B, 3, H, W) in 0..255 -> float (B, 3, H, W) with zero mean and unit std per channel.

    mean None: no normalisation (event counts, as the official DVS code feeds them):
    float, with any axes between the batch and (H, W) folded into one, so that the
    later per-batch steps see (B, C, H, W): event frames (B, T, 2, H, W) -> (B, T*2, H, W).
    """
    if mean is None:
        return images.float().flatten(1, -3)  # (B, T, 2, H, W) -> (B, T*2, H, W)
    mean, std = _mean_std_255(tuple(mean), tuple(std), images.device)
    return (images - mean).div_(std)  # uint8 - float32 -> a new float32 tensor, divided in place


def random_erasing(x, prob=0.25, mode="const", scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), tries=10):
    """Random erasing (Zhong et al. 2020) as timm applies it, to a normalised float batch, in place.

    Each image, with probability `prob`, gets one rectangle covering 2-33 % of
    its area (aspect ratio 0.3-3.3) overwritten: with zeros ('const', i.e. the
    mean colour after normalisation; the CIFAR recipe), with one random colour
    ('rand'), or with per-pixel normal noise ('pixel'; the ImageNet recipe).
    As in timm, up to `tries` rectangles are drawn and the first that fits
    inside the image is used; an image where none fits is left alone.

    The whole batch is done at once, with every random number drawn on x's
    device by its generator (saved in checkpoints beside the CPU one): a few
    tensor operations per batch and no copy between host and device.
    """
    if mode not in ("const", "rand", "pixel"):
        raise DataError(f"random erasing mode must be const, rand or pixel, not {mode!r}")
    if prob <= 0:
        return x
    b, c, h, w = x.shape
    dev = x.device
    erase = torch.rand(b, device=dev) < prob                                         # (B,)
    area = h * w * torch.empty(b, tries, device=dev).uniform_(*scale)                # (B, tries)
    aspect = torch.empty(b, tries, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp_()
    eh, ew = (area * aspect).sqrt_().round_(), (area / aspect).sqrt_().round_()      # (B, tries) each
    fits = (eh < h) & (ew < w)
    first = fits.int().argmax(1, keepdim=True)  # (B, 1): index of the first try that fits (0 if none)
    eh, ew = eh.gather(1, first).squeeze(1), ew.gather(1, first).squeeze(1)          # (B,) each
    erase &= fits.any(1)
    # top-left corner uniform over the positions that keep the rectangle inside
    top = (torch.rand(b, device=dev) * (h - eh + 1)).floor_()                        # (B,)
    left = (torch.rand(b, device=dev) * (w - ew + 1)).floor_()
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])                  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])                # (B, W)
    mask = (erase[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (B, 1, H, W)
    if mode == "const":
        return x.masked_fill_(mask, 0.0)
    noise = torch.randn((b, c, 1, 1) if mode == "rand" else (b, c, h, w), device=dev, dtype=x.dtype)
    return torch.where(mask, noise, x, out=x)


class Mixup:
    """Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) per batch, as timm's Mixup(mode='batch').

    The whole batch is blended with itself in reverse order, with one weight
    lam ~ Beta(alpha, alpha): mixup averages the images, cutmix pastes a box
    of the reversed batch (lam is then the area actually kept). When both are
    on, cutmix is chosen with probability switch_prob. Returns the mixed
    images and soft targets (B, num_classes) = lam * one_hot(y) + (1 - lam) *
    one_hot(y reversed). Label smoothing is left to the loss
    (CrossEntropyLoss(label_smoothing=...)); smoothing the mixed targets gives
    the same numbers as timm smoothing each one-hot before mixing, because
    smoothing is affine and the weights sum to 1.
    """

    def __init__(self, mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5, num_classes=10):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise DataError("mixup and cutmix alphas must be >= 0")
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.num_classes = prob, switch_prob, num_classes
        self.enabled = mixup_alpha > 0 or cutmix_alpha > 0

    @staticmethod
    def _beta(alpha):
        a = torch.tensor(float(alpha))
        return torch.distributions.Beta(a, a).sample().item()

    def __call__(self, x, y):
        lam, use_cutmix = 1.0, False
        if self.enabled and _coin(self.prob):
            if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
                use_cutmix = _coin(self.switch_prob)
            else:
                use_cutmix = self.cutmix_alpha > 0
            lam = self._beta(self.cutmix_alpha if use_cutmix else self.mixup_alpha)
        if lam != 1.0:
            if use_cutmix:
                h, w = x.shape[-2:]
                # a box of area (1 - lam) h w, centred anywhere, clipped at the border
                cut = math.sqrt(1.0 - lam)
                ch, cw = int(h * cut), int(w * cut)
                cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
                y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
                x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
                x = x.clone()
                x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the clipped box may be smaller
            else:
                x = x * lam + x.flip(0) * (1.0 - lam)
        one_hot = F.one_hot(y, self.num_classes).to(x.dtype)
        return x, one_hot * lam + one_hot.flip(0) * (1.0 - lam)


# ----------------------------------------------------------------------------
# Reading: CIFAR-10/100's official "python version" pickle files; ImageNet's folders
# ----------------------------------------------------------------------------

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# CIFAR-100's 100 "fine" labels in label order, as in the official meta file's
# fine_label_names (alphabetical).
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)

# Where the official CIFAR files come from and what they hold (read by ensure_cifar and load_cifar).
# Title and number of classes are written here too, so that reading the files needs no
# dataset description (DATASETS lists these readers: they do not look back up into it).
CIFAR = {
    "cifar10": dict(
        title="CIFAR-10", num_classes=10, folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train_files=["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"],
        test_files=["test_batch"], label_key="labels",
    ),
    "cifar100": dict(
        title="CIFAR-100", num_classes=100, folder="cifar-100-python", archive="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=["train"], test_files=["test"],
        label_key="fine_labels",  # the 100 classes; "coarse_labels" holds the 20 super-classes
    ),
}


def ensure_cifar(name, root, download_missing=True):
    """Return the folder holding the official CIFAR files, fetching them if needed.

    Order of attempts: the unpacked folder; the archive already in root (e.g.
    copied there by hand on an offline machine); a download. When none works
    the DataError says where to put the files (data_files.ensure_unpacked).
    """
    spec = CIFAR[name]
    return data_files.ensure_unpacked(
        spec["title"], os.path.join(root, spec["folder"]), spec["train_files"] + spec["test_files"],
        os.path.join(root, spec["archive"]), spec["url"], spec["md5"], download_missing)


def _read_cifar_file(path, label_key, num_classes):
    """(images (N, 3, 32, 32) uint8, labels (N,) int64) of one file, checked before use.

    The checks name the file and what is wrong with it: a wrong file read as
    CIFAR would otherwise train on garbage or fail far from the cause.
    """
    # a pickle can run code when loaded: unpickle_arrays lets it build arrays only
    d = data_files.unpickle_arrays(path, "a CIFAR python-format file")
    if not isinstance(d, dict):
        raise DataError(f"{path} is not a CIFAR python-format file (it holds a {type(d).__name__}, not a dict)")
    # the files were written by Python 2: their keys are bytes
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or label_key not in d:
        raise DataError(f"{path} is not a CIFAR python-format file: it lacks the keys 'data' and "
                        f"'{label_key}' (a CIFAR-10 file read as CIFAR-100, or the other way round?)")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"{path}: expected 'data' of shape (N, 3072) uint8 and N labels, got {data.shape} "
                        f"{data.dtype} and {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside 0..{num_classes - 1}")
    # Each row holds the red, green and blue 32x32 planes one after another.
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # (N, 3072) -> (N, 3, 32, 32)
    return images, torch.from_numpy(labels)


def load_cifar(name, root, train, download_missing=True):
    """All images and labels of one CIFAR split: (N, 3, 32, 32) uint8 and (N,) int64 tensors."""
    spec = CIFAR[name]
    folder = ensure_cifar(name, root, download_missing)
    files = spec["train_files"] if train else spec["test_files"]
    parts = [_read_cifar_file(os.path.join(folder, f), spec["label_key"], spec["num_classes"]) for f in files]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ImageNet: folders of JPEG files, listed and checked by data_files (it cannot be downloaded).

def imagenet_root(data_dir, splits=("train", "val")):
    """The folder holding ImageNet's split folders (train/ and val/, or only those in
    `splits`): data_dir itself or data_dir/imagenet."""
    for root in (data_dir, os.path.join(data_dir, "imagenet")):
        if all(os.path.isdir(os.path.join(root, s)) for s in splits):
            return root
    folders = " and ".join(f"{s}/" for s in splits)
    raise DataError(
        f"ImageNet not found: neither {os.path.abspath(data_dir)} nor {os.path.abspath(data_dir)}/imagenet "
        f"holds {folders}. Put the ImageNet-1K training and validation images there with one "
        f"sub-folder per class (train/n01440764/*.JPEG, ..., val/n01440764/*.JPEG; the validation images "
        f"must be sorted into class folders too), or point --data-dir at them. ImageNet cannot be "
        f"downloaded automatically: get it from https://image-net.org.")


# ----------------------------------------------------------------------------
# Datasets: the readers and the table of dataset descriptions
# ----------------------------------------------------------------------------

class TensorImages(Dataset):
    """Images held in memory as one uint8 tensor (N, 3, H, W), with an optional per-image transform."""

    def __init__(self, images, labels, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[i]


class ImageFiles(Dataset):
    """Images read from files on demand (ImageNet), decoded with Pillow in the worker processes."""

    def __init__(self, samples, classes, transform):
        self.samples, self.classes, self.transform = samples, classes, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.transform(data_files.load_image(path)), label


def evenly_spaced(items, n):
    """About n items taken at even steps: a split sorted by class keeps all its classes."""
    if not n:
        return items
    step = max(1, len(items) // n)
    return items[::step][:n]


def _fetch_cifar(spec, data_dir, download_missing):
    ensure_cifar(spec.name, data_dir, download_missing)


def _read_cifar(spec, data_dir, train, img_size, subset, augment, download_missing):
    if img_size not in (None, spec.image_size):
        raise DataError(f"{spec.title} images are {spec.image_size}x{spec.image_size}; got --img-size {img_size}")
    images, labels = load_cifar(spec.name, data_dir, train=train, download_missing=download_missing)
    if not train:
        # evenly spaced: a test file sorted by class would otherwise give one class only
        return TensorImages(evenly_spaced(images, subset), evenly_spaced(labels, subset))
    if subset:
        images, labels = images[:subset], labels[:subset]
    transform = CifarTrainTransform(augment.crop_padding, augment.hflip, augment.randaugment_for(spec))
    return TensorImages(images, labels, transform)


def _fetch_imagenet(spec, data_dir, download_missing):
    imagenet_root(data_dir)  # ImageNet cannot be downloaded: only check that it is there


def _list_imagenet_classes(spec, data_dir):
    """Rule for ImageNet's class names: label i is the i-th class folder of val/ in sorted order
    (the folder names are WordNet ids such as n01440764)."""
    return tuple(data_files.class_folders(os.path.join(imagenet_root(data_dir, ("val",)), "val")))


def _read_imagenet(spec, data_dir, train, img_size, subset, augment, download_missing):
    split = "train" if train else "val"
    root = imagenet_root(data_dir, (split,))
    classes, samples = data_files.find_images(os.path.join(root, split))
    if train and os.path.isdir(os.path.join(root, "val")):
        # labels are folder indices: train/ and val/ must list the same folders
        data_files.check_same_classes(classes, spec.class_names_from(root), root)
    # the first N files in sorted order would all belong to a few classes: take
    # an evenly spaced selection instead
    samples = evenly_spaced(samples, subset)
    size = img_size or spec.image_size
    if train:
        transform = ImageNetTrainTransform(size, augment.hflip, augment.randaugment_for(spec))
    else:
        transform = ImageNetEvalTransform(size)
    return ImageFiles(samples, classes, transform)


# The official training recipes, as train.py's settings. For CIFAR the paper states
# only the epochs (400) and the batch size (64); every other value is from the official
# code: timm's train.py with its cifar10.yml / cifar100.yml (checked against them and
# cifar10_origin_log.txt). For ImageNet the paper states AdamW, "The batch size is set to
# 512" and a base learning rate of 6e-4 scaled by batch / 256; the rest is the official
# MAE-style fine-tuning script, with the batch its logs record. Where a setting departs
# from them, the comment says so. (The official runs used mixed precision: here --amp.)
CIFAR_RECIPE = dict(
    model="cifar10", T=4, img_size=32,
    epochs=400,                  # the paper's 400: the length of the cosine schedule ...
    cooldown_epochs=10,          # ... then 10 epochs at min_lr, as timm adds them: 410 epochs in all
                                 # (--epochs N drops them and scales the warm-up: see train.resolve_args)
    batch_size=64,               # the paper's; the rest of the recipe is cifar10.yml's
    lr=1e-3, blr=None, min_lr=1e-5, weight_decay=0.06,
    warmup_epochs=20, warmup_lr=1e-5,
    warmup_prefix=False,         # timm: the cosine runs over epochs 0..400, not 20..400 (see train.lr_at)
    accum_iter=1, clip_grad=None,
    smoothing=0.1,               # label smoothing, in the loss (see Mixup)
    mixup=0.5, cutmix=0.0, mixup_off_epoch=200,   # clean images for the last half of training
    aa="rand-m9-n1-mstd0.4-inc1",  # RandAugment: 1 op per image, magnitude 9 +- 0.4
    reprob=0.25, remode="const",   # random erasing with the mean colour
    # The official cifar10.yml crops with timm's RandomResizedCrop at scale (1, 1)
    # and ratio (1, 1): the whole 32x32 image, i.e. no crop; shifts come from
    # RandAugment's translate operations. --crop-padding 4 adds the classic
    # pad-and-crop (used by the CPU recipe).
    crop_padding=0, hflip=0.5,
    eval_every=1,
)

IMAGENET_RECIPE = dict(
    model="imagenet_10_384", T=4, img_size=224,
    epochs=200, cooldown_epochs=0,
    # As imagenet/logs/QKFormer_16M.txt and _29M.txt record: 8 processes, batch_size=32,
    # accum_iter=2, "effective batch size: 512", "actual lr: 1.20e-03". The effective batch
    # is kept on any number of processes: accum_iter = 512 / (32 x processes), derived by
    # train_settings.derive_accumulation. (imagenet_10_768: train_settings.OFFICIAL_RUNS.)
    batch_size=32, effective_batch=512, accum_iter=None,
    lr=None, blr=6e-4,       # the paper's: lr = blr * effective batch / 256 = 1.2e-3
    min_lr=1e-6, weight_decay=0.05,
    warmup_epochs=5, warmup_lr=0.0,
    warmup_prefix=True,      # MAE: the cosine starts where the warm-up ends
    clip_grad=None,
    smoothing=0.1,
    mixup=0.0, cutmix=0.0, mixup_off_epoch=0,
    aa="rand-m9-mstd0.5-inc1",  # RandAugment: 2 ops per image, magnitude 9 +- 0.5
    reprob=0.25, remode="pixel",  # random erasing with per-pixel noise
    crop_padding=0, hflip=0.5,
    eval_every=1,
)

DATASETS = {spec.name: spec for spec in (
    DatasetSpec(
        name="cifar10", title="CIFAR-10", num_classes=10, class_names=CIFAR10_CLASSES,
        image_size=32, in_channels=3,
        # per-channel mean and std of the training images (as in cifar10.yml)
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        recipe=CIFAR_RECIPE, fetch=_fetch_cifar, reader=_read_cifar, small=True,
        data_hint="cifar-10-batches-py/ (downloaded when missing)"),
    DatasetSpec(
        name="cifar100", title="CIFAR-100", num_classes=100, class_names=CIFAR100_CLASSES,
        image_size=32, in_channels=3,
        # CIFAR-100's own statistics. (The official cifar100.yml reused CIFAR-10's
        # values; the difference is under 0.02 per channel.)
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        recipe={**CIFAR_RECIPE, "model": "cifar100"}, fetch=_fetch_cifar, reader=_read_cifar, small=True,
        data_hint="cifar-100-python/ (downloaded when missing)"),
    DatasetSpec(
        name="imagenet", title="ImageNet-1K", num_classes=1000,
        class_names=(),  # the sorted class folder names: see _list_imagenet_classes
        image_size=224, in_channels=3,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        recipe=IMAGENET_RECIPE, fetch=_fetch_imagenet, reader=_read_imagenet,
        list_classes=_list_imagenet_classes,
        data_hint="ImageNet's train/ and val/ folders of class folders (or imagenet/ holding them)"),
)}


def prepare(name, data_dir, download_missing=True):
    """Make sure a dataset is on disk (downloading CIFAR if allowed) before any process reads it."""
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} is a file, not a folder: point --data-dir at the folder "
                        f"that holds (or is to hold) the dataset")
    get_dataset(name).prepare(data_dir, download_missing)


def build_datasets(name, data_dir, img_size=None, crop_padding=0, hflip=0.5, randaugment="none",
                   subset=None, test_subset=None, download_missing=True, **options):
    """(train set, test set) yielding (uint8 image (C, H, W), label), with the per-image augmentations.

    randaugment: a timm policy string or 'none'. subset: keep the first N
    CIFAR training images (an evenly spaced selection of ImageNet's, whose
    files are sorted by class); test_subset: an evenly spaced selection of N
    test images. Both for quick runs. options: run settings that some readers
    take (DatasetSpec.options; event data: T, dvs_split).
    """
    spec = get_dataset(name)
    augment = Augmentation(crop_padding, hflip, randaugment)
    if spec.input_kind == "pixels":
        augment.randaugment_for(spec)  # a bad policy is reported before any data is read
    train = spec.build(data_dir, True, img_size, subset, augment, download_missing, **options)
    test = spec.build(data_dir, False, img_size, test_subset, None, download_missing=False, **options)
    return train, test


def build_test_set(name, data_dir, img_size=None, test_subset=None, download_missing=False, **options):
    """The test split alone (ImageNet: val/ only, train/ need not exist), for evaluation."""
    return get_dataset(name).build(data_dir, False, img_size, test_subset, None, download_missing, **options)


# ----------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------

def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: what a job scheduler or taskset
    gave it), not all the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(device_type: str, processes_per_machine: int = 1) -> int:
    """Loader worker processes when none are asked for (train.py, evaluate.py, benchmark.py).

    On a CPU the model needs every core and preparing an image costs about 1 % of its
    forward pass, so the main process loads (0). A GPU waits for data unless workers prepare
    the next batches meanwhile: one per usable CPU, shared by the processes of the machine
    (torchrun's LOCAL_WORLD_SIZE), at most 8."""
    if device_type == "cpu":
        return 0
    return min(8, max(1, usable_cpus() // processes_per_machine))


def make_loader(dataset, batch_size, train, workers=0, seed=0, rank=0, world_size=1, pin_memory=False):
    """DataLoader that gives each process its share of the images.

    A DistributedSampler is used even for a single process: it shuffles with a
    generator seeded by (seed, epoch) -- call loader.sampler.set_epoch(epoch)
    each epoch -- so the image order of every epoch is known in advance and a
    resumed run sees the same batches as an uninterrupted one. Training drops
    the last incomplete batch (as the official runs did); evaluation keeps
    every image, split over ranks without padding when world_size is 1.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train,
                                 seed=seed, drop_last=train)
    # Training workers are started afresh each epoch (no persistent_workers): each
    # start seeds them from torch's generator, which the checkpoint saves, so the
    # augmentations of a resumed epoch are the same as in an uninterrupted run
    # (persistent workers would carry random states that no checkpoint holds).
    # Evaluation draws no random numbers: its workers persist between evaluations.
    # The evaluation loader gets a generator of its own: evaluating more or less
    # often then leaves the random numbers of training untouched.
    generator = None if train else torch.Generator().manual_seed(0)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=train, pin_memory=pin_memory, generator=generator,
                      persistent_workers=not train and workers > 0)
