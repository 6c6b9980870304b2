"""Check every CUDA code path of this project in one call, in at most 8 minutes on one GPU.

    python scripts/gpu_check.py             # from the repository root, or from anywhere

Prints one line per check as soon as it is known, PASS, FAIL or SKIP, then a summary; the
exit code is 1 if anything failed. A check still running when its time is up is killed and
reported as FAIL, with every line before it kept, and the checks it did not reach are named.
The checks:
  * environment: the versions it runs on (Python, PyTorch, CUDA, cuDNN, Triton), the GPUs,
    native bf16; a PyTorch outside the supported range (README.md, 'Set up and run') is said;
  * cpu: the neuron's precision rule and kernel bookkeeping (tests/test_neuron.py, the
    parts that need no compiler), which the CUDA tests build on;
  * cuda: every test of tests/test_cuda.py, one line each (kernels eager and compiled
    against the CPU, golden parity in float64, autocast dtypes, the model with compiled
    kernels under bf16 and fp16 and inference_mode, training steps, grad-scaler skips, a
    resume across memory layouts, no host read per batch, train.py bf16 resume and fp16
    clipping, two NCCL processes when there are two GPUs, benchmark.py and evaluate.py);
  * benchmark: benchmark.py end to end on the GPU with --amp, its kernels compiled (a
    compile error fails), and the data phase (on a fake CIFAR-10 it writes), or on the CPU
    without a GPU (a dry run).
Without a GPU the CUDA checks are reported as SKIP, not FAIL, and the rest runs.
"""
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 480                                # all checks together: 8 minutes
LIMITS_S = {"cpu": 60, "benchmark": 90}       # the cuda step gets what the others leave
DRY_RUN_BENCHMARK_S = 300                     # without a GPU (no budget to keep): a slow CPU's time
SUPPORTED = ((2, 11), (2, 13))                # PyTorch versions the code is written and tested for
results = []                                  # (status, step)
start = time.time()


def report(status, step, detail=""):
    results.append((status, step))
    print(f"{status:<4} {step}" + (f"  ({detail})" if detail else ""), flush=True)


def left():
    return BUDGET_S - (time.time() - start)


def stream(argv, timeout, env=None, on_line=print):
    """Run a command in the repository root in a session of its own, handing each line of its
    output to on_line as it comes; at `timeout` the whole session (its own subprocesses too)
    is killed. Returns its return code, or None if it was killed."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
    lines = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)
    threading.Thread(target=read, daemon=True).start()
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.time()))
        except queue.Empty:
            continue
        if line is None:
            return proc.wait()
        on_line(line.rstrip("\n"))
    os.killpg(proc.pid, signal.SIGKILL)           # the session this command started, nothing else
    proc.wait()
    return None


RESULT = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
SUMMARY = re.compile(r"^(FAILED|ERROR) (tests/\S+::\S+?)(?: - (.*))?$")


def pytest_steps(prefix, args, timeout):
    """Run pytest -v; one line per test as it ends (its time: since the previous one), the
    failures' messages when pytest ends, and the tests not reached if it is killed."""
    seen, collected, last = [], [0], [time.time()]
    statuses = {"PASSED": "PASS", "XPASS": "PASS", "FAILED": "FAIL", "ERROR": "FAIL",
                "SKIPPED": "SKIP", "XFAIL": "SKIP"}

    def on_line(line):
        match = RESULT.match(line)
        found = re.search(r"collected (\d+) items?", line)
        if found:
            collected[0] = int(found.group(1))
        elif match:
            name, status = match.group(1).split("::", 1)[1], match.group(2)
            if status == "ERROR" and name in seen:     # an error at teardown, after its result
                report("FAIL", f"{prefix}: {name} (teardown)")
                return
            seen.append(name)
            report(statuses[status], f"{prefix}: {name} ({time.time() - last[0]:.0f} s)")
            last[0] = time.time()
        elif SUMMARY.match(line):
            kind, nodeid, message = SUMMARY.match(line).groups()
            print(f"     {nodeid.split('::', 1)[1]}: {(message or kind)[:300]}", flush=True)

    code = stream([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfE", *args],
                     timeout, on_line=on_line)
    if code is None:
        where = ("the next one was still running" if len(seen) < collected[0]
                 else "pytest was still finishing")
        report("FAIL", f"{prefix}: stopped at its limit of {timeout:.0f} s after {len(seen)} of "
                       f"{collected[0]} tests; {where}")
    elif code not in (0, 5) and not any(s == "FAIL" for s, step in results if step.startswith(prefix)):
        report("FAIL", prefix, f"pytest exit {code}")


def environment():
    """The versions this check runs on, as one PASS line (a note if PyTorch is outside SUPPORTED)."""
    import torch
    version = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2])
    versions = f"Python {platform.python_version()}, torch {torch.__version__}"
    if SUPPORTED[0] <= version <= SUPPORTED[1]:
        versions += f" (supported: {SUPPORTED[0][0]}.{SUPPORTED[0][1]} to {SUPPORTED[1][0]}.{SUPPORTED[1][1]})"
    else:
        versions += (f" (outside the supported {SUPPORTED[0][0]}.{SUPPORTED[0][1]} to "
                     f"{SUPPORTED[1][0]}.{SUPPORTED[1][1]}: failures may come from that)")
    cuda = torch.cuda.is_available()
    if cuda:
        try:
            import triton
            versions += f", triton {triton.__version__}"
        except ImportError:
            versions += ", no triton (nothing compiles on the GPU: the compiled checks fail)"
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        detail = (f"{versions}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, {names}, "
                  f"native bf16: {torch.cuda.is_bf16_supported(including_emulation=False)}")
    else:
        detail = f"{versions}, no CUDA: the CUDA steps are skipped (a dry run)"
    report("PASS", "environment", detail)
    return cuda


def benchmark(cuda, timeout):
    """benchmark.py end to end with the data phase; on the GPU its kernels compiled."""
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from _fakedata import write_cifar
        write_cifar(tmp, per_file=40, n_test=8)                 # 200 training images
        out = os.path.join(tmp, "bench.json")
        device = ["--device", "cuda", "--amp"] if cuda else ["--device", "cpu", "--amp"]
        printed = []
        code = stream([sys.executable, "benchmark.py", "--model", "tiny", "--batch-size", "4",
                          "--T", "2", "--steps", "2", "--warmup", "1", *device,
                          "--phases", "train,inference,data", "--dataset", "cifar10",
                          "--data-dir", tmp, "--data-workers", "0,2", "--data-batches", "4",
                          "--output", out], timeout, on_line=printed.append,
                         env={"QKFORMER_LIF": "compiled" if cuda else "eager"})
    text = "\n".join(printed)
    step = (f"benchmark: {'cuda --amp, kernels compiled' if cuda else 'cpu dry run (--amp noted as ignored)'}"
            f", data phase")
    ok = code == 0 and ("images/s" in text) and (cuda or "--amp auto ignored" in text)
    figures = "; ".join(line.split("(")[0].strip() for line in printed
                        if line.strip().startswith(("train:", "inference:")))
    why = "killed at its limit" if code is None else text.strip()[-400:]
    report("PASS" if ok else "FAIL", step, figures if ok else why)


def main():
    cuda = environment()
    pytest_steps("cpu", ["tests/test_neuron.py", "-k", "bf16 or long_sequences or reports_what_ran "
                         "or autocast_dtype or device_settings or float32_matches"],
                 timeout=min(LIMITS_S["cpu"], left()))
    pytest_steps("cuda", ["tests/test_cuda.py"], timeout=max(30, left() - LIMITS_S["benchmark"]))
    benchmark(cuda, timeout=max(30, min(LIMITS_S["benchmark"], left())) if cuda else DRY_RUN_BENCHMARK_S)

    failed = [step for status, step in results if status == "FAIL"]
    counts = {s: sum(1 for r, _ in results if r == s) for s in ("PASS", "FAIL", "SKIP")}
    print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"in {time.time() - start:.0f} s" + ("" if cuda else " (no GPU here: CUDA steps skipped)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
