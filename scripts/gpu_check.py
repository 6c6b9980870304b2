"""Check every CUDA code path of this project in one call, in under 10 minutes on one GPU.

    python scripts/gpu_check.py             # from the repository root, or from anywhere

Prints one line per step, PASS, FAIL or SKIP (with the reason), then a summary; the exit
code is 1 if anything failed. The steps:
  * environment: PyTorch, CUDA, the GPUs, native bf16;
  * cpu: the neuron's precision rule and kernel bookkeeping (tests/test_neuron.py, the
    parts that need no compiler), which the CUDA tests build on;
  * cuda: every test of tests/test_cuda.py, one line each (kernels eager and compiled
    against the CPU, golden parity in float64, autocast dtypes, training steps, train.py
    bf16 resume and fp16 clipping, two NCCL processes when there are two GPUs,
    benchmark.py and evaluate.py on CUDA);
  * benchmark: benchmark.py end to end on the GPU with --amp and the data phase (on a
    fake CIFAR-10 it writes), or on the CPU without a GPU (a dry run).
Without a GPU the CUDA steps are reported as SKIP, not FAIL, and the rest runs.
"""
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 600
results = []                                  # (status, step, detail)
start = time.time()


def report(status, step, detail=""):
    results.append((status, step))
    print(f"{status:<4} {step}" + (f"  ({detail})" if detail else ""), flush=True)


def run(argv, timeout, env=None):
    """Run a command in the repository root; (return code, stdout + stderr)."""
    left = max(30, BUDGET_S - (time.time() - start))
    try:
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                              timeout=min(timeout, left), env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {min(timeout, left):.0f} s"
    return proc.returncode, proc.stdout + proc.stderr


def pytest_steps(prefix, args, timeout):
    """Run pytest; one line per test from its JUnit XML report."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "report.xml")
        code, out = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         f"--junitxml={xml}", *args], timeout)
        if not os.path.exists(xml):
            report("FAIL", prefix, f"pytest did not run (exit {code}): {out.strip()[-300:]}")
            return
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{prefix}: {case.get('name')} ({float(case.get('time', 0)):.0f} s)"
            failed = case.find("failure") if case.find("failure") is not None else case.find("error")
            skipped = case.find("skipped")
            if failed is not None:
                report("FAIL", name, (failed.get("message") or "").splitlines()[0][:200]
                       if failed.get("message") else "")
            elif skipped is not None:
                report("SKIP", name, skipped.get("message", "")[:100])
            else:
                report("PASS", name)
        if code not in (0, 5) and not any(s == "FAIL" for s, step in results if step.startswith(prefix)):
            report("FAIL", prefix, f"pytest exit {code}: {out.strip()[-300:]}")


def main():
    import torch
    cuda = torch.cuda.is_available()
    if cuda:
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        detail = (f"torch {torch.__version__}, CUDA {torch.version.cuda}, {names}, native bf16: "
                  f"{torch.cuda.is_bf16_supported(including_emulation=False)}")
    else:
        detail = f"torch {torch.__version__}, no CUDA: the CUDA steps are skipped (a dry run)"
    report("PASS", "environment", detail)

    pytest_steps("cpu", ["tests/test_neuron.py", "-k", "bf16 or long_sequences or reports_what_ran "
                         "or autocast_dtype or device_settings or float32_matches"], timeout=180)
    pytest_steps("cuda", ["tests/test_cuda.py"], timeout=480)

    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from _fakedata import write_cifar
        write_cifar(tmp, per_file=40, n_test=8)                 # 200 training images
        out = os.path.join(tmp, "bench.json")
        device = ["--device", "cuda", "--amp"] if cuda else ["--device", "cpu", "--amp"]
        code, text = run([sys.executable, "benchmark.py", "--model", "tiny", "--batch-size", "4",
                          "--T", "2", "--steps", "1", "--warmup", "1", *device,
                          "--phases", "train,inference,data", "--dataset", "cifar10",
                          "--data-dir", tmp, "--data-workers", "0,2", "--data-batches", "4",
                          "--output", out], timeout=240,
                         env={"QKFORMER_LIF": "auto" if cuda else "eager"})
        step = f"benchmark: {'cuda --amp' if cuda else 'cpu dry run (--amp noted as ignored)'}, data phase"
        ok = code == 0 and ("images/s" in text) and (cuda or "--amp auto ignored" in text)
        report("PASS" if ok else "FAIL", step, "" if ok else text.strip()[-400:])

    failed = [step for status, step in results if status == "FAIL"]
    counts = {s: sum(1 for r, _ in results if r == s) for s in ("PASS", "FAIL", "SKIP")}
    print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"in {time.time() - start:.0f} s" + ("" if cuda else " (no GPU here: CUDA steps skipped)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
