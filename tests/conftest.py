"""Shared test set-up.

The tests run the LIF neuron's eager kernels by default: compiling the fused kernels
(neuron.py, torch.compile) costs tens of seconds per process, which the many short
test processes (DDP, CLI runs) would pay again and again. test_neuron.py checks the
compiled kernels against the reference loop explicitly.
"""
import os
import sys

os.environ.setdefault("QKFORMER_LIF", "eager")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
