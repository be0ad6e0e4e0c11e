import os
import sys

# `python -m pytest` from the repository root puts the root on sys.path, where the folders kernels/ and adapters/
# (installed as vltok.kernels / vltok.adapters) would shadow the PyPI package `kernels` that transformers >= 5.25
# imports. vltok is installed (editable), so the root is never needed on the path: drop it before anything imports.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _ROOT]

import torch  # noqa: E402

# Triton kernels run on CPU tensors under the interpreter; it must be set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
