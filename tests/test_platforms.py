"""Students' laptops: the entry scripts on Windows and macOS, checked here on Linux by simulation.

What differs on those systems, and how each test makes it happen on Linux:
  * Windows has neither `fcntl` nor `resource`: both are removed from sys.modules and their
    import is blocked (a finder at the head of sys.meta_path), then the entry modules are
    imported afresh (importlib; checkpoints.py first, which holds the folder lock that train.py
    and evaluate.py use); Windows' `msvcrt.locking` is stood in for by a module that behaves as
    it does (an exclusive byte-range lock, EACCES when another holder has it);
  * macOS gives getrusage's ru_maxrss in bytes, Linux in KiB: sys.platform is set to "darwin";
  * Windows' peak memory comes from GetProcessMemoryInfo: ctypes.WinDLL is stood in for;
  * a laptop without a C++ compiler: a real subprocess whose CXX names no program, in which
    torch.compile really fails.
The lock itself is also checked across two real processes, one of them killed.
"""
import ctypes
import errno
import importlib
import importlib.abc
import os
import subprocess
import sys
import types

import pytest
import torch

import benchmark
import checkpoints
import train_guards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIX_ONLY = ("fcntl", "resource")
# checkpoints first (it holds the lock; the others import it), train_guards before train
ENTRY_MODULES = ("checkpoints", "train_guards", "train", "evaluate", "benchmark")


class BlockImports(importlib.abc.MetaPathFinder):
    """Refuses to import the named modules, as on a system that lacks them."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by the test)", name=fullname)
        return None


def without_modules(monkeypatch, names):
    """From here to the end of the test, importing any of `names` fails."""
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "meta_path", [BlockImports(names), *sys.meta_path])


def import_fresh(monkeypatch, name):
    """Import module `name` anew (its code runs again); the old module returns after the test."""
    monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module(name)


def fake_msvcrt(real_fcntl):
    """Windows' msvcrt.locking, as far as checkpoints.lock_folder uses it: LK_NBLCK locks bytes from
    the file position, at once or not at all, and a region another holder has locked gives
    OSError EACCES. Built on the real flock (one region: byte 0), which conflicts between
    open files as Windows' locks do between handles."""
    def locking(fd, mode, nbytes):
        assert mode == module.LK_NBLCK and nbytes == 1 and os.lseek(fd, 0, os.SEEK_CUR) == 0
        try:
            real_fcntl.flock(fd, real_fcntl.LOCK_EX | real_fcntl.LOCK_NB)
        except BlockingIOError:
            raise PermissionError(errno.EACCES, "Permission denied") from None
    module = types.ModuleType("msvcrt")
    module.LK_NBLCK, module.locking = 2, locking
    return module


# ---------------------------------------------------------------- no fcntl, no resource (Windows)

def test_entry_modules_import_without_fcntl_and_resource(monkeypatch):
    without_modules(monkeypatch, UNIX_ONLY + ("msvcrt",))
    with pytest.raises(ImportError):
        import fcntl  # noqa: F401   (the block works)
    fresh = {name: import_fresh(monkeypatch, name) for name in ENTRY_MODULES}
    assert fresh["checkpoints"].fcntl is None and fresh["checkpoints"].msvcrt is None
    assert fresh["train"].TrainError is fresh["train_guards"].TrainError        # train took the fresh one
    assert callable(fresh["train"].main) and callable(fresh["evaluate"].main)
    assert fresh["benchmark"].peak_resident_bytes() is None      # Linux without `resource`


def test_the_windows_lock_refuses_a_second_holder_and_lets_go(monkeypatch, tmp_path):
    import fcntl as real_fcntl
    without_modules(monkeypatch, UNIX_ONLY)
    monkeypatch.setitem(sys.modules, "msvcrt", fake_msvcrt(real_fcntl))
    files = import_fresh(monkeypatch, "checkpoints")
    guards = import_fresh(monkeypatch, "train_guards")
    assert files.fcntl is None and files.msvcrt is sys.modules["msvcrt"]
    first = guards.lock_run_folder(str(tmp_path))
    assert first is not None
    assert guards.lock_run_folder(str(tmp_path)) is None                  # another train.py: refused
    first.close()                                                         # the run ends
    again = guards.lock_run_folder(str(tmp_path))
    assert again is not None
    again.close()


def test_the_train_script_refuses_a_held_folder_on_windows(monkeypatch, tmp_path, cifar, capsys):
    import fcntl as real_fcntl
    without_modules(monkeypatch, UNIX_ONLY)
    monkeypatch.setitem(sys.modules, "msvcrt", fake_msvcrt(real_fcntl))
    import_fresh(monkeypatch, "checkpoints")
    guards = import_fresh(monkeypatch, "train_guards")
    train = import_fresh(monkeypatch, "train")
    out = tmp_path / "run"
    out.mkdir()
    held = guards.lock_run_folder(str(out))
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", "cifar10", "--data-dir", cifar, "--output", str(out), "--model", "tiny",
                    "--embed-dim", "32", "--num-heads", "1", "--depths", "3", "--T", "1", "--batch-size", "8",
                    "--epochs", "1", "--subset", "8", "--workers", "0", "--warmup-epochs", "0", "--no-low-memory"])
    held.close()
    assert e.value.code == 2
    assert "error: another train.py is running in" in capsys.readouterr().err
    assert not (out / "last.pt").exists()


def test_without_any_lock_the_run_goes_on_with_a_note(monkeypatch, tmp_path, capsys):
    without_modules(monkeypatch, UNIX_ONLY + ("msvcrt",))
    import_fresh(monkeypatch, "checkpoints")
    guards = import_fresh(monkeypatch, "train_guards")
    lock = guards.lock_run_folder(str(tmp_path))
    assert lock is not None and not lock.closed
    lock.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: cannot lock the run folder") and "second train.py" in err[0]


def test_a_file_system_that_cannot_lock_gives_a_note(monkeypatch, tmp_path, capsys):
    """Some network file systems answer flock with ENOLCK: the run goes on, and says so."""
    def no_locks(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(checkpoints.fcntl, "flock", no_locks)
    lock = train_guards.lock_run_folder(str(tmp_path))
    assert lock is not None
    lock.close()
    assert "note: cannot lock the run folder" in capsys.readouterr().err


# ---------------------------------------------------------------- the lock across real processes

HOLD = ("import sys; sys.path.insert(0, {root!r}); import train_guards; "
        "lock = train_guards.lock_run_folder({folder!r}); print('held' if lock else 'refused', flush=True); "
        "sys.stdin.read()")


def test_a_second_process_is_refused_until_the_first_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT, folder=str(tmp_path))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train_guards.lock_run_folder(str(tmp_path)) is None
    finally:
        holder.kill()                               # however it ends, the system lets go
        holder.wait()
    lock = train_guards.lock_run_folder(str(tmp_path))
    assert lock is not None
    lock.close()


# ---------------------------------------------------------------- peak memory, per platform

def linux_peak_kib():
    """VmHWM of this process (Linux: its peak resident memory, in kB = KiB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_peak_memory_in_bytes_on_linux_and_macos(monkeypatch):
    linux = benchmark.peak_resident_bytes()
    assert abs(linux / 1024 - linux_peak_kib()) <= 0.05 * linux_peak_kib()   # ru_maxrss: KiB on Linux
    monkeypatch.setattr(sys, "platform", "darwin")                          # macOS: ru_maxrss in bytes
    darwin = benchmark.peak_resident_bytes()
    assert abs(darwin - linux / 1024) <= 0.05 * darwin                      # taken as it comes


def test_peak_memory_on_windows(monkeypatch):
    """GetProcessMemoryInfo gets a PROCESS_MEMORY_COUNTERS of the right size (72 bytes on
    64-bit Windows, 40 on 32-bit) and the peak working set is read from the right field."""
    calls = []

    def get_info(process, counters, size):
        calls.append((process, size))
        assert size == ctypes.sizeof(counters.contents) == counters.contents.cb
        counters.contents.PeakWorkingSetSize = 2_260_000_000
        counters.contents.WorkingSetSize = 1
        return 1
    kernel32 = types.SimpleNamespace(GetCurrentProcess=lambda: -1, K32GetProcessMemoryInfo=get_info)
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(ctypes, "WinDLL", lambda name: kernel32, raising=False)
    assert benchmark.peak_resident_bytes() == 2_260_000_000 and calls == [(-1, calls[0][1])]
    assert calls[0][1] == (72 if ctypes.sizeof(ctypes.c_void_p) == 8 else 40)
    kernel32.K32GetProcessMemoryInfo = lambda *a: 0                          # the call failed
    assert benchmark.peak_resident_bytes() is None
    monkeypatch.delattr(ctypes, "WinDLL")                                    # no such library
    assert benchmark.peak_resident_bytes() is None
    assert benchmark.memory_text(None).startswith("n/a") and benchmark.memory_text(2.26) == "2.26 GB"


# ---------------------------------------------------------------- no C++ compiler

NO_COMPILER = """
import sys, torch
sys.path.insert(0, {root!r})
import neuron_fast
from neuron import LIFNode, lif_reference
x = (torch.randn(4, 3, 50) + 0.8).requires_grad_()
out = LIFNode()(x)
out.sum().backward()
LIFNode()(x.detach())
kernels = (neuron_fast.lif_forward_kernel, neuron_fast.lif_backward_kernel, neuron_fast.lif_spikes_kernel)
print([k.used for k in kernels], torch.equal(out, lif_reference(x.detach(), 2.0)))
"""


def test_without_a_compiler_the_neurons_say_once_why_they_run_eagerly(tmp_path):
    """A real torch.compile that finds no C++ compiler (CXX names none, and the compiled-code
    cache is empty): one line for all kernels, the same spikes."""
    env = dict(os.environ, QKFORMER_LIF="auto", CXX=str(tmp_path / "no-such-compiler"),
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", NO_COMPILER.format(root=ROOT)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['eager', 'eager', 'eager'] True"
    import neuron_fast
    assert done.stderr.strip() == neuron_fast.BUILD_NOTE.format(reason="no C++ compiler found")  # one line


class InvalidCxxCompiler(RuntimeError):
    """Named as torch._inductor.exc's: what torch.compile raises, wrapped, without a compiler."""


class CppCompileError(RuntimeError):
    """Named as torch._inductor.exc's: a compiler that fails (macOS without OpenMP: omp.h)."""


class InductorError(RuntimeError):
    """Named as torch._inductor.exc's: the wrapper, holding the cause in inner_exception."""

    def __init__(self, inner):
        super().__init__(f"{type(inner).__name__}: {inner}")
        self.inner_exception = inner


def raised(error):
    """The exception torch.compile raises for `error`: wrapped twice, as torch 2.13 does."""
    try:
        try:
            raise InductorError(error)
        except InductorError as inner:
            raise RuntimeError("backend compiler failed") from inner
    except RuntimeError as e:
        return e


def test_a_failing_compiler_is_said_once_for_all_kernels(monkeypatch, capsys):
    import neuron_fast
    previous = neuron_fast.get_backend()
    neuron_fast.set_backend("auto")
    try:
        assert neuron_fast.build_failure(raised(InvalidCxxCompiler("No working C++ compiler"))) == \
            "no C++ compiler found"
        assert neuron_fast.build_failure(RuntimeError("no bf16 here")) is None
        kernels = [neuron_fast.CompiledOrEager(lambda x: x * 2) for _ in range(3)]
        asked = []

        def fails_to_build(x):
            asked.append(x.dtype)
            raise raised(CppCompileError("fatal error: 'omp.h' file not found"))
        x = torch.ones(4, 3)
        for kernel in kernels:
            kernel.compiled = fails_to_build
            assert torch.equal(kernel(x), x * 2) and kernel.used == "eager"
            kernel(x)                                                   # not asked again
        assert asked == [torch.float32] * 3                             # another kernel may build
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [neuron_fast.BUILD_NOTE.format(reason="the C++ compiler failed")]
    finally:
        neuron_fast.set_backend(previous)
