"""Kernel tests run the Triton interpreter on CPU (set before triton is imported); on CUDA they run compiled."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("KERNELS_POISON", "1")  # kernel outputs start as NaN / garbage bytes
