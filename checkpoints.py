"""Checkpoint files: this project's own format, and the official QKFormer's released weights.

A wing of qkformer.py (which knows nothing of files): it imports the model and writes,
reads and rebuilds it; qkformer.py never imports it. train.py writes and resumes its runs
through it, evaluate.py rebuilds the model it evaluates, README's shipped checkpoint is
a `release_checkpoint`.

  the format            CHECKPOINT_KEYS, training_checkpoint, missing_training_keys
  writing and reading   write_atomically, save_checkpoint, load_checkpoint (weights_only)
  files and folders     write_text_atomically, output_folder_problem, lock_folder,
                        remove_temporaries: what
                        train.py and evaluate.py both write with (neither imports the other)
  the release           release_checkpoint: the weights and config, without the optimizer
  official weights      convert_official_state_dict, official_config, load_official_state_dict:
                        the checkpoints of Zhou et al., "QKFormer: Hierarchical Spiking
                        Transformer using Q-K Attention", NeurIPS 2024 (arXiv:2403.16552),
                        github.com/zhouchenlin2096/QKFormer, in this project's model
  model_from_checkpoint either kind of checkpoint -> a QKFormer
"""
import errno
import glob
import os
import pickle
import re
import sys
import tempfile
from dataclasses import asdict
from typing import Callable, Dict, Optional, Tuple

import torch

from qkformer import LAYOUTS, EmbedLayout, QKFormer, QKFormerConfig


# ----------------------------------------------------------------------------------------
# The format: the one place where it is written and read

# A checkpoint is a dict of plain data and tensors (loadable with weights_only=True),
# nanoGPT-style: the weights and the config that rebuilds their model, then what a
# training run needs to continue exactly where it stopped. train.py writes it with
# training_checkpoint + save_checkpoint and resumes from load_checkpoint; evaluate.py
# rebuilds the model with model_from_checkpoint, which needs "model" and "config" only.
#   version    CHECKPOINT_VERSION of the writer
#   model      the state dict (no "module." prefix)
#   config     dataclasses.asdict(QKFormerConfig): model_from_checkpoint rebuilds from it
#   optimizer, scheduler, scaler   their state dicts
#   epoch      epochs done
#   rng        every process's random generator states, in rank order
#   args       the run's settings (a dict of option name -> value)
#   best_top1  the best test top-1 accuracy so far (percent), None before any evaluation
#   progress   only in a checkpoint of the middle of an epoch (train_guards.Interrupts.save):
#              the steps done in epoch `epoch` + 1 and its tally so far; rng is then the
#              generators' states at that step
#   record     only in a checkpoint of the end of an epoch: the epoch's training statistics (its
#              line of log.jsonl before the evaluation), so that a resume that finds no line of
#              this epoch in the log (its evaluation was stopped) evaluates it and writes the line
CHECKPOINT_VERSION = 2  # 1 named the best value best_acc1; it never left this repository and is not read
CHECKPOINT_KEYS = ("version", "model", "config", "optimizer", "scheduler", "scaler", "epoch", "rng",
                   "args", "best_top1")


def training_checkpoint(model: QKFormer, optimizer, scheduler, scaler, epoch: int, rng: list,
                        args: dict, best_top1: Optional[float], progress: Optional[dict] = None,
                        record: Optional[dict] = None) -> dict:
    """The checkpoint of a training run (keys: CHECKPOINT_KEYS, and progress or record when
    given), ready for save_checkpoint."""
    checkpoint = {"version": CHECKPOINT_VERSION, "model": model.state_dict(), "config": asdict(model.config),
                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                  "scaler": scaler.state_dict(), "epoch": epoch, "rng": rng, "args": dict(args),
                  "best_top1": best_top1}
    if progress is not None:
        checkpoint["progress"] = progress
    if record is not None:
        checkpoint["record"] = dict(record)  # a copy: the caller adds the evaluation to its own
    return checkpoint


def missing_training_keys(checkpoint) -> list:
    """The CHECKPOINT_KEYS a dict lacks to resume training from it (all of them for a non-dict)."""
    return [k for k in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]


# ----------------------------------------------------------------------------------------
# Writing and reading files

def write_atomically(path: str, write: Callable):
    """Write a file by `write(f)` (f: a binary file) into a temporary file in the same folder,
    then os.replace it over `path`. os.replace is atomic: a kill at any moment leaves either
    the old file or the new one, never half of one. The temporary name is unique (mkstemp,
    `<name>.<random>.tmp`), so two writers never share one, and it is removed when anything
    goes wrong. Checkpoints are written so, and train.py's log, settings and plot."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(obj: dict, path: str):
    """torch.save, atomically (see write_atomically). A write that fails (a full disk, a file
    size limit) raises the OSError of the write, whatever torch.save reports (below)."""
    write_atomically(path, lambda f: _torch_save(obj, f))


def _torch_save(obj, f):
    """torch.save(obj, f); a failed write as an OSError. torch.save writes a zip archive
    through its C++ writer (inline_container.cc): when a write of `f` fails (ENOSPC, EFBIG),
    the archive's closing, on the way out, finds fewer bytes than it wrote and raises a
    RuntimeError ("unexpected pos ..."), which replaces the OSError of the write (its
    __context__). The OSError is what happened, and what callers catch."""
    try:
        torch.save(obj, f)
    except RuntimeError as e:
        cause = e.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is not None:
            raise cause from None
        if "inline_container" not in str(e):  # not the writer's: a bug, left as it is
            raise
        raise OSError(errno.EIO, f"the file was not written whole ({str(e).strip().splitlines()[0]})") from None


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint file safely: `weights_only=True`, so a file can never run code.
    Raises ValueError with a clear message for a missing, unreadable or foreign file."""
    if os.path.isdir(path):
        names = sorted(f for f in os.listdir(path) if f.endswith((".pt", ".pth")))
        raise ValueError(f"checkpoint {path!r} is a folder, not a file: give the checkpoint file in it"
                         + (f" ({', '.join(names[:4])})" if names else ""))
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"refusing to load {path!r}: it is not a PyTorch checkpoint, or it holds "
                         f"objects other than tensors and plain data, which could run code") from None
    except Exception as e:  # a truncated or damaged zip archive
        raise ValueError(f"cannot read checkpoint {path!r}: the file is damaged or incomplete "
                         f"({type(e).__name__})") from None


# ----------------------------------------------------------------------------------------
# Files and folders that train.py and evaluate.py both write

def write_text_atomically(path: str, text: str):
    """A text file (args.json, log.jsonl, metrics.json), atomically: write_atomically."""
    write_atomically(path, lambda f: f.write(text.encode()))


def output_folder_problem(path: str):
    """Why `path` cannot be made an output folder, in words, or None when it can: a file is
    not a folder, and a symbolic link to nowhere would make os.makedirs say only "File exists"."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"is a symbolic link to {os.readlink(path)}, which does not exist"
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file, not a folder"
    return None


# The lock of an output folder (train.py's run folder, evaluate.py's results): flock on Linux
# and macOS, a byte-range lock (msvcrt.locking) on Windows. Each is held by an open file and
# released by the operating system when the process ends, however it ends; a second process
# asking for it is refused at once.
try:
    import fcntl                                         # Linux, macOS
except ImportError:
    fcntl = None
try:
    import msvcrt                                        # Windows
except ImportError:
    msvcrt = None
# errno of a lock another process holds (flock: EWOULDBLOCK; msvcrt.locking: EACCES), and of a
# file system that cannot lock (some network drives): that process goes on, unprotected, with a note.
LOCK_HELD = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, getattr(errno, "EDEADLOCK", errno.EDEADLK)}
LOCK_UNSUPPORTED = {getattr(errno, name) for name in ("ENOLCK", "EOPNOTSUPP", "ENOTSUP", "ENOSYS")
                    if hasattr(errno, name)}


def lock_folder(folder: str, what: str = "run folder", program: str = "train.py"):
    """Lock `folder` for the life of this process: an exclusive lock on folder/.lock (flock,
    or msvcrt.locking on Windows), which the operating system releases when the process ends.
    Returns the open lock file (close it to let go), or None if another process holds it.
    Where nothing can lock, the process goes on with a one-line note on stderr naming `what`
    the folder is and the `program` not to start a second time on it."""
    lock = open(os.path.join(folder, ".lock"), "a")
    try:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif msvcrt is not None:
            lock.seek(0)                                 # the lock covers byte 0 of the file
            msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            raise OSError(errno.ENOSYS, "no file locks on this platform")
    except OSError as e:
        if e.errno not in LOCK_UNSUPPORTED:
            lock.close()
            if e.errno in LOCK_HELD:
                return None
            raise
        print(f"note: cannot lock the {what} {folder} ({e.strerror}): do not start a second "
              f"{program} on it while this one runs", file=sys.stderr, flush=True)
    return lock


def remove_temporaries(folder: str, patterns) -> list:
    """Remove the temporary files that killed writes left (write_atomically's names, matching
    `patterns`) from a folder whose lock (lock_folder) the caller holds: nobody else writes
    there. Returns their names and sizes, in words."""
    removed = []
    for pattern in patterns:
        for stale in sorted(glob.glob(os.path.join(glob.escape(folder), pattern))):
            removed.append(f"{os.path.basename(stale)} ({os.path.getsize(stale) / 2 ** 20:.1f} MB)")
            os.remove(stale)
    return removed


# ----------------------------------------------------------------------------------------
# The release: what using a trained model needs

RELEASE_KEYS = ("version", "model", "config", "args", "best_top1")


def release_checkpoint(checkpoint: dict, dtype: torch.dtype = torch.float32) -> dict:
    """What a training checkpoint holds that is needed to use the model: its weights (floats
    stored as `dtype`), its config and the run's settings and top-1 (RELEASE_KEYS); not the
    optimizer's state, which is twice the weights. The format of README's shipped checkpoint:
    `model_from_checkpoint` reads it as any other (weights come back as float32).

    float16 would halve the file, but a spiking network's accuracy moves with the rounding:
    a weight a little off moves a membrane potential across the threshold now and then, and
    the spike that appears or vanishes changes everything after it. The CPU recipe's model
    went from 77.15 % to 76.95 % top-1 (test-time flips, full test set) in float16 (README),
    so the shipped file keeps the trained float32 weights."""
    missing = [k for k in ("model", "config") if k not in checkpoint]
    if missing:
        raise ValueError(f"not a checkpoint of this project's training: it lacks {missing}")
    weights = {k: v.to(dtype) if v.is_floating_point() else v
               for k, v in unwrap_state_dict(checkpoint["model"]).items()}
    return {**{k: checkpoint[k] for k in RELEASE_KEYS if k in checkpoint}, "model": weights}


# ----------------------------------------------------------------------------------------
# The official weights (like nanoGPT's from_pretrained: someone else's names, our model)

# What the official code calls the layers of each family (qkformer.LAYOUTS), and what leaves
# no trace in its weights:
#   embeds    per patch embedding, its layers patch_embed<i>.<name>_conv in the order of
#             EmbedLayout's stem then main layers; the shortcut is proj_res in every family
#   heads     the official number of heads, as a function of D (embed_dim)
#   img_size  the size of the images the official models were trained on
# (cifar10/, cifar100/ model.py; imagenet/qkformer.py; cifar10-dvs/, dvs128-gesture/ model.py)
OFFICIAL: Dict[str, dict] = {
    "cifar": dict(embeds=(("proj", "proj1"), ("proj3", "proj4"), ("proj3", "proj4")),
                  heads=lambda dim: 8, img_size=32),
    "imagenet": dict(embeds=(("proj", "proj1", "proj2"), ("proj3", "proj4"), ("proj3", "proj4")),
                     heads=lambda dim: dim // 64, img_size=224),
    "dvs": dict(embeds=(("proj", "proj1", "proj2", "proj3"), ("proj", "proj4")),
                heads=lambda dim: 16, img_size=128),
}
_OFFICIAL_UNIT = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "proj": "attn.proj",
                  "mlp1": "mlp.fc1", "fc1": "mlp.fc1", "mlp2": "mlp.fc2", "fc2": "mlp.fc2"}
_EMBED_KEY = re.compile(r"patch_embed([123])\.(proj\d?|proj_res)_(conv|bn)\.(\w+)$")
_BLOCK_KEY = re.compile(r"stage([123])\.(\d+)\.(?:tssa|ssa|attn|mlp)\.(\w+?)_(conv|bn)\.(\w+)$")


def _module_names(embed: EmbedLayout, official: Tuple[str, ...]) -> Dict[str, str]:
    """Official layer name -> this model's module path inside a SPEDS (see qkformer.build_speds)."""
    stem = ["stem"] if len(embed.stem) == 1 else [f"stem.{j}" for j in range(len(embed.stem))]
    ours = stem + [f"main.{j}" for j in range(len(embed.main))]
    return {**dict(zip(official, ours)), "proj_res": "shortcut"}


def unwrap_state_dict(obj) -> dict:
    """The state dict inside a checkpoint: strips the usual {"model": ...} or
    {"state_dict": ...} wrappers and the "module." prefix that DDP adds."""
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("this file holds no state dict (a dict of tensor names to tensors)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def official_family(state_dict: dict) -> str:
    """The family (a key of LAYOUTS) of an official state dict, told by the layers of its
    first patch embedding: CIFAR proj, proj1; ImageNet proj..proj2; DVS proj..proj3."""
    sd = unwrap_state_dict(state_dict)
    names = {m.group(2) for k in sd if (m := _EMBED_KEY.match(k)) and m.group(1) == "1"} - {"proj_res"}
    for family, official in OFFICIAL.items():
        if names == set(official["embeds"][0]):
            return family
    raise ValueError(f"the first patch embedding of this state dict has the layers {sorted(names)}, "
                     f"which no official QKFormer family has: is it an official QKFormer checkpoint?")


def convert_official_state_dict(state_dict: dict) -> dict:
    """Rename the official QKFormer keys to this model's, e.g.

        patch_embed2.proj4_conv.weight  -> stages.1.embed.main.1.conv.weight
        stage3.0.ssa.q_bn.running_mean  -> stages.2.blocks.0.attn.q.bn.running_mean
        stage1.0.mlp.mlp1_conv.bias     -> stages.0.blocks.0.mlp.fc1.conv.bias
        patch_embed1.proj1_conv.weight  -> stages.0.embed.stem.1.conv.weight   (DVS family)

    The names of the patch-embedding layers depend on the family (`official_family`,
    OFFICIAL). The official attention layers are Conv1d (weight C x C x 1); here every
    token-wise linear layer is a 1x1 Conv2d (C x C x 1 x 1), so those weights gain an
    axis. Raises ValueError naming any key that belongs to no QKFormer layer.
    """
    state_dict = unwrap_state_dict(state_dict)
    family = official_family(state_dict)
    embeds = [_module_names(e, names) for e, names in zip(LAYOUTS[family].embeds, OFFICIAL[family]["embeds"])]
    converted, unexpected = {}, []
    for key, value in state_dict.items():
        if key.startswith("head."):
            converted[key] = value
        elif (m := _EMBED_KEY.match(key)) and int(m.group(1)) <= len(embeds) \
                and m.group(2) in embeds[int(m.group(1)) - 1]:
            stage, layer, kind, param = m.groups()
            converted[f"stages.{int(stage) - 1}.embed.{embeds[int(stage) - 1][layer]}.{kind}.{param}"] = value
        elif (m := _BLOCK_KEY.match(key)) and m.group(3) in _OFFICIAL_UNIT:
            stage, block, layer, kind, param = m.groups()
            if kind == "conv" and value.dim() == 3:
                value = value.unsqueeze(-1)                          # Conv1d -> 1x1 Conv2d
            converted[f"stages.{int(stage) - 1}.blocks.{block}.{_OFFICIAL_UNIT[layer]}.{kind}.{param}"] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"{len(unexpected)} key(s) of this state dict belong to no QKFormer layer, "
                         f"e.g. {unexpected[:5]}: is it an official QKFormer checkpoint?")
    return converted


def official_config(state_dict: dict, **overrides) -> QKFormerConfig:
    """Read the architecture of an official checkpoint from its tensor shapes.

    Heads leave no trace in the weights: the official CIFAR models use 8, the ImageNet
    ones embed_dim / 64 (6, 8, 12), the DVS ones 16 (OFFICIAL's heads); pass num_heads=
    to say otherwise. The MLP ratio is read from the first MLP's width."""
    sd = unwrap_state_dict(state_dict)
    if "head.weight" not in sd or "patch_embed1.proj_conv.weight" not in sd:
        raise ValueError("not an official QKFormer state dict: no head.weight or "
                         "patch_embed1.proj_conv.weight")
    family = official_family(sd)
    official = OFFICIAL[family]
    num_classes, embed_dim = sd["head.weight"].shape
    blocks = {k.split(".")[0] + "." + k.split(".")[1] for k in sd if k.startswith("stage")}
    mlp = sd.get("stage1.0.mlp.mlp1_conv.weight")                 # (ratio * C, C, 1, 1)
    settings = dict(family=family, num_classes=num_classes, embed_dim=embed_dim,
                    depths=len(blocks), in_channels=sd["patch_embed1.proj_conv.weight"].shape[1],
                    num_heads=official["heads"](embed_dim), img_size=official["img_size"],
                    official_quirks=True)
    if mlp is not None:
        settings["mlp_ratio"] = mlp.shape[0] / mlp.shape[1]
    return QKFormerConfig(**{**settings, **overrides})


def load_official_state_dict(model: QKFormer, state_dict: dict) -> QKFormer:
    """Load official QKFormer weights into `model` (strictly) and switch on official_quirks,
    since the released models were trained with the batch-mixing SSA neuron."""
    converted = convert_official_state_dict(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(converted))
    extra = sorted(set(converted) - set(own))
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in converted.items()
             if k in own and v.shape != own[k].shape]
    if missing or extra or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if extra:
            problems.append(f"{len(extra)} unexpected (e.g. {extra[:3]})")
        if wrong:
            problems.append(f"{len(wrong)} of another shape (e.g. {wrong[:3]})")
        raise ValueError("the official state dict does not fit this model: " + "; ".join(problems)
                         + ". Build the model with official_config(state_dict) to match it.")
    model.load_state_dict(converted, strict=True)
    model.set_official_quirks(True)
    return model


# ----------------------------------------------------------------------------------------
# Either kind of checkpoint -> a model

# The names this project's QKFormer gives its weights start so (the official ones: patch_embed,
# stage, head): a bare state dict of our model, without its config, is told apart by them.
OWN_KEY_PREFIXES = ("stages.",)


def model_from_checkpoint(checkpoint: dict, **overrides) -> QKFormer:
    """Rebuild a model from a checkpoint dict: this project's own ({"model", "config", ...},
    as train.py writes them) or an official QKFormer checkpoint (converted, official_quirks on).
    `overrides` change config fields that do not affect the weights (e.g. T, official_quirks)."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("config"), dict) \
            and isinstance(checkpoint.get("model"), dict):
        unknown = sorted(set(checkpoint["config"]) - set(QKFormerConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"the checkpoint's config has fields this QKFormerConfig lacks ({unknown}): "
                             f"was it written by a newer version of this code?")
        model = QKFormer(QKFormerConfig(**{**checkpoint["config"], **overrides}))
        state, own = unwrap_state_dict(checkpoint["model"]), model.state_dict()
        # Shapes first: load_state_dict raises a RuntimeError ("size mismatch") for them even
        # when strict=False, a traceback instead of this message.
        wrong = [f"{k} {tuple(v.shape)} (the config's model: {tuple(own[k].shape)})"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected or wrong:
            example = (wrong or missing or unexpected)[0]
            raise ValueError(f"the checkpoint's weights do not fit its own config: {len(missing)} "
                             f"missing, {len(unexpected)} unexpected, {len(wrong)} of another shape "
                             f"(e.g. {example})")
        model.load_state_dict(state, strict=True)
        return model
    state = unwrap_state_dict(checkpoint)
    if any(k.startswith(OWN_KEY_PREFIXES) for k in state) and not any(_EMBED_KEY.match(k) for k in state):
        raise ValueError("this file holds the weights of this project's QKFormer without the config that "
                         "rebuilds the model (a bare state dict): use a checkpoint written by train.py "
                         "(last.pt or best.pt: weights and config)")
    model = QKFormer(official_config(state, **overrides))
    return load_official_state_dict(model, state)


def check_finite(model, path: str):
    """ValueError naming the weights of `model` (read from the checkpoint `path`) that hold inf
    or NaN: such a model predicts one class for every image, and its accuracy means nothing.
    (train.py never saves such weights: train_guards.check_saveable.)"""
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"the weights in {path} are not finite: {', '.join(bad[:3])}"
                         f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''} hold inf or NaN (a "
                         f"diverged run?): evaluate an earlier checkpoint of the run")
