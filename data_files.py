"""Files on disk for data.py: downloads, md5 checks, safe unpacking, safe unpickling, image folders.

A wing of data.py (QKFormer, Zhou et al., NeurIPS 2024, trains on CIFAR-10/100, ImageNet-1K
and two event-camera datasets; the paper says nothing about how the files are fetched). This
file holds what a first reading of the data pipeline may skip: getting the official files onto
the disk and refusing the ones that are broken or unsafe, with a message that says what to do.

* ``download``: url -> file, md5-checked before it gets its final name.
* ``ensure_unpacked``: a folder of files from an archive (already unpacked, copied in by hand,
  or downloaded), with instructions for an offline machine when none of them works.
* ``extract_tar``: unpacking that cannot write outside its folder.
* ``unpickle_arrays``: CIFAR's pickle files read without letting them run code.
* ``find_images``, ``check_same_classes``, ``load_image``, ``verify_images``: folders of
  class folders of images (ImageNet), read so that a stray or broken file is named, never
  silently turned into a shifted label or a crash an epoch later.

It imports nothing of the project's: data.py and data_events.py import it. ``DataError`` lives
here for that reason and is part of data.py's interface (data.py re-exports it).
"""
import concurrent.futures
import hashlib
import os
import pickle
import tarfile
import urllib.error
import urllib.request

from PIL import Image
from tqdm import tqdm


class DataError(Exception):
    """A problem with the data or a data option that the user can fix; the message says how."""

    def __str__(self):
        message = super().__str__()
        # Raised in a DataLoader worker, it reaches the main process made again from the text of
        # the worker's traceback (torch's ExceptionWrapper), whose last line is the message.
        if "Traceback (most recent call last)" in message:
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        return message


def error_line(error: Exception) -> str:
    """The message of an error for the user, in one line. An error raised in a DataLoader
    worker process arrives wrapped in the worker's traceback (torch re-raises it with that
    text as its message); its last line is the error and its message."""
    message = str(error)
    if "Traceback" in message:
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    return message


# A download that has not started in this many seconds is most likely an offline machine:
# fail fast with instructions instead of hanging a training job.
DOWNLOAD_TIMEOUT_S = 15
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


# ----------------------------------------------------------------------------
# Downloads, md5 checks, unpacking
# ----------------------------------------------------------------------------

def md5sum(path, chunk=1 << 20):
    """The md5 hex digest of a file, read a chunk at a time (archives can be gigabytes)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


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


def extract_tar(archive, root):
    """Unpack a .tar.gz into root, refusing any entry that would land outside root."""
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


def _where_to_put(archive, md5, url, example):
    # Training machines are often offline: say exactly which file to fetch elsewhere and where
    # to put it, packed or unpacked, so the next run finds it.
    root = os.path.dirname(os.path.abspath(archive))
    return (f"Download {os.path.basename(archive)} (md5 {md5}) from {url} on a machine with "
            f"internet access, then either copy the archive into {root}/ (it is checked "
            f"and unpacked on the next run) or unpack it there so that "
            f"{os.path.abspath(example)} exists. Use --data-dir to point at another folder.")


def ensure_unpacked(title, folder, needed, archive, url, md5, download_missing=True):
    """Return folder once it holds every file named in `needed`, fetching and unpacking `archive`.

    Order of attempts: the unpacked folder; the archive already beside it (e.g.
    copied there by hand on an offline machine, md5-checked); a download. When
    none works the DataError says where to put the files.
    """
    if all(os.path.isfile(os.path.join(folder, f)) for f in needed):
        return folder
    name, how = os.path.basename(archive), _where_to_put(archive, md5, url, os.path.join(folder, needed[0]))
    if not os.path.isfile(archive):
        if not download_missing:
            raise DataError(f"{title} not found in {os.path.abspath(folder)}. " + how)
        os.makedirs(os.path.dirname(archive) or ".", exist_ok=True)
        print(f"{title} not found in {folder}; downloading {url}")
        try:
            download(url, archive, md5)
        except DataError as e:
            raise DataError(f"{title} not found in {os.path.abspath(folder)}, and {e}. " + how) from None
    elif md5sum(archive) != md5:
        raise DataError(f"{archive} is not the official {name} (its md5 is not {md5}): "
                        f"delete it and run again to download it, or replace it with the official file.")
    try:
        extract_tar(archive, os.path.dirname(archive))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"could not unpack {archive} ({e}); delete it and run again.") from None
    missing = [f for f in needed if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(f"{archive} unpacked, but {folder} lacks {', '.join(missing)}: "
                        f"it is not the official {name}.")
    return folder


# ----------------------------------------------------------------------------
# Pickle files that hold only arrays (CIFAR's "python version")
# ----------------------------------------------------------------------------

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


def unpickle_arrays(path, what):
    """The object in a pickle file of arrays, or a DataError naming the file ('what' it should be).

    Keys written by Python 2 stay bytes (encoding='bytes' instead of guessing a text encoding);
    every way a truncated or doctored file can fail is caught and named here.
    """
    try:
        with open(path, "rb") as f:
            return _ArraysOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, MemoryError) as e:
        raise DataError(f"{path} is corrupt or not {what} ({type(e).__name__}: {e}). "
                        f"Delete its folder and run again to download it afresh, or put the official "
                        f"file there.") from None


# ----------------------------------------------------------------------------
# Folders of class folders of images (ImageNet)
# ----------------------------------------------------------------------------

def _visible(name):
    # Hidden entries are tools' litter, not data: Jupyter's .ipynb_checkpoints/, macOS's
    # .DS_Store and ._name resource files, thumbnail caches. Counted as a class, a hidden
    # folder would shift every label by one without any error.
    return not name.startswith(".")


def class_folders(split_dir):
    """The sorted names of the visible sub-folders of split_dir: the classes, label i the i-th.
    A link to split_dir itself (or to a folder above it) is a DataError: it would be one more
    class, holding the images of every other."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and _visible(e.name))
    real = os.path.realpath(split_dir)
    for name in classes:
        target = os.path.realpath(os.path.join(split_dir, name))
        if real == target or real.startswith(target.rstrip(os.sep) + os.sep):   # split_dir or above it
            raise DataError(f"class folder {os.path.join(split_dir, name)} is a link to {target}, which "
                            f"holds {split_dir} itself: remove the link (every folder is a class)")
    return classes


def find_images(split_dir):
    """(class names, [(path, class index)]) for a folder of class sub-folders, sorted for reproducibility.

    Hidden folders and files (names starting with '.') are ignored; a class
    folder without images is a DataError naming it, never a silent extra class.
    """
    split_dir = os.fspath(split_dir)
    classes = class_folders(split_dir)
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
    # a thousand differing folder names would bury the message: the first few and a count
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


# What Pillow raises for a broken file: truncated, not an image, or too large to be safe.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_image(path):
    """A file as an RGB PIL image, or a DataError naming the file."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # also forces the lazy decoder to read the whole file
    except _IMAGE_ERRORS as e:
        raise DataError(f"cannot read image {path} ({e}); the file is corrupt: replace or delete it") from None


def _verify_one(path):
    # None when the file's header (and a PNG's checksums) are sound, else what is wrong
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
