"""RandAugment's operations as timm writes them, for data.py's RandAugment.

A wing of data.py. QKFormer (Zhou et al., NeurIPS 2024) does not describe its augmentation;
its official code trains with timm, whose configs ask for RandAugment (Cubuk et al. 2020):
CIFAR ``rand-m9-n1-mstd0.4-inc1``, ImageNet ``rand-m9-mstd0.5-inc1``. data.RandAugment reads
such a policy (parse_policy) and, per image, draws operations from RANDAUGMENT_OPS, this file's table: the 15
operations of timm's "increasing" set ("inc1"), whose effect grows with the magnitude for every
operation (e.g. posterize keeps fewer bits, solarize a lower threshold). Each is a function
(PIL image, level 0..10, fill colour) -> PIL image, written to give timm's pixels; a first
reading of the pipeline may take them on trust.

It imports only data_files (for DataError). Random numbers (the sign of a shear, a rotation, ...)
come from torch's generator, like every other draw of the data pipeline.
"""
import torch
from PIL import Image, ImageEnhance, ImageOps

from data_files import DataError


def _signed(v):
    # a fair coin from torch's generator (as data._coin(0.5)): one seed pins down every draw
    return -v if torch.rand(()).item() < 0.5 else v


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


def parse_policy(policy):
    """(magnitude, operations per image, magnitude std) of a timm policy such as 'rand-m9-n1-mstd0.4-inc1'.

    timm's defaults for the parts not given: magnitude 10, 2 operations, std 0.
    Only the "increasing" operation set ('inc1') is written here, so it must be
    asked for; anything else is a DataError that shows a valid policy.
    """
    parts = policy.split("-")
    if parts[0] != "rand":
        raise DataError(f"augmentation policy {policy!r} is not a RandAugment string like "
                        f"'rand-m9-n1-mstd0.4-inc1' (use 'none' to switch it off)")
    magnitude, num_ops, magnitude_std, increasing = 10.0, 2, 0.0, False
    try:
        for part in parts[1:]:
            # 'mstd' before 'm': both start with m
            if part.startswith("mstd"):
                magnitude_std = float(part[4:])
            elif part.startswith("inc"):
                increasing = bool(int(part[3:]))
            elif part.startswith("m"):
                magnitude = float(part[1:])
            elif part.startswith("n"):
                num_ops = int(part[1:])
            else:
                raise ValueError(part)
    except ValueError:
        raise DataError(f"cannot read RandAugment policy {policy!r}: expected parts m<magnitude>, "
                        f"n<number of ops>, mstd<std>, inc1, e.g. 'rand-m9-n1-mstd0.4-inc1'") from None
    if not increasing:
        raise DataError(f"RandAugment policy {policy!r}: only the 'inc1' operation set (the one the "
                        f"official QKFormer runs used) is implemented; add '-inc1'")
    return magnitude, num_ops, magnitude_std
