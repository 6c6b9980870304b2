"""Writers of small event-camera recordings in the official file formats, for tests/test_dvs.py.

CIFAR10-DVS: AEDAT 2.0 (ASCII '#' header, big-endian uint32 pairs (address, timestamp)).
DVS128 Gesture: AEDAT 3.1 (header ending '#!END-HEADER\\r\\n', then 28-byte packet headers
and events) plus <name>_labels.csv, trials_to_train.txt / trials_to_test.txt.
The writers take the raw sensor values, so the tests can check every decoding step.
"""
import os
import struct

import numpy as np


def random_events(n, seed=0, t0=0, size=128):
    """n events with increasing timestamps: dict t, x, y, p (raw sensor values)."""
    rng = np.random.default_rng(seed)
    return dict(t=t0 + np.cumsum(rng.integers(0, 50, n)).astype(np.int64),
                x=rng.integers(0, size, n), y=rng.integers(0, size, n), p=rng.integers(0, 2, n))


def aedat2_bytes(ev, header=(b"#!AER-DAT2.0\r\n", b"# This is a raw AE data file\r\n")):
    """AEDAT 2.0: address bit 0 polarity, bits 1-7 x, bits 8-14 y; big-endian (address, timestamp)."""
    addr = (np.asarray(ev["y"], np.uint32) << 8) | (np.asarray(ev["x"], np.uint32) << 1) | np.asarray(ev["p"], np.uint32)
    words = np.stack([addr, np.asarray(ev["t"], np.uint32)], axis=1).astype(">u4")  # (N, 2)
    return b"".join(header) + words.tobytes()


def write_aedat2(path, ev, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(aedat2_bytes(ev, **kw))


def packet(etype, body, size, capacity, overflow=0):
    """One AEDAT 3.1 packet: 28-byte little-endian header (type, source, size, offset, tsOverflow,
    capacity, number, valid) and its body."""
    return struct.pack("<HHIIIIII", etype, 1, size, 4, overflow, capacity, capacity, capacity) + body


def polarity_packet(ev, overflow=0):
    """A polarity packet (type 1); timestamps are the low 31 bits, overflow the rest."""
    d = ((np.asarray(ev["x"], np.uint32) << 17) | (np.asarray(ev["y"], np.uint32) << 2)
         | (np.asarray(ev["p"], np.uint32) << 1) | 1)  # bit 0: valid
    ts = np.asarray(ev["t"], np.int64) - (overflow << 31)
    assert ts.min() >= 0 and ts.max() < 2 ** 31
    body = np.stack([d, ts.astype(np.uint32)], axis=1).astype("<u4").tobytes()  # (N, 2)
    return packet(1, body, 8, len(d), overflow)


def special_packet(n=3):
    """A special-event packet (type 0, e.g. timestamp resets): readers must skip it."""
    return packet(0, np.arange(2 * n, dtype="<u4").tobytes(), 8, n)


AEDAT31_HEADER = b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n#!END-HEADER\r\n"


def write_aedat31(path, packets, header=AEDAT31_HEADER):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(header + b"".join(packets))


def write_labels(path, rows):
    """rows: (class 1..11, start_us, end_us)."""
    with open(path, "w") as f:
        f.write("class,startTime_usec,endTime_usec\n")
        for r in rows:
            f.write(",".join(str(v) for v in r) + "\n")


def write_cifar10dvs_tree(root, per_class=11, events=60, classes=None):
    """root/CIFAR10-DVS/aedat/<class>/cifar10_<class>_<i>.aedat for every class; returns the events by path."""
    import data_events
    written = {}
    for c, cls in enumerate(classes or data_events.CIFAR10DVS_CLASSES):
        for i in range(per_class):
            ev = random_events(events + i, seed=100 * c + i)
            path = os.path.join(root, "CIFAR10-DVS", "aedat", cls, f"cifar10_{cls}_{i}.aedat")
            write_aedat2(path, ev)
            written[path] = ev
    return written


def write_gesture_tree(root, users=("user01_fluorescent", "user02_lab"), test_users=("user24_led",)):
    """root/DVS128Gesture/DvsGesture/ with recordings, labels files and trials_to_*.txt; returns the folder."""
    folder = os.path.join(root, "DVS128Gesture", "DvsGesture")
    os.makedirs(folder, exist_ok=True)
    for k, name in enumerate(users + test_users):
        ev = random_events(3000, seed=k, t0=1000)
        half = len(ev["t"]) // 2
        first = {key: v[:half] for key, v in ev.items()}
        second = {key: v[half:] for key, v in ev.items()}
        write_aedat31(os.path.join(folder, name + ".aedat"), [polarity_packet(first), special_packet(),
                                                              polarity_packet(second)])
        t = ev["t"]
        write_labels(os.path.join(folder, name + "_labels.csv"),
                     [(1 + k, t[10], t[900]), (11, t[900], t[2500]), (3, t[2600], t[-1] + 1)])
    for split, names in (("train", users), ("test", test_users)):
        with open(os.path.join(folder, f"trials_to_{split}.txt"), "w") as f:
            f.write("".join(n + ".aedat\n" for n in names) + "\n")
    return folder
