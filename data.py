"""Datasets and the official training recipe's augmentations for QKFormer.

QKFormer ("QKFormer: Hierarchical Spiking Transformer using Q-K Attention",
Zhou et al., NeurIPS 2024) was trained with the timm library's data pipeline
(CIFAR: timm's train.py with cifar10.yml / cifar100.yml; ImageNet: the MAE
fine-tuning script). This file writes that pipeline out in plain PyTorch,
numpy and Pillow so that every step can be read, and it knows nothing about
the model:

* The dataset descriptions (DatasetSpec, the table DATASETS, get_dataset):
  classes and their names, image size and channels, normalisation, the
  official training recipe, and the two functions that fetch and read the
  data. train.py and evaluate.py read them and never test a dataset's name:
  a new dataset is a new DATASETS entry and its reader.
* Reading the data.
  - CIFAR-10 / CIFAR-100 from the official "python version" pickle files
    (``cifar-10-batches-py/``, ``cifar-100-python/``), downloaded, md5-checked
    and unpacked when missing. The whole split is kept in memory as one uint8
    tensor of shape (N, 3, 32, 32): 150 MB for the CIFAR training set.
  - ImageNet-1K from ``train/`` and ``val/`` folders with one sub-folder of
    JPEG files per class (what torchvision's ImageFolder reads).
  - The event-camera datasets of the paper's Table 3, CIFAR10-DVS (AEDAT 2.0
    files) and DVS128 Gesture (AEDAT 3.1 files cut by their labels files),
    decoded with numpy, integrated into T frames of event counts per polarity
    as the official code does with SpikingJelly, and cached per T (the last
    section of this file, with the official event augmentation).
* Per-image augmentations, run in DataLoader worker processes on uint8 data
  (cheap: no float conversion until the batch is on the device):
  random crop with zero padding, random resized crop, horizontal flip and
  RandAugment (timm's ``rand-m9-n1-mstd0.4-inc1`` / ``rand-m9-mstd0.5-inc1``).
* Per-batch steps, run on the training device after the batch arrives (as
  timm's "prefetcher" does): normalisation with the dataset's mean and std,
  random erasing, and mixup / cutmix.
* ``make_loader``: a DataLoader over a DistributedSampler, used for one
  process and for many alike, so that the order of the images depends only on
  (seed, epoch) -- which is what makes ``--resume`` exact.

All randomness comes from torch's generator (never Python's ``random`` or
numpy's), so that one seed and one saved generator state pin down a run.
Errors a user can cause (missing folder, corrupt file, bad option) raise
``DataError`` with a message that says what to do.
"""
import concurrent.futures
import functools
import hashlib
import math
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm


class DataError(Exception):
    """A problem with the data or a data option that the user can fix; the message says how."""


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
    # is); event data rides through them as (B, T*2, H, W), see event_batch_to_model.
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
CIFAR = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train_files=["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"],
        test_files=["test_batch"],
        label_key="labels",
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=["train"],
        test_files=["test"],
        label_key="fine_labels",  # the 100 classes; "coarse_labels" holds the 20 super-classes
    ),
}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DOWNLOAD_TIMEOUT_S = 15


def get_dataset(name):
    """The DatasetSpec of a --dataset name, or a DataError listing the choices."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def dataset_info(name):
    """Number of classes, mean and std of a dataset name (the older interface; see get_dataset)."""
    spec = get_dataset(name)
    return dict(num_classes=spec.num_classes, mean=spec.mean, std=spec.std)


# ----------------------------------------------------------------------------
# CIFAR: download, md5 check, extraction, reading the pickle files
# ----------------------------------------------------------------------------

def md5sum(path, chunk=1 << 20):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _where_to_put(spec, root):
    return (f"Download {spec['archive']} (md5 {spec['md5']}) from {spec['url']} on a machine with "
            f"internet access, then either copy the archive into {os.path.abspath(root)}/ (it is checked "
            f"and unpacked on the next run) or unpack it there so that "
            f"{os.path.join(os.path.abspath(root), spec['folder'], spec['train_files'][0])} exists. "
            f"Use --data-dir to point at another folder.")


def download(url, dest, md5, timeout=DOWNLOAD_TIMEOUT_S):
    """Download url to dest, check its md5, and only then give it its final name.

    The bytes go to dest + '.part' first, so an interrupted or corrupt download
    never leaves a file at dest that a later run would trust.
    """
    part = dest + ".part"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {os.path.basename(dest)}") as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    f.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, ValueError) as e:
        if os.path.exists(part):
            os.remove(part)
        raise DataError(f"could not download {url}: {getattr(e, 'reason', e)}") from None
    got = md5sum(part)
    if got != md5:
        os.remove(part)
        raise DataError(f"the download of {url} is corrupt: md5 {got}, expected {md5}")
    os.replace(part, dest)


def _extract(archive, root):
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            # The 'data' filter refuses absolute paths, '..', links out of root and
            # device files: an archive can only write inside root.
            tar.extractall(root, filter="data")
        else:  # Python < 3.11.4 has no filters: check the names ourselves
            base = os.path.realpath(root)
            for m in tar.getmembers():
                target = os.path.realpath(os.path.join(root, m.name))
                if not (m.isfile() or m.isdir()) or os.path.commonpath([base, target]) != base:
                    raise DataError(f"{archive} holds an unsafe entry {m.name!r}; not extracting it")
            tar.extractall(root)


def ensure_cifar(name, root, download_missing=True):
    """Return the folder holding the official CIFAR files, fetching them if needed.

    Order of attempts: the unpacked folder; the archive already in root (e.g.
    copied there by hand on an offline machine); a download. When none works
    the DataError says where to put the files.
    """
    spec, title = CIFAR[name], DATASETS[name].title
    folder = os.path.join(root, spec["folder"])
    needed = spec["train_files"] + spec["test_files"]
    if all(os.path.isfile(os.path.join(folder, f)) for f in needed):
        return folder
    archive = os.path.join(root, spec["archive"])
    if not os.path.isfile(archive):
        if not download_missing:
            raise DataError(f"{title} not found in {os.path.abspath(folder)}. " + _where_to_put(spec, root))
        os.makedirs(root, exist_ok=True)
        print(f"{title} not found in {folder}; downloading {spec['url']}")
        try:
            download(spec["url"], archive, spec["md5"])
        except DataError as e:
            raise DataError(f"{title} not found in {os.path.abspath(folder)}, and {e}. "
                            + _where_to_put(spec, root)) from None
    elif md5sum(archive) != spec["md5"]:
        raise DataError(f"{archive} is not the official {spec['archive']} (its md5 is not {spec['md5']}): "
                        f"delete it and run again to download it, or replace it with the official file.")
    try:
        _extract(archive, root)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"could not unpack {archive} ({e}); delete it and run again.") from None
    missing = [f for f in needed if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(f"{archive} unpacked, but {folder} lacks {', '.join(missing)}: "
                        f"it is not the official {spec['archive']}.")
    return folder


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays, lists, dicts and strings, and nothing else.

    CIFAR's official files are Python pickles, and a plain pickle.load of a
    doctored file can run any code. Only the few names numpy arrays need may
    be looked up here; anything else (os.system, ...) is refused.
    """
    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how Python 3 pickles (protocol 2) store bytes
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _read_cifar_file(path, label_key, num_classes):
    try:
        with open(path, "rb") as f:
            # The official files were written by Python 2: encoding='bytes' keeps
            # their str keys as bytes instead of guessing a text encoding.
            d = _ArraysOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, MemoryError) as e:
        raise DataError(f"{path} is corrupt or not a CIFAR python-format file ({type(e).__name__}: {e}). "
                        f"Delete its folder and run again to download it afresh, or put the official "
                        f"file there.") from None
    if not isinstance(d, dict):
        raise DataError(f"{path} is not a CIFAR python-format file (it holds a {type(d).__name__}, not a dict)")
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
    parts = [_read_cifar_file(os.path.join(folder, f), spec["label_key"], DATASETS[name].num_classes)
             for f in files]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ----------------------------------------------------------------------------
# ImageNet: folders of JPEG files
# ----------------------------------------------------------------------------

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


def _visible(name):
    # Hidden entries are tools' litter, not data: Jupyter's .ipynb_checkpoints/, macOS's
    # .DS_Store and ._name resource files, thumbnail caches. Counted as a class, a hidden
    # folder would shift every label by one without any error.
    return not name.startswith(".")


def find_images(split_dir):
    """(class names, [(path, class index)]) for a folder of class sub-folders, sorted for reproducibility.

    Hidden folders and files (names starting with '.') are ignored; a class
    folder without images is a DataError naming it, never a silent extra class.
    """
    split_dir = os.fspath(split_dir)
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and _visible(e.name))
    if not classes:
        raise DataError(f"{split_dir} holds no class sub-folders: put each class's images in a folder of "
                        f"its own (e.g. {os.path.join(split_dir, 'n01440764', '*.JPEG')})")
    samples = []
    # listing ImageNet's 1.3 million files takes a while on a network disk: show it
    for idx, cls in enumerate(tqdm(classes, desc=f"listing {split_dir}", leave=False,
                                   disable=len(classes) < 50)):
        found, folders = 0, []
        for dirpath, dirnames, files in os.walk(os.path.join(split_dir, cls)):
            dirnames[:] = [d for d in dirnames if _visible(d)]  # pruned here, os.walk does not enter them
            folders.append((dirpath, files))
        for dirpath, files in sorted(folders):
            for f in sorted(files):
                if _visible(f) and f.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), idx))
                    found += 1
        if not found:
            raise DataError(f"class folder {os.path.join(split_dir, cls)} holds no images (*.jpg, *.jpeg, "
                            f"*.png): put its images there or remove the folder (every folder is a class)")
    return classes, samples


def _some(names, limit=10):
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_same_classes(train_classes, val_classes, root):
    """DataError naming the differing folders unless train/ and val/ hold the same class folders.

    The label of an image is the index of its folder in sorted order, so one
    folder more or less on either side would shift the labels of the rest.
    """
    if list(train_classes) == list(val_classes):
        return
    only_train = set(train_classes) - set(val_classes)
    only_val = set(val_classes) - set(train_classes)
    parts = [f"only in {side}: {_some(names)}" for side, names in (("train", only_train), ("val", only_val)) if names]
    raise DataError(f"{os.path.join(root, 'train')} and {os.path.join(root, 'val')} hold different class "
                    f"folders ({len(train_classes)} and {len(val_classes)}; {'; '.join(parts)}): the "
                    f"validation images must be sorted into the same class folders as the training images")


_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_image(path):
    """A file as an RGB PIL image, or a DataError naming the file."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # also forces the lazy decoder to read the whole file
    except _IMAGE_ERRORS as e:
        raise DataError(f"cannot read image {path} ({e}); the file is corrupt: replace or delete it") from None


def _verify_one(path):
    try:
        with Image.open(path) as img:  # reads and checks the header: format, size, mode
            img.verify()  # PNG: every chunk's checksum; JPEG: the markers read so far
        return None
    except _IMAGE_ERRORS as e:
        return f"{type(e).__name__}: {e}"


def verify_images(samples, desc="checking images", workers=8):
    """Check that every file of [(path, label)] opens as an image, cheaply, before training starts.

    Pillow's Image.open plus verify() reads each file's header (and a PNG's
    checksums) without decoding the pixels, so a broken validation image is
    found now rather than when the first evaluation reaches it, an epoch
    later. Not a full decode: a JPEG cut short after its header still passes
    here and is reported by load_image when read. Files are opened by
    `workers` threads (the time goes in waiting for the disk); the DataError
    names the first bad file in the order of `samples`.
    """
    paths = [path for path, _ in samples]
    chunk = 1024  # submitted a chunk at a time: a million pending futures would hold much memory
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(paths), desc=desc, leave=False, disable=len(paths) < chunk) as bar:
        for start in range(0, len(paths), chunk):
            part = paths[start:start + chunk]
            for path, error in zip(part, pool.map(_verify_one, part)):
                if error is not None:
                    raise DataError(f"cannot read image {path} ({error}); the file is corrupt or not an "
                                    f"image: replace or delete it")
            bar.update(len(part))


# ----------------------------------------------------------------------------
# Per-image augmentations (uint8 tensors (3, H, W) and PIL images)
# ----------------------------------------------------------------------------

def _uniform(lo, hi):
    return lo + (hi - lo) * torch.rand(()).item()


def _coin(p):
    return p > 0 and torch.rand(()).item() < p


def to_pil(img):
    return Image.fromarray(img.permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)


def from_pil(pil):
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


# RandAugment (Cubuk et al. 2020) as timm implements it: each of n layers picks
# one operation uniformly at random and applies it with probability 0.5 at a
# magnitude drawn around m (on a 0..10 scale). "inc1" selects timm's
# "increasing" variants, whose effect grows with the magnitude for every
# operation (e.g. posterize keeps fewer bits, solarize a lower threshold).

def _signed(v):
    return -v if _coin(0.5) else v


def _affine(pil, matrix, fill):
    # PIL maps each output pixel (x, y) to input (a x + b y + c, d x + e y + f).
    return pil.transform(pil.size, Image.AFFINE, matrix, resample=Image.BICUBIC, fillcolor=fill)


def _solarize_add(pil, add, threshold=128):
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return pil.point(lut * 3)  # one table per channel


def _enhance_factor(level):
    # 1.0 leaves the image unchanged; level 10 moves up to 0.9 away from it, in either direction
    return max(0.1, 1.0 + _signed(level / 10 * 0.9))


def _posterize(pil, bits):
    # Keep the `bits` highest bits of each channel. Written out as a lookup table because
    # Pillow 13's ImageOps.posterize refuses 0 bits, which PosterizeIncreasing asks for at
    # level 10; older Pillow (and so timm's runs) gave a black image then, as this does.
    mask = ~(2 ** (8 - bits) - 1) & 0xFF
    return pil.point([i & mask for i in range(256)] * len(pil.getbands()))


# The operations are module-level functions, not lambdas, so that a transform holding
# them can be pickled: DataLoader workers started with 'spawn' (macOS, Windows) or
# 'forkserver' (Linux from Python 3.14) receive the dataset as a pickle.

def _auto_contrast(pil, level, fill):
    return ImageOps.autocontrast(pil)


def _equalize(pil, level, fill):
    return ImageOps.equalize(pil)


def _invert(pil, level, fill):
    return ImageOps.invert(pil)


def _rotate(pil, level, fill):
    return pil.rotate(_signed(level / 10 * 30), resample=Image.BICUBIC, fillcolor=fill)  # up to 30 degrees


def _posterize_increasing(pil, level, fill):
    return _posterize(pil, 4 - int(level / 10 * 4))  # 4 bits at level 0 .. 0 bits at level 10


def _solarize_increasing(pil, level, fill):
    return ImageOps.solarize(pil, 256 - int(level / 10 * 256))  # invert pixels above the threshold


def _solarize_add_level(pil, level, fill):
    return _solarize_add(pil, int(level / 10 * 110))


def _color(pil, level, fill):
    return ImageEnhance.Color(pil).enhance(_enhance_factor(level))


def _contrast(pil, level, fill):
    return ImageEnhance.Contrast(pil).enhance(_enhance_factor(level))


def _brightness(pil, level, fill):
    return ImageEnhance.Brightness(pil).enhance(_enhance_factor(level))


def _sharpness(pil, level, fill):
    return ImageEnhance.Sharpness(pil).enhance(_enhance_factor(level))


def _shear_x(pil, level, fill):
    return _affine(pil, (1, _signed(level / 10 * 0.3), 0, 0, 1, 0), fill)


def _shear_y(pil, level, fill):
    return _affine(pil, (1, 0, 0, _signed(level / 10 * 0.3), 1, 0), fill)


def _translate_x_rel(pil, level, fill):
    return _affine(pil, (1, 0, _signed(level / 10 * 0.45) * pil.size[0], 0, 1, 0), fill)  # up to 45 % of the width


def _translate_y_rel(pil, level, fill):
    return _affine(pil, (1, 0, 0, 0, 1, _signed(level / 10 * 0.45) * pil.size[1]), fill)


RANDAUGMENT_OPS = {
    # timm's name: function(pil, level 0..10, fill colour) -> pil
    "AutoContrast": _auto_contrast,
    "Equalize": _equalize,
    "Invert": _invert,
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize_increasing,
    "SolarizeIncreasing": _solarize_increasing,
    "SolarizeAdd": _solarize_add_level,
    "ColorIncreasing": _color,
    "ContrastIncreasing": _contrast,
    "BrightnessIncreasing": _brightness,
    "SharpnessIncreasing": _sharpness,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x_rel,
    "TranslateYRel": _translate_y_rel,
}


class RandAugment:
    """RandAugment from a timm policy string such as 'rand-m9-n1-mstd0.4-inc1'.

    m: magnitude (0..10); n: operations per image (timm's default 2);
    mstd: the magnitude is drawn from a normal(m, mstd) per operation, clipped
    to 0..10; inc1: the "increasing" operation set (the only one written here).
    Operations that move pixels fill the uncovered area with the dataset's
    mean colour, as timm does.
    """

    def __init__(self, policy, mean=(0.5, 0.5, 0.5)):
        self.policy = policy
        parts = policy.split("-")
        if parts[0] != "rand":
            raise DataError(f"augmentation policy {policy!r} is not a RandAugment string like "
                            f"'rand-m9-n1-mstd0.4-inc1' (use 'none' to switch it off)")
        self.magnitude, self.num_ops, self.magnitude_std, increasing = 10.0, 2, 0.0, False
        try:
            for part in parts[1:]:
                if part.startswith("mstd"):
                    self.magnitude_std = float(part[4:])
                elif part.startswith("inc"):
                    increasing = bool(int(part[3:]))
                elif part.startswith("m"):
                    self.magnitude = float(part[1:])
                elif part.startswith("n"):
                    self.num_ops = int(part[1:])
                else:
                    raise ValueError(part)
        except ValueError:
            raise DataError(f"cannot read RandAugment policy {policy!r}: expected parts m<magnitude>, "
                            f"n<number of ops>, mstd<std>, inc1, e.g. 'rand-m9-n1-mstd0.4-inc1'") from None
        if not increasing:
            raise DataError(f"RandAugment policy {policy!r}: only the 'inc1' operation set (the one the "
                            f"official QKFormer runs used) is implemented; add '-inc1'")
        self.ops = list(RANDAUGMENT_OPS.items())
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
    def __init__(self, size=224, crop_pct=0.875):
        self.size, self.crop_pct = size, crop_pct

    def __call__(self, pil):
        return from_pil(resize_center_crop(pil, self.size, self.crop_pct))


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
        return self.transform(load_image(path)), label


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
    split_dir = os.path.join(imagenet_root(data_dir, ("val",)), "val")
    return tuple(sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and _visible(e.name)))


def _read_imagenet(spec, data_dir, train, img_size, subset, augment, download_missing):
    split = "train" if train else "val"
    root = imagenet_root(data_dir, (split,))
    classes, samples = find_images(os.path.join(root, split))
    if train and os.path.isdir(os.path.join(root, "val")):
        check_same_classes(classes, spec.class_names_from(root), root)
    # the first N files in sorted order would all belong to a few classes: take
    # an evenly spaced selection instead
    samples = evenly_spaced(samples, subset)
    size = img_size or spec.image_size
    if train:
        transform = ImageNetTrainTransform(size, augment.hflip, augment.randaugment_for(spec))
    else:
        transform = ImageNetEvalTransform(size)
    return ImageFiles(samples, classes, transform)


# The official training recipes, as train.py's settings. CIFAR: timm's train.py
# with the official cifar10.yml / cifar100.yml; ImageNet: the official MAE-style
# fine-tuning script. Where a setting departs from them, the comment says so.
CIFAR_RECIPE = dict(
    model="cifar10", T=4, img_size=32,
    epochs=400,                  # length of the cosine schedule ...
    cooldown_epochs=10,          # ... then 10 epochs at min_lr, as timm adds them: 410 epochs in all
                                 # (--epochs N drops them and scales the warm-up: see train.resolve_args)
    batch_size=64, lr=1e-3, blr=None, min_lr=1e-5, weight_decay=0.06,
    warmup_epochs=20, warmup_lr=1e-5,
    warmup_prefix=False,         # timm: the cosine runs over epochs 0..400, not 20..400 (see train.lr_at)
    accum_iter=1, clip_grad=None,
    smoothing=0.1,
    mixup=0.5, cutmix=0.0, mixup_off_epoch=200,
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
    batch_size=64,           # per GPU
    lr=None, blr=6e-4,       # lr = blr * effective batch / 256
    min_lr=1e-6, weight_decay=0.05,
    warmup_epochs=5, warmup_lr=0.0,
    warmup_prefix=True,      # MAE: the cosine starts where the warm-up ends
    accum_iter=3,            # the official runs: 8 GPUs x 64 x 3 = effective batch 1536
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


# ----------------------------------------------------------------------------
# Per-batch steps on the device: normalisation, random erasing, mixup/cutmix
# ----------------------------------------------------------------------------

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
# Event cameras: CIFAR10-DVS and DVS128 Gesture
# ----------------------------------------------------------------------------
#
# An event camera (dynamic vision sensor, DVS) reports, per pixel, when the
# brightness changes: a stream of events (t, x, y, p) with a timestamp in
# microseconds, the pixel, and the polarity (1 brighter, 0 darker). The paper
# evaluates QKFormer on two such datasets (Table 3), recorded with 128x128
# sensors. The official code reads them with SpikingJelly and integrates each
# recording into T frames of event counts; this section does the same with
# numpy, so that the official recipe's frames come out:
#
#   files (AEDAT 2.0 / 3.1) -> events (dict of arrays t, x, y, p)
#     -> events_to_frames: (T, 2, H, W) counts, split by event number
#     -> a cache of compressed .npz files per (dataset, T), built once
#     -> EventFrames: a Dataset of (float frames (T, 2, H, W), label)
#     -> EventAugment: the official training augmentation, per sample (flip + one op).
#
# Folder layout under the data folder (--data-dir):
#   CIFAR10-DVS/airplane.zip ... truck.zip            downloaded (md5-checked)
#   CIFAR10-DVS/aedat/<class>/cifar10_<class>_<i>.aedat   unpacked
#   CIFAR10-DVS/frames_T16/...                         the frame cache for T=16
#   DVS128Gesture/DvsGesture.tar.gz                    put there by hand
#   DVS128Gesture/DvsGesture/user01_fluorescent.aedat, ..._labels.csv,
#                            trials_to_train.txt, trials_to_test.txt
#   DVS128Gesture/frames_T16/...

import json  # noqa: E402 (this section's own imports, kept with it)
import shutil  # noqa: E402
import struct  # noqa: E402
import zipfile  # noqa: E402

CIFAR10DVS_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                      "dog", "frog", "horse", "ship", "truck")

# DVS128 Gesture's 11 classes in label order (class 1..11 of its labels files, named as in
# the dataset's gesture_mapping.csv).
DVS128GESTURE_CLASSES = ("hand_clapping", "right_hand_wave", "left_hand_wave", "right_arm_clockwise",
                         "right_arm_counter_clockwise", "left_arm_clockwise", "left_arm_counter_clockwise",
                         "arm_roll", "air_drums", "air_guitar", "other_gestures")

DVS = {
    "cifar10dvs": dict(
        title="CIFAR10-DVS",
        folder="CIFAR10-DVS",
        num_classes=10,
        size=(128, 128),  # (H, W) of the sensor
        # One zip per class on figshare ("CIFAR10-DVS_New", article 4724671); the
        # URLs and md5 sums are those SpikingJelly's cifar10_dvs.py downloads.
        archives={
            "airplane": ("https://ndownloader.figshare.com/files/7712788", "0afd5c4bf9ae06af762a77b180354fdd"),
            "automobile": ("https://ndownloader.figshare.com/files/7712791", "8438dfeba3bc970c94962d995b1b9bdd"),
            "bird": ("https://ndownloader.figshare.com/files/7712794", "a9c207c91c55b9dc2002dc21c684d785"),
            "cat": ("https://ndownloader.figshare.com/files/7712812", "52c63c677c2b15fa5146a8daf4d56687"),
            "deer": ("https://ndownloader.figshare.com/files/7712815", "b6bf21f6c04d21ba4e23fc3e36c8a4a3"),
            "dog": ("https://ndownloader.figshare.com/files/7712818", "f379ebdf6703d16e0a690782e62639c3"),
            "frog": ("https://ndownloader.figshare.com/files/7712842", "cad6ed91214b1c7388a5f6ee56d08803"),
            "horse": ("https://ndownloader.figshare.com/files/7712851", "e7cbbf77bec584ffbf913f00e682782a"),
            "ship": ("https://ndownloader.figshare.com/files/7712836", "41c7bd7d6b251be82557c6cce9a7d5c9"),
            "truck": ("https://ndownloader.figshare.com/files/7712839", "89f3922fd147d9aeff89e76a2b0b70a7"),
        },
    ),
    "dvs128gesture": dict(
        title="DVS128 Gesture",
        folder="DVS128Gesture",
        num_classes=11,
        size=(128, 128),
        # IBM distributes the archive through a Box folder that needs a click in a
        # browser; the md5 is the one SpikingJelly checks.
        archive="DvsGesture.tar.gz",
        url="https://ibm.ent.box.com/s/3hiq58ww1pbbjrinh367ykfdf60xsfm8/folder/50167556794",
        md5="8a5c71fb11e24e5ca5b11866ca6c00a1",
    ),
}
DVS_SPLITS = ("official", "random")
# CIFAR10-DVS has no split of its own: the official QKFormer code takes, per
# class, the first 90 % of the recordings (rounded up) for training.
CIFAR10DVS_TRAIN_RATIO = 0.9
_FRAMES_VERSION = 1  # bump when the cache's content changes meaning


def _events(t, x, y, p):
    """The event dict every reader returns: t int64 (us), x, y int16, p uint8 (0 or 1)."""
    return dict(t=t.astype(np.int64), x=x.astype(np.int16), y=y.astype(np.int16), p=p.astype(np.uint8))


def _read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def read_cifar10dvs(path):
    """Events of one CIFAR10-DVS recording (AEDAT 2.0): dict of numpy arrays t, x, y, p.

    The file: ASCII header lines starting with '#', then big-endian uint32
    pairs (address, timestamp in us). Address bit 0 is the polarity, bits 1-7
    x, bits 8-14 y. SpikingJelly, which the official code reads the files with,
    turns the picture upright: x' = 127 - y, y' = 127 - x, p' = 1 - p; we do the
    same, so that the frames (and accuracies) are the official ones.
    """
    raw = _read_bytes(path)
    start = 0
    while raw.startswith(b"#", start):  # header lines
        end = raw.find(b"\n", start)
        if end < 0:
            raise DataError(f"{path} holds only a header (no line ends after it): no events")
        start = end + 1
    body = len(raw) - start
    if body == 0:
        raise DataError(f"{path} holds no events (only a header): the recording is empty or cut off")
    if body % 8:
        raise DataError(f"{path} is truncated: its {body} bytes of events are not whole "
                        f"(address, timestamp) pairs of 8 bytes; download or unpack it again")
    words = np.frombuffer(raw, dtype=">u4", offset=start).reshape(-1, 2)  # (N, 2): address, timestamp
    addr = words[:, 0]
    x = (addr >> 1) & 0x7F
    y = (addr >> 8) & 0x7F
    p = addr & 1
    return _events(words[:, 1], 127 - y, 127 - x, 1 - p)


def read_aedat31(path):
    """Polarity events of an AEDAT 3.1 file (DVS128 Gesture): dict of numpy arrays t, x, y, p.

    After the ASCII header (ending with the line '#!END-HEADER\\r\\n') come
    packets: a 28-byte little-endian header (type u16 at 0, source u16, event
    size u32 at 4, offset u32, tsOverflow u32 at 12, capacity u32 at 16,
    number u32, valid u32) followed by capacity * size bytes. Only type 1
    (polarity) packets hold events: a u32 data word (x = d >> 17, y = d >> 2,
    each 15 bits; p = bit 1) and a u32 timestamp, plus tsOverflow << 31. Other
    packet types (e.g. special events) are skipped. One Python step per packet,
    numpy within a packet.
    """
    raw = _read_bytes(path)
    marker = b"#!END-HEADER\r\n"
    end = raw.find(marker)
    if not raw.startswith(b"#") or end < 0:
        raise DataError(f"{path} is not an AEDAT 3.1 file: no header ending with '#!END-HEADER'")
    pos = end + len(marker)
    data_words, stamps = [], []
    while pos < len(raw):
        if len(raw) - pos < 28:
            raise DataError(f"{path} is truncated: a packet header at byte {pos} is cut short")
        etype, _source, size, _offset, overflow, capacity = struct.unpack_from("<HHIIII", raw, pos)
        pos += 28
        length = capacity * size
        if len(raw) - pos < length:
            raise DataError(f"{path} is truncated: a packet at byte {pos - 28} announces {length} bytes, "
                            f"{len(raw) - pos} are left")
        if etype == 1 and capacity:
            if size < 8 or size % 4:
                raise DataError(f"{path}: a polarity packet at byte {pos - 28} has events of {size} bytes "
                                f"(expected 8): not an AEDAT 3.1 file")
            ev = np.frombuffer(raw, dtype="<u4", count=length // 4, offset=pos).reshape(capacity, size // 4)
            data_words.append(ev[:, 0])
            stamps.append(ev[:, 1].astype(np.int64) + (overflow << 31))
        pos += length
    if not data_words:
        raise DataError(f"{path} holds no polarity events")
    d = np.concatenate(data_words)
    return _events(np.concatenate(stamps), (d >> 17) & 0x7FFF, (d >> 2) & 0x7FFF, (d >> 1) & 1)


def read_labels_csv(path):
    """Rows (label, start_us, end_us) of a DVS128 Gesture labels file, label = class - 1 (0..10)."""
    if not os.path.isfile(path):
        raise DataError(f"the labels file {path} is missing: each recording X.aedat needs its X_labels.csv "
                        f"beside it (unpack DvsGesture.tar.gz again)")
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines[1:], start=2):  # line 1: class,startTime_usec,endTime_usec
        if not line.strip():
            continue
        try:
            cls, start, end = (int(v) for v in line.split(","))
        except ValueError:
            raise DataError(f"{path}, line {n}: expected 'class,startTime_usec,endTime_usec', got {line!r}") from None
        if not 1 <= cls <= DVS["dvs128gesture"]["num_classes"]:
            raise DataError(f"{path}, line {n}: class {cls} is not one of 1..11")
        rows.append((cls - 1, start, end))
    if not rows:
        raise DataError(f"the labels file {path} lists no gestures")
    return rows


def read_dvs128gesture(aedat_path, labels_csv_path):
    """The labelled samples of one DVS128 Gesture recording: [(label, events), ...].

    In the order of the labels file; a sample holds the events with
    start <= t < end (as SpikingJelly cuts them; two of the dataset's labels
    files have overlapping rows, and then an event belongs to both).
    """
    rows = read_labels_csv(labels_csv_path)
    events = read_aedat31(aedat_path)
    t = events["t"]
    samples = []
    for label, start, end in rows:
        keep = (t >= start) & (t < end)
        samples.append((label, {k: v[keep] for k, v in events.items()}))
    return samples


def events_to_frames(events, T, H, W):
    """Integrate events into T frames of event counts: int32 (T, 2, H, W), channel = polarity.

    Split by number, as the official training does (SpikingJelly's
    frames_number=T, split_by='number'): with N events, frame j takes events
    [j * (N // T), (j + 1) * (N // T)) and the last frame also the remainder.
    """
    if int(T) != T or T < 1:
        raise DataError(f"the number of frames T must be a positive integer, not {T!r}")
    x, y, p = (np.asarray(events[k]).astype(np.int64) for k in ("x", "y", "p"))
    n = len(x)
    if n and (x.min() < 0 or x.max() >= W or y.min() < 0 or y.max() >= H):
        raise DataError(f"events lie outside the {W}x{H} sensor (x in {x.min()}..{x.max()}, "
                        f"y in {y.min()}..{y.max()})")
    if n and not np.isin(p, (0, 1)).all():
        raise DataError("event polarities must be 0 or 1")
    step = n // T
    # frame of each event; with fewer events than frames, all go to the last one
    frame = np.minimum(np.arange(n) // step, T - 1) if step else np.full(n, T - 1)
    flat = ((frame * 2 + p) * H + y) * W + x  # index into (T, 2, H, W)
    return np.bincount(flat, minlength=T * 2 * H * W).astype(np.int32).reshape(T, 2, H, W)


# ---- downloads and unpacking

def _cifar10dvs_where_to_put(root):
    spec = DVS["cifar10dvs"]
    folder = os.path.join(os.path.abspath(root), spec["folder"])
    files = "; ".join(f"{c}.zip from {u} (md5 {m})" for c, (u, m) in spec["archives"].items())
    return (f"On a machine with internet access download the 10 archives {files}, and copy them into "
            f"{folder}/ (checked and unpacked on the next run), or unpack them so that "
            f"{os.path.join(folder, 'aedat', 'airplane', 'cifar10_airplane_0.aedat')} exists. "
            f"Use --data-dir to point at another folder.")


def _unzip_class(archive, dest, cls):
    """Unpack one CIFAR10-DVS class zip into dest/<cls>/, atomically (a temporary folder, then a rename)."""
    tmp = os.path.join(dest, f".{cls}.part")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)  # zipfile drops absolute paths and '..' from member names
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"could not unpack {archive} ({e}); delete it and run again") from None
    # the zip may hold <cls>/file.aedat or the files at its top level
    src = os.path.join(tmp, cls) if os.path.isdir(os.path.join(tmp, cls)) else tmp
    if not any(f.endswith(".aedat") for f in os.listdir(src)):
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{archive} holds no .aedat files for class {cls}: it is not the official {cls}.zip")
    os.replace(src, os.path.join(dest, cls))
    shutil.rmtree(tmp, ignore_errors=True)


def ensure_cifar10dvs(root, download_missing=True):
    """The folder holding CIFAR10-DVS's class folders of .aedat files, downloading and unpacking if needed.

    Per class: the unpacked folder; else <class>.zip in root/CIFAR10-DVS/
    (copied there by hand, md5-checked); else a download from figshare.
    """
    spec = DVS["cifar10dvs"]
    base = os.path.join(root, spec["folder"])
    aedat = os.path.join(base, "aedat")
    for cls, (url, md5) in spec["archives"].items():
        if os.path.isdir(os.path.join(aedat, cls)):
            continue
        archive = os.path.join(base, f"{cls}.zip")
        if not os.path.isfile(archive):
            if not download_missing:
                raise DataError(f"{spec['title']} class {cls} not found in {os.path.abspath(aedat)}. "
                                + _cifar10dvs_where_to_put(root))
            os.makedirs(base, exist_ok=True)
            print(f"{spec['title']}: {cls} not found in {aedat}; downloading {url}")
            try:
                download(url, archive, md5)
            except DataError as e:
                raise DataError(f"{spec['title']} class {cls} not found in {os.path.abspath(aedat)}, and {e}. "
                                + _cifar10dvs_where_to_put(root)) from None
        elif md5sum(archive) != md5:
            raise DataError(f"{archive} is not the official {cls}.zip (its md5 is not {md5}): delete it and "
                            f"run again to download it, or replace it with the official file.")
        os.makedirs(aedat, exist_ok=True)
        _unzip_class(archive, aedat, cls)
    return aedat


def cifar10dvs_recordings(aedat_dir):
    """[(path, label)] of every recording, by class, each class in sorted file-name order.

    The order is the official one (SpikingJelly lists a class's files sorted
    as strings: ..._0, _1, _10, _100, _101, ...), which the 90/10 split follows.
    """
    if not os.path.isdir(aedat_dir):
        raise DataError(f"{aedat_dir} does not exist")
    unknown = [d for d in sorted(os.listdir(aedat_dir))
               if os.path.isdir(os.path.join(aedat_dir, d)) and not d.startswith(".")
               and d not in CIFAR10DVS_CLASSES]
    if unknown:
        raise DataError(f"{os.path.join(aedat_dir, unknown[0])} is not a CIFAR10-DVS class folder "
                        f"(the classes are {', '.join(CIFAR10DVS_CLASSES)}); move it out of {aedat_dir}")
    recordings = []
    for label, cls in enumerate(CIFAR10DVS_CLASSES):
        folder = os.path.join(aedat_dir, cls)
        names = sorted(f for f in os.listdir(folder) if f.endswith(".aedat")) if os.path.isdir(folder) else []
        if not names:
            raise DataError(f"{folder} holds no .aedat recordings; unpack {cls}.zip there")
        recordings += [(os.path.join(folder, f), label) for f in names]
    return recordings


def ensure_dvs128gesture(root):
    """The unpacked DvsGesture folder (recordings, labels files, trials_to_*.txt), unpacking the archive if needed.

    The archive cannot be downloaded without a click in a browser: a missing
    one is a DataError that says where to get it and where to put it.
    """
    spec = DVS["dvs128gesture"]
    base = os.path.join(root, spec["folder"])
    folder = os.path.join(base, "DvsGesture")
    if all(os.path.isfile(os.path.join(folder, f)) for f in ("trials_to_train.txt", "trials_to_test.txt")):
        return folder
    archive = os.path.join(base, spec["archive"])
    if not os.path.isfile(archive):
        raise DataError(f"{spec['title']} not found in {os.path.abspath(folder)}. Its archive cannot be "
                        f"downloaded by a script: open {spec['url']} in a browser, download "
                        f"{spec['archive']} (md5 {spec['md5']}) and copy it to {os.path.abspath(archive)} "
                        f"(it is checked and unpacked on the next run), or unpack it so that "
                        f"{os.path.join(os.path.abspath(folder), 'trials_to_train.txt')} exists.")
    if md5sum(archive) != spec["md5"]:
        raise DataError(f"{archive} is not the official {spec['archive']} (its md5 is not {spec['md5']}); "
                        f"replace it with the official file.")
    tmp = os.path.join(base, ".DvsGesture.part")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _extract(archive, tmp)
    except (tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"could not unpack {archive} ({e}); download it again") from None
    if not os.path.isfile(os.path.join(tmp, "DvsGesture", "trials_to_train.txt")):
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{archive} holds no DvsGesture/trials_to_train.txt: it is not the official "
                        f"{spec['archive']}")
    shutil.rmtree(folder, ignore_errors=True)  # a partial folder from an earlier, hand-made attempt
    os.replace(os.path.join(tmp, "DvsGesture"), folder)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder


def dvs128gesture_trials(folder, split):
    """The recordings (file names, in the file's order) that trials_to_<split>.txt lists ('train' or 'test')."""
    path = os.path.join(folder, f"trials_to_{split}.txt")
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing: unpack DvsGesture.tar.gz again")
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise DataError(f"{path} lists no recordings")
    return names


# ---- the frame cache

def _save_npz_atomic(path, **arrays):
    """np.savez_compressed to path via a temporary name, so no half-written file ever bears the name.
    The name is the process's own: with several processes (DDP) building the cache at once, each
    writes its own file and the renames replace whole files."""
    part = f"{path}.{os.getpid()}.part"
    with open(part, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(part, path)


def _compact(frames):
    """Counts in the smallest unsigned type that holds them (most fit in uint8): a smaller cache."""
    top = int(frames.max()) if frames.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return frames.astype(dtype)
    return frames


def _dvs_sources(name, data_dir, download_missing):
    """What the cache is built from: [(group, recording path, labels path or label)], in the official order.

    group is the class name (CIFAR10-DVS) or 'train' / 'test' (DVS128 Gesture's own split).
    """
    if name == "cifar10dvs":
        aedat = ensure_cifar10dvs(data_dir, download_missing)
        return [(CIFAR10DVS_CLASSES[label], path, label) for path, label in cifar10dvs_recordings(aedat)]
    folder = ensure_dvs128gesture(data_dir)
    sources = []
    for split in ("train", "test"):
        for f in dvs128gesture_trials(folder, split):
            stem = os.path.splitext(f)[0]
            sources.append((split, os.path.join(folder, f), os.path.join(folder, stem + "_labels.csv")))
    return sources


def dvs_cache_dir(name, data_dir, T):
    """The folder of the frame cache for (dataset, T)."""
    return os.path.join(data_dir, _dvs_spec(name)["folder"], f"frames_T{T}")


def _dvs_spec(name):
    if name not in DVS:
        raise DataError(f"unknown event-camera dataset {name!r}; choose one of {', '.join(DVS)}")
    return DVS[name]


def build_dvs_cache(name, data_dir, T, download_missing=True):
    """Integrate every recording into T frames once; return the cache's index (a dict, see below).

    The cache: frames_T<T>/<group>/<sample>.npz (key 'frames', (T, 2, H, W)
    counts) and index.json, written last, listing every sample (file, label,
    group) in the official order. index.json exists only for a complete cache:
    every file is written under a temporary name and renamed when complete, so
    an interrupted build leaves nothing that is later read as valid; a rerun
    keeps the sample files already complete and writes the rest. A new T
    builds a new cache next to the old one.
    """
    spec = _dvs_spec(name)
    if int(T) != T or T < 1:
        raise DataError(f"the number of frames T must be a positive integer, not {T!r}")
    cache = dvs_cache_dir(name, data_dir, T)
    index_path = os.path.join(cache, "index.json")
    H, W = spec["size"]
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            if (index.get("version"), index.get("dataset"), index.get("T")) == (_FRAMES_VERSION, name, T):
                return index
        except (OSError, ValueError):
            pass
        print(f"{index_path} is from another version or damaged: rebuilding the cache")
    sources = _dvs_sources(name, data_dir, download_missing)
    samples = []
    for group, path, extra in tqdm(sources, desc=f"{spec['title']} -> frames (T={T}, once)", unit="file"):
        os.makedirs(os.path.join(cache, group), exist_ok=True)
        stem = os.path.splitext(os.path.basename(path))[0]
        if name == "cifar10dvs":
            names, labels = [stem], [extra]
        else:  # one sample per row of the labels file, named after the row
            labels = [label for label, _, _ in read_labels_csv(extra)]
            names = [f"{stem}_{k}" for k in range(len(labels))]
        files = [os.path.join(group, f"{s}.npz") for s in names]
        if not all(os.path.isfile(os.path.join(cache, f)) for f in files):
            if name == "cifar10dvs":
                recorded = [(extra, read_cifar10dvs(path))]
            else:
                recorded = read_dvs128gesture(path, extra)
            for f, (_, events) in zip(files, recorded):
                _save_npz_atomic(os.path.join(cache, f), frames=_compact(events_to_frames(events, T, H, W)))
        samples += [dict(file=f, label=int(label), group=group) for f, label in zip(files, labels)]
    index = dict(version=_FRAMES_VERSION, dataset=name, T=T, size=[H, W], samples=samples)
    part = f"{index_path}.{os.getpid()}.part"  # the process's own (see _save_npz_atomic)
    with open(part, "w", encoding="utf-8") as f:
        json.dump(index, f)
    os.replace(part, index_path)
    return index


def cifar10dvs_split(labels, split="official", seed=0, train_ratio=CIFAR10DVS_TRAIN_RATIO):
    """(train indices, test indices) into a list of labels given in the official order.

    'official': per class, the first ceil(90 %) of its recordings (in sorted
    file-name order: ..._0, _1, _10, _100, ...) for training, the rest for
    testing, as the official QKFormer code does. 'random': per class, a
    random selection of the same size, drawn with torch's generator from seed.
    """
    if split not in DVS_SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(DVS_SPLITS)}")
    by_class = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in sorted(by_class):
        idx = by_class[label]
        if split == "random":
            idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        cut = math.ceil(len(idx) * train_ratio)
        train += idx[:cut]
        test += idx[cut:]
    return train, test


class EventFrames(Dataset):
    """Samples of the frame cache: (float32 frames (T, 2, H, W) of event counts, label), optionally transformed."""

    def __init__(self, files, labels, transform=None):
        self.files, self.labels, self.transform = list(files), list(labels), transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        try:
            with np.load(path) as z:
                frames = z["frames"]
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise DataError(f"cannot read the cached frames {path} ({e}); delete "
                            f"{os.path.dirname(os.path.dirname(path))} to rebuild the cache") from None
        frames = torch.from_numpy(frames.astype(np.float32))  # (T, 2, H, W)
        if self.transform is not None:
            frames = self.transform(frames)
        return frames, self.labels[i]


def build_dvs_datasets(name, data_dir, T=16, split="official", seed=0, transform=None, download_missing=True):
    """(train set, test set) of an event-camera dataset as EventFrames, building the frame cache if needed.

    name: 'cifar10dvs' or 'dvs128gesture'. split (CIFAR10-DVS only):
    'official' (per class the first 90 % of the recordings in sorted
    file-name order for training) or 'random' (per class, seeded by seed).
    DVS128 Gesture always uses its own split (trials_to_train.txt /
    trials_to_test.txt: users 1-23 train, 24-29 test). transform applies to
    the training set's frames only.
    """
    index = build_dvs_cache(name, data_dir, T, download_missing)
    cache = dvs_cache_dir(name, data_dir, T)
    files = [os.path.join(cache, s["file"]) for s in index["samples"]]
    labels = [s["label"] for s in index["samples"]]
    if name == "cifar10dvs":
        train_idx, test_idx = cifar10dvs_split(labels, split, seed)
    else:
        if split != "official":
            raise DataError("DVS128 Gesture has its own train/test split (by subject); --split random "
                            "is for CIFAR10-DVS only")
        groups = [s["group"] for s in index["samples"]]
        train_idx = [i for i, g in enumerate(groups) if g == "train"]
        test_idx = [i for i, g in enumerate(groups) if g == "test"]
    pick = lambda idx: ([files[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
    return EventFrames(*pick(train_idx), transform=transform), EventFrames(*pick(test_idx))


class EventAugment:
    """The official DVS training augmentation of one sample's frames (T, 2, H, W), the same for every frame.

    From the official cifar10-dvs/ and dvs128-gesture/ train.py: a horizontal
    flip with probability 0.5, then SNNAugmentWide (their autoaugment.py, a
    TrivialAugment-Wide variant for event frames): one operation drawn
    uniformly from identity, shear x, translate x, translate y, rotate and
    cutout, its magnitude one of 31 evenly spaced values with a random sign:
    shear +-0.3 (radians of shear angle), translation +-5 px (truncated to
    whole pixels), rotation +-30 degrees, all with nearest-neighbour sampling
    and zeros outside; cutout zeroes one square covering 0.1-11 % of the
    frame (torchvision's RandomErasing(p=1, scale=(0.001, 0.11), ratio=(1, 1)),
    whose magnitude is ignored). Random numbers come from torch's generator.
    """

    OPS = ("identity", "shear_x", "translate_x", "translate_y", "rotate", "cutout")
    MAX_MAGNITUDE = dict(identity=0.0, shear_x=0.3, translate_x=5.0, translate_y=5.0, rotate=30.0, cutout=0.0)

    def __init__(self, flip=0.5, bins=31):
        self.flip, self.bins = flip, bins

    def __call__(self, frames):
        if _coin(self.flip):
            frames = frames.flip(-1)
        op = self.OPS[int(torch.randint(len(self.OPS), ()))]
        top = self.MAX_MAGNITUDE[op]
        magnitude = float(torch.linspace(-top, top, self.bins)[int(torch.randint(self.bins, ()))])
        if _coin(0.5):
            magnitude = -magnitude
        return self.apply(frames, op, magnitude)

    @staticmethod
    def apply(frames, op, magnitude):
        """One operation with a given magnitude (see the class docstring for the units)."""
        if op == "identity":
            return frames
        if op == "cutout":
            return _cutout(frames)
        if op == "shear_x":
            # inverse map: output pixel (x, y) reads input (x + tan(s) y, y), about the centre
            matrix = [[1.0, math.tan(magnitude), 0.0], [0.0, 1.0, 0.0]]
        elif op == "translate_x":
            matrix = [[1.0, 0.0, -float(int(magnitude))], [0.0, 1.0, 0.0]]
        elif op == "translate_y":
            matrix = [[1.0, 0.0, 0.0], [0.0, 1.0, -float(int(magnitude))]]
        elif op == "rotate":
            a = math.radians(magnitude)
            matrix = [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]
        else:
            raise DataError(f"unknown event augmentation {op!r}; choose one of {', '.join(EventAugment.OPS)}")
        return _warp_nearest(frames, matrix)


def _warp_nearest(frames, matrix):
    """frames (T, C, H, W) resampled through an inverse affine map given in pixels about the image centre.

    Built as torchvision's tensor affine() builds it (pixel centres at
    -(W-1)/2 .. (W-1)/2, grid_sample with align_corners=False), so that
    nearest-neighbour sampling picks the same pixels.
    """
    T, C, H, W = frames.shape
    m = torch.tensor(matrix, dtype=torch.float64)  # (2, 3)
    xs = torch.arange(W, dtype=torch.float64) - (W - 1) / 2
    ys = torch.arange(H, dtype=torch.float64) - (H - 1) / 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    points = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1)  # (H, W, 3)
    source = points @ m.T  # (H, W, 2): input position (x, y) in centred pixels
    grid = (source / torch.tensor([W / 2, H / 2], dtype=torch.float64)).to(frames.dtype)
    grid = grid.unsqueeze(0).expand(T, H, W, 2)  # (T, H, W, 2): the same map for every frame
    return F.grid_sample(frames, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _cutout(frames, scale=(0.001, 0.11)):
    """Zero one square of area scale * H * W (uniform) at a uniform position, in every frame and channel."""
    H, W = frames.shape[-2:]
    for _ in range(10):  # as torchvision's RandomErasing: a few tries to find a square that fits
        side = int(round(math.sqrt(H * W * _uniform(*scale))))
        if side < H and side < W:
            top = int(torch.randint(0, H - side + 1, ()))
            left = int(torch.randint(0, W - side + 1, ()))
            frames = frames.clone()
            frames[..., top:top + side, left:left + side] = 0
            return frames
    return frames


# ---- the datasets as DatasetSpecs: train.py's --dataset cifar10dvs / dvs128gesture

def event_batch_to_model(x):
    """The per-batch steps' output (B, T*2, H, W) -> the model's input (T, B, 2, H, W)."""
    x = x.unflatten(1, (-1, 2))   # (B, T, 2, H, W)
    return x.transpose(0, 1)      # (T, B, 2, H, W)


def _fetch_dvs(spec, data_dir, download_missing):
    """Make sure the recordings are there (CIFAR10-DVS: downloaded when missing). The frame
    cache, which depends on T, is built by the reader."""
    if spec.name == "cifar10dvs":
        ensure_cifar10dvs(data_dir, download_missing)
    else:
        ensure_dvs128gesture(data_dir)


def _read_dvs(spec, data_dir, train, img_size, subset, augment, download_missing, T=16, dvs_split="official"):
    """A split of an event-camera dataset as EventFrames (T frames of the cache for that T, built
    once), training samples through EventAugment; subset: an evenly spaced selection of N."""
    if img_size not in (None, spec.image_size):
        raise DataError(f"{spec.title} frames are {spec.image_size}x{spec.image_size} (the sensor); "
                        f"got --img-size {img_size}")
    if train and augment.randaugment not in (None, "", "none"):
        raise DataError(f"--aa {augment.randaugment}: RandAugment works on photographs; {spec.title} "
                        f"trains with the official event-frame augmentation (data.EventAugment)")
    if train and augment.crop_padding:
        raise DataError(f"--crop-padding is for CIFAR; {spec.title} shifts its frames in "
                        f"data.EventAugment (translate x/y)")
    transform = EventAugment(flip=augment.hflip) if train else None
    train_set, test_set = build_dvs_datasets(spec.name, data_dir, T, dvs_split, seed=0,
                                             transform=transform, download_missing=download_missing)
    chosen = train_set if train else test_set
    if not len(chosen):
        raise DataError(f"the {'training' if train else 'test'} split of {spec.title} in {data_dir} holds "
                        f"no recordings (too few per class for a 90/10 split?)")
    # both splits are sorted by class (Gesture: by recording): spread the selection out
    return EventFrames(evenly_spaced(chosen.files, subset), evenly_spaced(chosen.labels, subset),
                       chosen.transform)


# The official recipes, from the official cifar10-dvs/train.py and dvs128-gesture/train.py
# (timm's training loop, written out by the authors), as train.py's settings. Where we
# depart, the comment says so.
CIFAR10DVS_RECIPE = dict(
    model="cifar10dvs", T=16, img_size=128,
    dvs_split="official",        # per class the first 90 % of the recordings (see cifar10dvs_split)
    epochs=96,                   # length of the cosine ...
    cooldown_epochs=10,          # ... then 10 epochs at min_lr: 106 epochs run, as in timm
    batch_size=16,               # training drops the last partial batch, as the official loader
    lr=5e-3, blr=None, min_lr=1e-5,
    weight_decay=0.06,           # AdamW, eps 1e-8 (PyTorch's default); no decay on biases / norms
    warmup_epochs=10, warmup_lr=1e-5,
    warmup_prefix=False,         # timm's cosine over epochs 0..96 (see train.lr_at). timm steps the
                                 # rate once per epoch; train.py every update (ours)
    accum_iter=1, clip_grad=None,
    # (the official scripts pass drop_path_rate=0.1 to the model, whose blocks never apply it:
    # no stochastic depth, here neither)
    smoothing=0.1,               # timm: smoothed mixup targets + SoftTargetCrossEntropy (the same numbers)
    mixup=0.5, cutmix=0.0,       # timm's Mixup in 'batch' mode, after the per-sample augmentation
    mixup_prob=0.5,              # a batch is mixed with probability 0.5
    mixup_off_epoch=75,          # the official scripts switch mixup off from epoch 75 on
    # No RandAugment, random erasing or crop: the official augmentation of event frames is
    # data.EventAugment (horizontal flip, then one of identity / shear x / translate x, y /
    # rotate / cutout per sample, the same for all its frames), always on in training.
    reprob=0.0, remode="const", crop_padding=0, hflip=0.5,
    amp="auto",                  # AMP on GPUs (a CPU run says it is ignored). The official runs use fp16
                                 # with a grad scaler; "auto" picks bf16 where the GPU has it (ours):
                                 # --amp fp16 for theirs
    seed=2021,                   # the official scripts' seed
    eval_every=1,                # the paper's 84.0 % is the best test accuracy over the epochs
)
DVS128GESTURE_RECIPE = {
    **CIFAR10DVS_RECIPE,
    "model": "dvs128gesture",
    "dvs_split": "official",     # Gesture has its own split: subjects 1-23 train, 24-29 test
    "epochs": 192,               # + 10 cool-down: 202 epochs run
    "lr": 1e-3, "min_lr": 2e-5,
}

DATASETS.update({spec.name: spec for spec in (
    DatasetSpec(
        name="cifar10dvs", title="CIFAR10-DVS", num_classes=10, class_names=CIFAR10DVS_CLASSES,
        image_size=128, in_channels=2,
        mean=None, std=None,     # event counts go in as they are (the official code normalises nothing)
        recipe=CIFAR10DVS_RECIPE, fetch=_fetch_dvs, reader=_read_dvs,
        options=("T", "dvs_split"), to_model=event_batch_to_model, input_kind="event counts",
        data_hint="CIFAR10-DVS/ (its 10 class zips, downloaded when missing; split: --dvs-split)"),
    DatasetSpec(
        name="dvs128gesture", title="DVS128 Gesture", num_classes=11,
        class_names=DVS128GESTURE_CLASSES,
        image_size=128, in_channels=2, mean=None, std=None,
        recipe=DVS128GESTURE_RECIPE, fetch=_fetch_dvs, reader=_read_dvs,
        options=("T", "dvs_split"), to_model=event_batch_to_model, input_kind="event counts",
        data_hint="DVS128Gesture/DvsGesture.tar.gz (downloaded by hand from IBM)"),
)})
