"""Event-camera data (data_events.py) and the DVS models (qkformer.py, family 'dvs').

The recordings are written by the tests in the official file formats (tests/_fakeevents.py):
AEDAT 2.0 for CIFAR10-DVS, AEDAT 3.1 plus labels files for DVS128 Gesture. Nothing is read
from ../shared or the network (the "download" comes from a server on 127.0.0.1).
"""
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch

try:
    import resource               # POSIX: file size limits
except ImportError:               # Windows
    resource = None

import data
import data_events
from data import DataError
from checkpoints import official_family
from qkformer import create_model
from _fakeevents import (aedat2_bytes, polarity_packet, random_events, special_packet,
                         write_aedat2, write_aedat31, write_cifar10dvs_tree, write_gesture_tree, write_labels)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- reading the files

def test_read_cifar10dvs_decodes_and_rotates_like_spikingjelly(tmp_path):
    ev = random_events(3000, seed=1)
    path = str(tmp_path / "cifar10_cat_0.aedat")
    write_aedat2(path, ev)
    got = data_events.read_cifar10dvs(path)
    assert set(got) == {"t", "x", "y", "p"} and len(got["t"]) == 3000
    np.testing.assert_array_equal(got["t"], ev["t"])
    # SpikingJelly's orientation: x' = 127 - y, y' = 127 - x, p' = 1 - p
    np.testing.assert_array_equal(got["x"], 127 - ev["y"])
    np.testing.assert_array_equal(got["y"], 127 - ev["x"])
    np.testing.assert_array_equal(got["p"], 1 - ev["p"])


def test_read_cifar10dvs_one_known_event(tmp_path):
    path = str(tmp_path / "one.aedat")
    # address: y=5 (bits 8-14), x=3 (bits 1-7), p=1 (bit 0); big-endian words
    with open(path, "wb") as f:
        f.write(b"#!AER-DAT2.0\r\n" + ((5 << 8) | (3 << 1) | 1).to_bytes(4, "big") + (1234).to_bytes(4, "big"))
    got = data_events.read_cifar10dvs(path)
    assert (got["t"][0], got["x"][0], got["y"][0], got["p"][0]) == (1234, 127 - 5, 127 - 3, 0)


def test_read_aedat31_skips_other_packets_and_adds_the_overflow(tmp_path):
    ev = random_events(2000, seed=2)
    late = random_events(500, seed=3, t0=(1 << 31) + 7)  # after a timestamp overflow
    path = str(tmp_path / "rec.aedat")
    write_aedat31(path, [polarity_packet({k: v[:1200] for k, v in ev.items()}), special_packet(),
                         polarity_packet({k: v[1200:] for k, v in ev.items()}), polarity_packet(late, overflow=1)])
    got = data_events.read_aedat31(path)
    for k in ("t", "x", "y", "p"):
        np.testing.assert_array_equal(got[k], np.concatenate([ev[k], late[k]]))
    assert got["t"][-1] > 1 << 31


def test_read_dvs128gesture_slices_by_labels_file(tmp_path):
    ev = random_events(3000, seed=4)
    ev["t"] = np.arange(3000) * 10 + 100  # distinct timestamps: slice boundaries are exact
    path = str(tmp_path / "user01_lab.aedat")
    write_aedat31(path, [polarity_packet(ev)])
    csv = str(tmp_path / "user01_lab_labels.csv")
    t = ev["t"]
    write_labels(csv, [(4, t[100], t[700]), (1, t[700], t[1500]), (4, t[1400], t[2999])])  # rows overlap
    samples = data_events.read_dvs128gesture(path, csv)
    assert [label for label, _ in samples] == [3, 0, 3]  # class - 1, order of the file
    # start <= t < end: an event exactly on a boundary belongs to the later sample only
    for (label, got), (a, b) in zip(samples, [(100, 700), (700, 1500), (1400, 2999)]):
        np.testing.assert_array_equal(got["t"], t[a:b])
        np.testing.assert_array_equal(got["x"], ev["x"][a:b])


# ---------------------------------------------------------------- frames

def reference_frames(ev, T, H, W):
    """One event at a time, written out as the official split-by-number rule says."""
    n = len(ev["t"])
    frames = np.zeros((T, 2, H, W), np.int64)
    step = n // T
    for j in range(T):
        lo, hi = j * step, ((j + 1) * step if j < T - 1 else n)
        for i in range(lo, hi):
            frames[j, ev["p"][i], ev["y"][i], ev["x"][i]] += 1
    return frames


@pytest.mark.parametrize("n,T", [(1003, 4), (16, 16), (5, 8), (0, 3)])
def test_events_to_frames_split_by_number(n, T):
    ev = random_events(n, seed=5, size=16)
    frames = data_events.events_to_frames(ev, T, 16, 16)
    assert frames.shape == (T, 2, 16, 16)
    np.testing.assert_array_equal(frames, reference_frames(ev, T, 16, 16))
    per_frame = frames.reshape(T, -1).sum(1)
    # n // T events per frame, the last also the remainder
    assert per_frame[:-1].tolist() == [n // T] * (T - 1) and per_frame[-1] == n - (T - 1) * (n // T)


def test_events_to_frames_channel_is_polarity_and_rows_are_y():
    ev = dict(t=np.array([0, 1]), x=np.array([2, 0]), y=np.array([1, 3]), p=np.array([1, 0]))
    frames = data_events.events_to_frames(ev, 1, 4, 5)
    assert frames[0, 1, 1, 2] == 1 and frames[0, 0, 3, 0] == 1 and frames.sum() == 2


def test_events_to_frames_rejects_events_off_the_sensor():
    with pytest.raises(DataError, match="outside"):
        data_events.events_to_frames(dict(t=np.array([0]), x=np.array([128]), y=np.array([0]), p=np.array([0])), 2, 128, 128)


# ---------------------------------------------------------------- CIFAR10-DVS: cache, split, download

def test_cifar10dvs_official_split_order_and_frames(tmp_path):
    written = write_cifar10dvs_tree(tmp_path, per_class=11)
    train, test = data_events.build_dvs_datasets("cifar10dvs", tmp_path, T=2)
    # per class ceil(0.9 * 11) = 10 for training, in sorted-string order _0, _1, _10, _2, ..., _8
    assert len(train) == 100 and len(test) == 10
    names = lambda ds: [os.path.basename(f)[:-4] for f in ds.files]  # noqa: E731
    airplane = [n for n in names(train) if "airplane" in n]
    assert airplane == [f"cifar10_airplane_{i}" for i in (0, 1, 10, 2, 3, 4, 5, 6, 7, 8)]
    assert names(test) == [f"cifar10_{c}_9" for c in data_events.CIFAR10DVS_CLASSES]
    assert test.labels == list(range(10))
    frames, label = train[12]  # the third recording of class 1
    assert frames.dtype == torch.float32 and frames.shape == (2, 2, 128, 128) and label == 1
    path = os.path.join(tmp_path, "CIFAR10-DVS", "aedat", "automobile", "cifar10_automobile_10.aedat")
    ev = written[path]
    expected = data_events.events_to_frames(dict(t=ev["t"], x=127 - ev["y"], y=127 - ev["x"], p=1 - ev["p"]), 2, 128, 128)
    np.testing.assert_array_equal(frames.numpy(), expected)


def test_cifar10dvs_random_split_is_seeded_and_per_class(tmp_path):
    labels = [c for c in range(3) for _ in range(20)]
    a = data_events.cifar10dvs_split(labels, "random", seed=1)
    assert a == data_events.cifar10dvs_split(labels, "random", seed=1)
    assert a != data_events.cifar10dvs_split(labels, "random", seed=2)
    assert a != data_events.cifar10dvs_split(labels, "official")
    train, test = a
    assert sorted(train + test) == list(range(60))
    assert [sum(labels[i] == c for i in train) for c in range(3)] == [18, 18, 18]
    with pytest.raises(DataError, match="unknown split"):
        data_events.cifar10dvs_split(labels, "bogus")


def test_cache_is_reused_rebuilt_for_a_new_T_and_never_half_written(tmp_path, monkeypatch):
    write_cifar10dvs_tree(tmp_path, per_class=2, events=40)
    calls = []
    real_to_frames = data_events.events_to_frames

    def interrupted(ev, T, H, W):
        if len(calls) == 5:
            raise KeyboardInterrupt  # the build is stopped half-way
        calls.append(T)
        return real_to_frames(ev, T, H, W)

    monkeypatch.setattr(data_events, "events_to_frames", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data_events.build_dvs_cache("cifar10dvs", tmp_path, 3)
    cache = data_events.dvs_cache_dir("cifar10dvs", tmp_path, 3)
    assert not os.path.exists(os.path.join(cache, "index.json"))  # not complete, so not valid
    complete = [f for _, _, fs in os.walk(cache) for f in fs if f.endswith(".npz")]
    assert len(complete) == 5
    # the rerun keeps the 5 complete files and writes the other 15
    monkeypatch.setattr(data_events, "events_to_frames", real_to_frames)
    calls.clear()
    counted = []
    monkeypatch.setattr(data_events, "read_cifar10dvs", functools.partial(_count, counted, data_events.read_cifar10dvs))
    index = data_events.build_dvs_cache("cifar10dvs", tmp_path, 3)
    assert len(index["samples"]) == 20 and len(counted) == 15
    leftovers = [f for _, _, fs in os.walk(cache) for f in fs if f.endswith(".part")]
    assert leftovers == []
    # the frames equal those of a build in one go
    fresh = tmp_path / "fresh"
    write_cifar10dvs_tree(fresh, per_class=2, events=40)
    data_events.build_dvs_cache("cifar10dvs", fresh, 3)
    for s in index["samples"]:
        a = np.load(os.path.join(cache, s["file"]))["frames"]
        b = np.load(os.path.join(data_events.dvs_cache_dir("cifar10dvs", fresh, 3), s["file"]))["frames"]
        np.testing.assert_array_equal(a, b)
    # reused: a second build reads no recording
    counted.clear()
    assert data_events.build_dvs_cache("cifar10dvs", tmp_path, 3) == index and counted == []
    # a new T builds a new cache beside the old one
    train, _ = data_events.build_dvs_datasets("cifar10dvs", tmp_path, T=4)
    assert len(counted) == 20 and train[0][0].shape == (4, 2, 128, 128)
    assert os.path.isfile(os.path.join(cache, "index.json"))


def _count(calls, fn, *args):
    calls.append(args)
    return fn(*args)


def damage(path, how):
    """Damage a cache file as a disk or a copy does: cut it short, flip one bit, or empty it."""
    with open(path, "rb") as f:
        raw = bytearray(f.read())
    if how == "truncated":
        raw = raw[:len(raw) // 2]
    elif how == "bit-flipped":
        raw[len(raw) // 2] ^= 0x04       # inside the compressed array: the zip's CRC no longer holds
    else:
        raw = b""
    with open(path, "wb") as f:
        f.write(raw)
    with pytest.raises(Exception), np.load(path) as z:
        z["frames"]                      # really damaged


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("how", ["truncated", "bit-flipped", "empty"])
def test_a_damaged_cache_file_is_made_again_from_its_recording(tmp_path, capfd, how, workers):
    """Read in this process or in a loader worker (whose error PyTorch would carry over): the
    file is made again from its recording, with a warning naming both."""
    written = write_cifar10dvs_tree(tmp_path, per_class=1, events=200)
    train, _ = data_events.build_dvs_datasets("cifar10dvs", tmp_path, T=2)
    expected = [train[i][0] for i in range(len(train))]
    damage(train.files[0], how)
    loader = torch.utils.data.DataLoader(train, batch_size=len(train), num_workers=workers)
    (frames, _), = list(loader)
    torch.testing.assert_close(frames, torch.stack(expected))
    err = capfd.readouterr().err
    recording = [p for p in written if os.path.basename(p)[:-6] == os.path.basename(train.files[0])[:-4]][0]
    assert f"warning: the cached frames {train.files[0]} were damaged (" in err and recording in err
    with np.load(train.files[0]) as z:
        assert z["frames"].shape == (2, 2, 128, 128)                            # whole again


def test_a_damaged_cache_file_without_its_recording_names_the_file_to_delete(tmp_path, capsys):
    """Only the cache was kept: train.py (the file read by a loader worker, in a process of its
    own) and evaluate.py end with one line naming the file to delete; once deleted, the run
    goes on without that recording."""
    import evaluate
    written = write_cifar10dvs_tree(tmp_path / "data", per_class=11, events=30)
    argv = ["--dataset", "cifar10dvs", "--data-dir", str(tmp_path / "data"), "--batch-size", "4",
            "--subset", "8", "--output", str(tmp_path / "run")] + NARROW
    argv[argv.index("--workers") + 1] = "2"
    train, test = data_events.build_dvs_datasets("cifar10dvs", tmp_path / "data", T=2)
    train.files = data.evenly_spaced(train.files, 8)          # those --subset 8 trains on
    for ds in (train, test):
        os.remove([p for p in written if os.path.basename(p)[:-6] == os.path.basename(ds.files[0])[:-4]][0])
        damage(ds.files[0], "bit-flipped")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, timeout=120)
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert f"the cached frames {train.files[0]} are damaged (" in lines[0]
    assert f"delete {train.files[0]} and run again" in lines[0]
    model = create_model("cifar10dvs", embed_dim=32, T=2)
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.config)}, tmp_path / "m.pt")
    code = evaluate.main(["--checkpoint", str(tmp_path / "m.pt"), "--dataset", "cifar10dvs", "--data-dir",
                          str(tmp_path / "data"), "--device", "cpu", "--workers", "2", "--pictures", "0",
                          "--output", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert f"the cached frames {test.files[0]} are damaged" in lines[0] and f"delete {test.files[0]}" in lines[0]
    for ds in (train, test):            # as the messages say
        os.remove(ds.files[0])
    assert subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], capture_output=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, timeout=120).returncode == 0


@contextlib.contextmanager
def read_only(folder):
    """`folder` read-only for real: a read-only bind mount for root (whom file modes do not stop),
    file modes for anyone else; skipped, with the reason, where neither can be made."""
    folder = str(folder)
    if os.name != "posix":
        pytest.skip("read-only folders are made here with POSIX file modes or mounts")
    if os.geteuid() == 0:
        for options in (["--bind", folder, folder], ["-o", "remount,ro,bind", folder, folder]):
            done = subprocess.run(["mount", *options], capture_output=True, text=True)
            if done.returncode:
                subprocess.run(["umount", folder], capture_output=True)
                pytest.skip(f"root needs a read-only bind mount here, and mount refused: {done.stderr.strip()}")
    else:
        modes = {root: os.stat(root).st_mode for root, _, _ in os.walk(folder)}
        for root in modes:
            os.chmod(root, 0o555)
    try:
        with pytest.raises(OSError):
            open(os.path.join(folder, "probe"), "w").close()
        yield folder
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", folder])
        else:
            for root, mode in modes.items():
                os.chmod(root, mode)


def test_a_read_only_dataset_folder_asks_for_a_cache_dir(tmp_path, capsys):
    import evaluate
    import train
    write_cifar10dvs_tree(tmp_path / "data", per_class=11, events=30)
    run, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["--dataset", "cifar10dvs", "--data-dir", str(tmp_path / "data"), "--batch-size", "4", "--subset", "8",
            "--output", str(run)] + NARROW
    with read_only(tmp_path / "data"):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        err = capsys.readouterr().err
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error")]
        assert e.value.code == 2 and "Traceback" not in err and len(lines) == 1, err
        frames = data_events.dvs_cache_dir("cifar10dvs", tmp_path / "data", 2)
        assert lines[0].startswith(f"error: cannot write the frame cache {frames} (") and "give --cache-dir" in lines[0]
        train.main(argv + ["--cache-dir", str(cache)])
        assert os.path.isfile(cache / "CIFAR10-DVS" / "frames_T2" / "index.json")
        assert evaluate.main(["--checkpoint", str(run / "last.pt"), "--dataset", "cifar10dvs", "--data-dir",
                              str(tmp_path / "data"), "--cache-dir", str(cache), "--device", "cpu", "--pictures",
                              "0", "--output", str(tmp_path / "eval")]) == 0


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="no file size limits (RLIMIT_FSIZE) here")
def test_a_cache_build_that_cannot_write_leaves_no_part_file(tmp_path):
    """A write that fails for real while the cache is built (a file size limit, RLIMIT_FSIZE, as a
    full disk would: no root needed): one line, and no part file left; the part files of killed
    builds are removed by the next run, those of builds in progress left alone."""
    import train
    write_cifar10dvs_tree(tmp_path / "data", per_class=11, events=4000)      # about 5 kB of frames each
    argv = ["--dataset", "cifar10dvs", "--data-dir", str(tmp_path / "data"), "--batch-size", "4", "--subset", "8",
            "--output", str(tmp_path / "run")] + NARROW
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], capture_output=True, text=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000)),
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"},
                          cwd=tmp_path, timeout=120)
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    cache = data_events.dvs_cache_dir("cifar10dvs", tmp_path / "data", 2)
    assert lines[0].startswith(f"error: cannot write the frame cache {cache} (File too large): free space")
    parts = lambda: sorted(f for _, _, fs in os.walk(cache) for f in fs if f.endswith(".part"))  # noqa: E731
    assert parts() == []
    # part files as killed builds leave them (of this version and of earlier ones), and as builds
    # in progress have them: this process's, another machine's
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = socket.gethostname()
    stale = [f"x.npz.{ended.pid}.part", f"x.npz.{host}.{ended.pid}.part", "x.npz.other-host.7.part"]
    alive = [f"x.npz.{host}.{os.getpid()}.part", "x.npz.other-host.8.part", "index.json.other.host.9.part"]
    for name in stale + alive:
        open(os.path.join(cache, "airplane", name), "wb").close()
    old = os.path.join(cache, "airplane", "x.npz.other-host.7.part")
    os.utime(old, (0, 0))                                   # written in 1970: its writer is gone
    train.main(argv)
    assert parts() == sorted(alive)


def _class_zip(cls, n=2, top_folder=True):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(n):
            name = f"cifar10_{cls}_{i}.aedat"
            z.writestr(f"{cls}/{name}" if top_folder else name, aedat2_bytes(random_events(30, seed=i)))
    return buf.getvalue()


def test_cifar10dvs_download_checks_md5_and_unpacks(tmp_path, http_server, monkeypatch):
    www, base = http_server
    archives = {}
    for k, cls in enumerate(data_events.CIFAR10DVS_CLASSES):
        blob = _class_zip(cls, top_folder=k % 2 == 0)  # both layouts unpack to aedat/<class>/
        (www / f"{cls}.zip").write_bytes(blob)
        archives[cls] = (f"{base}/{cls}.zip", hashlib.md5(blob).hexdigest())
    archives["truck"] = (archives["truck"][0], "0" * 32)  # a corrupt download
    monkeypatch.setitem(data_events.DVS, "cifar10dvs", {**data_events.DVS["cifar10dvs"], "archives": archives})
    root = tmp_path / "data"
    with pytest.raises(DataError, match="corrupt") as e:
        data_events.ensure_cifar10dvs(root)
    assert "truck.zip" in str(e.value) and not os.path.exists(root / "CIFAR10-DVS" / "truck.zip")
    archives["truck"] = (archives["truck"][0], hashlib.md5((www / "truck.zip").read_bytes()).hexdigest())
    aedat = data_events.ensure_cifar10dvs(root)
    recordings = data_events.cifar10dvs_recordings(aedat)
    assert len(recordings) == 20 and recordings[-1][1] == 9
    assert not [d for d in os.listdir(aedat) if d.startswith(".")]  # no temporary folders left


def test_cifar10dvs_offline_says_where_to_put_what(tmp_path):
    with pytest.raises(DataError) as e:
        data_events.ensure_cifar10dvs(tmp_path, download_missing=False)
    msg = str(e.value)
    assert "airplane.zip" in msg and "truck.zip" in msg and "figshare" in msg
    assert os.path.join(str(tmp_path), "CIFAR10-DVS") in msg and "0afd5c4bf9ae06af762a77b180354fdd" in msg


def test_cifar10dvs_zip_with_wrong_md5_is_refused(tmp_path):
    folder = tmp_path / "CIFAR10-DVS"
    folder.mkdir()
    (folder / "airplane.zip").write_bytes(_class_zip("airplane"))
    with pytest.raises(DataError, match="not the official airplane.zip"):
        data_events.ensure_cifar10dvs(tmp_path, download_missing=False)


# ---------------------------------------------------------------- DVS128 Gesture

def test_gesture_datasets_use_the_trials_split(tmp_path):
    folder = write_gesture_tree(tmp_path)
    train, test = data_events.build_dvs_datasets("dvs128gesture", tmp_path, T=4)
    assert len(train) == 6 and len(test) == 3
    assert train.labels == [0, 10, 2, 1, 10, 2] and test.labels == [2, 10, 2]
    assert os.path.basename(train.files[1]) == "user01_fluorescent_1.npz"
    frames, label = test[0]
    samples = data_events.read_dvs128gesture(os.path.join(folder, "user24_led.aedat"),
                                      os.path.join(folder, "user24_led_labels.csv"))
    np.testing.assert_array_equal(frames.numpy(), data_events.events_to_frames(samples[0][1], 4, 128, 128))
    with pytest.raises(DataError, match="own train/test split"):
        data_events.build_dvs_datasets("dvs128gesture", tmp_path, T=4, split="random")


def test_gesture_archive_missing_says_which_file_where(tmp_path):
    with pytest.raises(DataError) as e:
        data_events.build_dvs_datasets("dvs128gesture", tmp_path, T=4)
    msg = str(e.value)
    assert "DvsGesture.tar.gz" in msg and os.path.join(str(tmp_path), "DVS128Gesture", "DvsGesture.tar.gz") in msg


def test_gesture_archive_is_md5_checked_and_unpacked(tmp_path, monkeypatch):
    import tarfile
    src = tmp_path / "src"
    write_gesture_tree(src)
    base = tmp_path / "data" / "DVS128Gesture"
    base.mkdir(parents=True)
    archive = base / "DvsGesture.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "DVS128Gesture" / "DvsGesture", arcname="DvsGesture")
    with pytest.raises(DataError, match="not the official DvsGesture.tar.gz"):
        data_events.ensure_dvs128gesture(tmp_path / "data")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(data_events.DVS, "dvs128gesture", {**data_events.DVS["dvs128gesture"], "md5": md5})
    folder = data_events.ensure_dvs128gesture(tmp_path / "data")
    assert data_events.dvs128gesture_trials(folder, "test") == ["user24_led.aedat"]
    assert sorted(os.listdir(base)) == ["DvsGesture", "DvsGesture.tar.gz"]


# ---------------------------------------------------------------- bad input

def test_truncated_aedat2_names_the_file(tmp_path):
    path = str(tmp_path / "cut.aedat")
    with open(path, "wb") as f:
        f.write(aedat2_bytes(random_events(10))[:-4])  # an odd number of words
    with pytest.raises(DataError, match="truncated") as e:
        data_events.read_cifar10dvs(path)
    assert path in str(e.value)


def test_packet_cut_short_names_the_file(tmp_path):
    path = str(tmp_path / "cut.aedat")
    whole = polarity_packet(random_events(100))
    for cut in (whole[:-5], whole[:20]):  # the events cut short, the header cut short
        write_aedat31(path, [polarity_packet(random_events(10)), cut])
        with pytest.raises(DataError, match="truncated") as e:
            data_events.read_aedat31(path)
        assert path in str(e.value)


def test_files_without_events_name_the_file(tmp_path):
    a = str(tmp_path / "empty2.aedat")
    write_aedat2(a, random_events(0))
    b = str(tmp_path / "empty3.aedat")
    write_aedat31(b, [special_packet()])
    c = str(tmp_path / "noheader.aedat")
    write_aedat31(c, [polarity_packet(random_events(5))], header=b"")
    for path, read in ((a, data_events.read_cifar10dvs), (b, data_events.read_aedat31), (c, data_events.read_aedat31)):
        with pytest.raises(DataError) as e:
            read(path)
        assert path in str(e.value)


# ---------------------------------------------------------------- files that are not what they claim

DAVIS_HEADER = (b"#!AER-DAT2.0\r\n", b"# AEChip: eu.seebetter.ini.chips.davis.DAVIS240C\r\n")


def test_damaged_first_line_is_refused_not_read_as_events(tmp_path):
    path = str(tmp_path / "cifar10_cat_0.aedat")
    whole = aedat2_bytes(random_events(50))
    for damaged in (whole[1:], b"$" + whole[1:], whole[:5] + b"X" + whole[6:]):  # first byte lost / changed
        with open(path, "wb") as f:
            f.write(damaged)
        with pytest.raises(DataError, match="does not begin with '#!AER-DAT2.0'") as e:
            data_events.read_cifar10dvs(path)
        assert path in str(e.value) and "\n" not in str(e.value)


def test_other_aedat_versions_are_named(tmp_path):
    v31 = str(tmp_path / "user01_lab.aedat")
    write_aedat31(v31, [polarity_packet(random_events(100))])
    with pytest.raises(DataError, match=r"is an AEDAT 3\.1 file, not AEDAT 2\.0 \(CIFAR10-DVS") as e:
        data_events.read_cifar10dvs(v31)
    assert v31 in str(e.value)
    v20 = str(tmp_path / "cifar10_cat_0.aedat")
    write_aedat2(v20, random_events(100))
    with pytest.raises(DataError, match=r"is an AEDAT 2\.0 file, not AEDAT 3\.1 \(DVS128 Gesture") as e:
        data_events.read_aedat31(v20)
    assert v20 in str(e.value)


@pytest.mark.parametrize("chip", [b"ch.unizh.ini.jaer.chip.retina.DVS128", b"ch.unizh.ini.jaer.chip.retina.Tmpdiff128",
                                  b"Dvs128"])
def test_dvs128_headers_read_without_a_word(tmp_path, chip):
    path = str(tmp_path / "a.aedat")
    write_aedat2(path, random_events(30), header=(b"#!AER-DAT2.0\r\n", b"# AEChip: " + chip + b"\r\n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(data_events.read_cifar10dvs(path)["t"]) == 30


def test_another_sensor_in_the_header_warns_and_is_read_as_before(tmp_path):
    ev = random_events(40)
    plain, davis = str(tmp_path / "plain.aedat"), str(tmp_path / "davis.aedat")
    write_aedat2(plain, ev)
    write_aedat2(davis, ev, header=DAVIS_HEADER)
    with pytest.warns(UserWarning, match="names the sensor eu.seebetter.ini.chips.davis.DAVIS240C, not a DVS128"):
        got = data_events.read_cifar10dvs(davis)
    expected = data_events.read_cifar10dvs(plain)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    # AEDAT 3.1: the '#Source' line
    path = str(tmp_path / "rec.aedat")
    write_aedat31(path, [polarity_packet(ev)], header=b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DAVIS240C\r\n"
                                                      b"#!END-HEADER\r\n")
    notes = []
    assert len(data_events.read_aedat31(path, notes)["t"]) == 40
    assert notes == [f"{path}: its header names the sensor DAVIS240C, not a DVS128"]


def test_address_bits_above_the_dvs128_layout_warn(tmp_path):
    ev = random_events(20)
    addr = (ev["y"] << 8) | (ev["x"] << 1) | ev["p"]
    addr[[3, 7, 11]] |= np.array([1 << 15, 1 << 22, 1 << 31])  # sync bit, a DAVIS y bit, jAER's special bit
    words = np.stack([addr, ev["t"]], axis=1).astype(">u4")  # (N, 2)
    path = str(tmp_path / "high.aedat")
    with open(path, "wb") as f:
        f.write(b"#!AER-DAT2.0\r\n" + words.tobytes())
    with pytest.warns(UserWarning, match=r"3 of its 20 events have address bits above the DVS128's 15 set"):
        got = data_events.read_cifar10dvs(path)
    # read as SpikingJelly reads them: the low 15 bits
    np.testing.assert_array_equal(got["x"], 127 - ev["y"])
    np.testing.assert_array_equal(got["y"], 127 - ev["x"])


def test_one_warning_per_cache_build_however_many_files(tmp_path):
    written = write_cifar10dvs_tree(tmp_path, per_class=2, events=20)
    odd = sorted(written)[:5]
    for path in odd:
        write_aedat2(path, written[path], header=DAVIS_HEADER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data_events.build_dvs_cache("cifar10dvs", tmp_path, 2)
    ours = [w for w in caught if "DVS128" in str(w.message)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert message.startswith("CIFAR10-DVS: 5 of the 20 recordings read may not come from a DVS128 sensor")
    assert odd[0] in message and "\n" not in message


def test_a_damaged_recording_stops_training_with_one_line(tmp_path, capsys):
    import train
    written = write_cifar10dvs_tree(tmp_path / "data", per_class=2, events=20)
    bad = sorted(written)[3]
    with open(bad, "r+b") as f:
        f.write(b"?")  # the first header byte
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", "cifar10dvs", "--data-dir", str(tmp_path / "data"), "--batch-size", "2",
                    "--output", str(tmp_path / "run")] + NARROW)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error")]  # (besides tqdm's bar)
    assert e.value.code == 2 and "Traceback" not in err and len(lines) == 1
    assert bad in lines[0] and "#!AER-DAT2.0" in lines[0]


def test_pixels_off_the_sensor_name_the_recording(tmp_path):
    folder = write_gesture_tree(tmp_path)
    ev = random_events(3000, seed=0, t0=1000, size=200)  # a bigger sensor's coordinates
    path = os.path.join(folder, "user01_fluorescent.aedat")
    write_aedat31(path, [polarity_packet(ev)])
    with pytest.raises(DataError, match="outside the 128x128 sensor") as e:
        data_events.build_dvs_cache("dvs128gesture", tmp_path, 2)
    assert str(e.value).startswith(path)


def test_unknown_class_folder_is_named(tmp_path):
    write_cifar10dvs_tree(tmp_path, per_class=1, events=5)
    write_aedat2(os.path.join(tmp_path, "CIFAR10-DVS", "aedat", "zebra", "x.aedat"), random_events(5))
    with pytest.raises(DataError, match="zebra") as e:
        data_events.build_dvs_datasets("cifar10dvs", tmp_path, T=2, download_missing=False)
    assert "not a CIFAR10-DVS class folder" in str(e.value)


def test_missing_labels_file_is_named(tmp_path):
    folder = write_gesture_tree(tmp_path)
    os.remove(os.path.join(folder, "user02_lab_labels.csv"))
    with pytest.raises(DataError, match="user02_lab_labels.csv"):
        data_events.build_dvs_datasets("dvs128gesture", tmp_path, T=2)


def test_bad_labels_row_and_unknown_dataset(tmp_path):
    csv = str(tmp_path / "x_labels.csv")
    write_labels(csv, [(12, 0, 10)])
    with pytest.raises(DataError, match="line 2"):
        data_events.read_labels_csv(csv)
    with pytest.raises(DataError, match="unknown event-camera dataset"):
        data_events.build_dvs_datasets("nmnist", tmp_path)


# ---------------------------------------------------------------- the official event augmentation

def _frames(T=3, H=12, W=10, seed=0):
    return torch.randint(0, 4, (T, 2, H, W), generator=torch.Generator().manual_seed(seed)).float()


def test_event_augment_translate_moves_whole_pixels():
    x = _frames()
    out = data_events.EventAugment.apply(x, "translate_x", 3.7)  # truncated to 3 px, as int() does officially
    assert torch.equal(out[..., 3:], x[..., :-3]) and not out[..., :3].any()
    out = data_events.EventAugment.apply(x, "translate_y", -2.2)
    assert torch.equal(out[..., :-2, :], x[..., 2:, :]) and not out[..., -2:, :].any()


def test_event_augment_rotate_and_shear():
    x = _frames(H=10, W=10)
    assert torch.equal(data_events.EventAugment.apply(x, "rotate", 0.0), x)
    quarter = data_events.EventAugment.apply(x, "rotate", 90.0)
    assert torch.equal(quarter, torch.rot90(x, 1, (-2, -1))) or torch.equal(quarter, torch.rot90(x, -1, (-2, -1)))
    rows = torch.arange(1, 11, dtype=torch.float32).view(1, 1, 10, 1).expand(2, 2, 10, 10)
    sheared = data_events.EventAugment.apply(rows, "shear_x", 0.3)
    # a shear along x keeps every pixel in its row, and moves rows away from the centre sideways
    assert ((sheared == rows) | (sheared == 0)).all() and not torch.equal(sheared, rows)


def test_event_augment_cutout_is_one_square_in_every_frame():
    torch.manual_seed(0)
    x = torch.ones(4, 2, 64, 64)
    out = data_events.EventAugment.apply(x, "cutout", 0.0)
    zero = out == 0
    assert torch.equal(zero, zero[:1, :1].expand_as(zero))  # the same square everywhere
    rows, cols = zero[0, 0].any(1).sum().item(), zero[0, 0].any(0).sum().item()
    assert rows == cols and zero[0, 0].sum().item() == rows * cols
    assert 0.001 * 64 * 64 - 2 * 64 <= rows * cols <= 0.11 * 64 * 64 + 2 * 64


def test_event_augment_draws_from_torch_and_flips():
    x = _frames()
    aug = data_events.EventAugment()
    torch.manual_seed(3)
    a = [aug(x) for _ in range(20)]
    torch.manual_seed(3)
    b = [aug(x) for _ in range(20)]
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and all(u.shape == x.shape for u in a)
    assert any(not torch.equal(u, x) for u in a)
    flip_only = data_events.EventAugment(flip=1.0)
    flip_only.OPS = ("identity",)
    assert torch.equal(flip_only(x), x.flip(-1))
    with pytest.raises(DataError, match="unknown event augmentation"):
        data_events.EventAugment.apply(x, "solarize", 1.0)


# ---------------------------------------------------------------- the DVS models (qkformer.py, family "dvs")

# Parameter counts, official keys and golden parity of the DVS presets: tests/test_model.py.


def test_dvs_layout():
    """Stage 1: stem D/16, D/8 (pool) | F = D/4 (pool), D/2 (pool), shortcut stride 4 from the
    stem's second layer; stage 2: F = conv, conv + pool, shortcut stride 2."""
    model = create_model("cifar10dvs", embed_dim=64, num_heads=4).eval()
    e1, e2 = model.stages[0].embed, model.stages[1].embed
    assert [u.conv.out_channels for u in e1.stem] == [4, 8]
    assert [not isinstance(u.pool, torch.nn.Identity) for u in e1.stem] == [False, True]
    assert [(u.conv.out_channels, not isinstance(u.pool, torch.nn.Identity)) for u in e1.main] == [(16, True), (32, True)]
    assert (e1.shortcut.conv.in_channels, e1.shortcut.subsample) == (8, 4)     # strided 1x1: see ConvBNLIF
    assert [not isinstance(u.pool, torch.nn.Identity) for u in e2.main] == [False, True]
    assert (e2.shortcut.conv.in_channels, e2.shortcut.subsample) == (32, 2)
    assert model.config.attention == ("token", "ssa") and model.config.downsampling == 16
    shapes = []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
    with torch.no_grad():
        assert model(torch.rand(3, 2, 2, 128, 128)).shape == (2, 10)   # (T, B, 2, H, W)
    assert shapes == [(3, 2, 32, 16, 16), (3, 2, 64, 8, 8)]


@pytest.mark.parametrize("overrides,message", [
    (dict(attention=("token", "token", "ssa")), "2 stages of the dvs family"),
    (dict(depths=1), "depths >= 2"),
    (dict(embed_dim=72, num_heads=2), "divisible by 16"),
    (dict(img_size=100), "multiple of 16"),
])
def test_dvs_invalid_configuration(overrides, message):
    with pytest.raises(ValueError, match=message):
        create_model("cifar10dvs", **overrides)


# The golden parity of both DVS models: tests/test_model.py::test_parity_with_official_code.


def test_official_family_rejects_unknown_embeddings():
    with pytest.raises(ValueError, match="no official QKFormer family"):
        official_family({"patch_embed1.proj7_conv.weight": torch.zeros(1), "head.weight": torch.zeros(1)})


# ---------------------------------------------------------------- training and evaluation

def test_event_batches_pass_the_per_batch_steps_and_reach_the_model_time_first():
    spec = data.get_dataset("cifar10dvs")
    batch = torch.randint(0, 5, (3, 4, 2, 8, 8), dtype=torch.uint8)       # (B, T, 2, H, W) counts
    x = data.normalize(batch, spec.mean, spec.std)                         # no normalisation
    assert x.shape == (3, 8, 8, 8) and x.dtype == torch.float32
    model_input = spec.model_input(x)
    assert model_input.shape == (4, 3, 2, 8, 8)                            # (T, B, 2, H, W)
    for t in range(4):
        for b in range(3):
            assert torch.equal(model_input[t, b], batch[b, t].float())
    # mixup blends whole samples: every frame of sample b with the same frames of sample B-1-b
    torch.manual_seed(0)
    mixed, targets = data.Mixup(0.5, prob=1.0, num_classes=10)(x, torch.tensor([0, 1, 2]))
    lam = targets[0, 0].item()
    assert 0 < lam < 1
    torch.testing.assert_close(spec.model_input(mixed),
                               lam * model_input + (1 - lam) * model_input.flip(1))
    # prob 0: never mixed
    same, targets = data.Mixup(0.5, prob=0.0, num_classes=10)(x, torch.tensor([0, 1, 2]))
    assert torch.equal(same, x) and targets.max() == 1


def test_official_dvs_recipes_are_train_defaults():
    import train_settings
    a = train_settings.resolve_args(train_settings.parse_args(["--dataset", "cifar10dvs"]))
    assert (a.model, a.T, a.batch_size, a.lr, a.min_lr, a.weight_decay) == ("cifar10dvs", 16, 16, 5e-3, 1e-5, 0.06)
    assert (a.epochs, a.cooldown_epochs, a.warmup_epochs, a.warmup_lr, a.warmup_prefix) == (96, 10, 10, 1e-5, False)
    assert (a.smoothing, a.mixup, a.mixup_prob, a.cutmix, a.mixup_off_epoch) == (0.1, 0.5, 0.5, 0.0, 75)
    assert (a.reprob, a.aa, a.hflip, a.dvs_split, a.amp, a.seed) == (0.0, None, 0.5, "official", "auto", 2021)
    g = train_settings.resolve_args(train_settings.parse_args(["--dataset", "dvs128gesture"]))
    assert (g.model, g.epochs, g.lr, g.min_lr, g.T) == ("dvs128gesture", 192, 1e-3, 2e-5, 16)
    # the CIFAR recipe keeps timm's default: every batch mixed
    assert train_settings.resolve_args(train_settings.parse_args(["--dataset", "cifar10"])).mixup_prob == 1.0


NARROW = ["--embed-dim", "32", "--T", "2", "--epochs", "1", "--warmup-epochs", "0", "--device", "cpu",
          "--workers", "0", "--no-download"]


def test_cifar10dvs_trains_one_epoch_and_evaluates(tmp_path, capsys):
    import evaluate
    import train
    write_cifar10dvs_tree(tmp_path / "data", per_class=11, events=200)
    run = tmp_path / "run"
    train.main(["--dataset", "cifar10dvs", "--data-dir", str(tmp_path / "data"), "--subset", "20",
                "--batch-size", "4", "--output", str(run)] + NARROW)
    assert os.path.isdir(tmp_path / "data" / "CIFAR10-DVS" / "frames_T2")   # --T 2: its own cache
    with open(run / "log.jsonl") as f:
        (record,) = [json.loads(line) for line in f]
    assert np.isfinite(record["train_loss"]) and record["top1"] is not None
    with open(run / "args.json") as f:
        assert json.load(f)["dvs_split"] == "official"

    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(run / "last.pt"), "--dataset", "cifar10dvs", "--data-dir",
                          str(tmp_path / "data"), "--device", "cpu", "--batch-size", "5",
                          "--pictures", "2", "--output", str(out)]) == 0
    with open(out / "metrics.json") as f:
        m = json.load(f)
    assert m["images"] == 10 and m["T"] == 2 and m["input_kind"] == "event counts"   # 1 test recording per class
    assert "event counts" in m["input_counting"]
    e = m["energy"]
    assert e["mac_layers"] == [] and e["MACs_first_layer"] == 0 and evaluate.EVENT_INPUT_NOTE in e["notes"]
    first = e["layers"][0]
    assert first["name"] == "stages.0.embed.stem.0.conv" and first["kind"] == "AC"
    # the first conv's rate is the mean event count per input element of the test frames
    _, test = data_events.build_dvs_datasets("cifar10dvs", tmp_path / "data", T=2)
    mean_count = torch.stack([test[i][0] for i in range(len(test))]).mean().item()
    assert first["input_rate"] == pytest.approx(mean_count, rel=1e-6)
    assert first["ops"] == pytest.approx(mean_count * 2 * first["macs"], rel=1e-6)
    picture = out / "event_frames.png"
    assert str(picture) in m["pictures"] and (out / "token_masks.png").is_file()
    from PIL import Image
    with Image.open(picture) as img:
        assert img.format == "PNG" and img.size[0] > 100
        pixels = np.asarray(img.convert("RGB")).astype(int)
    assert ((pixels[..., 0] > 150) & (pixels[..., 2] < 80)).any()      # ON events in red ...
    assert ((pixels[..., 2] > 150) & (pixels[..., 0] < 80)).any()      # ... OFF events in blue


def test_dvs128gesture_trains_one_epoch(tmp_path):
    import train
    write_gesture_tree(tmp_path / "data")
    run = tmp_path / "run"
    train.main(["--dataset", "dvs128gesture", "--data-dir", str(tmp_path / "data"), "--batch-size", "3",
                "--output", str(run)] + NARROW)
    with open(run / "log.jsonl") as f:
        (record,) = [json.loads(line) for line in f]
    assert np.isfinite(record["train_loss"]) and record["top1"] is not None


@pytest.mark.parametrize("extra, message", [
    (["--aa", "rand-m9-n1-mstd0.4-inc1"], "RandAugment works on photographs"),
    (["--dataset", "dvs128gesture", "--dvs-split", "random"], "own train/test split"),
])
def test_dvs_options_that_do_not_apply_are_refused(tmp_path, capsys, extra, message):
    import train
    write_cifar10dvs_tree(tmp_path / "data", per_class=11, events=20, classes=None)
    write_gesture_tree(tmp_path / "data")
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", "cifar10dvs", "--data-dir", str(tmp_path / "data"), "--batch-size", "2",
                    "--output", str(tmp_path / "run")] + NARROW + extra)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_evaluate_uses_the_split_the_checkpoint_was_trained_with(tmp_path):
    import evaluate
    write_cifar10dvs_tree(tmp_path / "data", per_class=11, events=30)
    model = create_model("cifar10dvs", embed_dim=32, T=2)
    path = tmp_path / "random.pt"
    import dataclasses
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.config),
                "args": {"dvs_split": "random"}}, path)
    common = ["--checkpoint", str(path), "--dataset", "cifar10dvs", "--data-dir", str(tmp_path / "data"),
              "--device", "cpu", "--pictures", "0", "--batch-size", "10"]
    counts = []  # (the first layer's mean input: recordings differ in their numbers of events)
    for extra, split in (([], "random"), (["--dvs-split", "official"], "official")):
        out = tmp_path / split
        assert evaluate.main(common + extra + ["--output", str(out)]) == 0
        with open(out / "metrics.json") as f:
            m = json.load(f)
        assert m["data_options"] == {"T": 2, "dvs_split": split} and m["images"] == 10
        counts.append(m["input_rates"]["stages.0.embed.stem.0.conv"])   # mean event count
    assert counts[0] != counts[1]            # other test recordings
