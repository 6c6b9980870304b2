"""Shared test set-up.

The tests run the LIF neuron's eager kernels by default: compiling the fused kernels
(neuron.py, torch.compile) costs tens of seconds per process, which the many short
test processes (DDP, CLI runs) would pay again and again. test_neuron.py checks the
compiled kernels against the reference loop explicitly. Also: a local HTTP server for
the download tests (CIFAR, CIFAR10-DVS).
"""
import functools
import http.server
import os
import sys
import threading

import pytest

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
