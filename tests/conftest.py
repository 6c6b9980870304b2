"""Shared test set-up.

The tests run the LIF neuron's eager kernels by default: compiling the fused kernels
(neuron_fast.py, torch.compile) costs tens of seconds per process, which the many short
test processes (DDP, CLI runs) would pay again and again. test_neuron.py checks the
compiled kernels against the reference loop explicitly. Also: a local HTTP server for
the download tests (CIFAR, CIFAR10-DVS); one thread and a fake CIFAR-10 for the training tests.
"""
import functools
import http.server
import os
import sys
import threading

import pytest
import torch

os.environ.setdefault("QKFORMER_LIF", "eager")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def http_server(tmp_path):
    """Serve the folder tmp_path/www on 127.0.0.1 (the downloads' tests); yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def one_thread():
    """The tiny training models are too small to gain from a second thread, and on a busy
    2-core machine OpenMP threads waiting for each other make them several times slower.
    Modules use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A fake CIFAR-10 in the official layout: 40 training images, 16 test images."""
    from _fakedata import write_cifar
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, per_file=8, n_test=16)
    return str(root)
