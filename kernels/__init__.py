"""vltok.kernels: accelerated versions of vltok's pure tensor functions, with the same signatures.

Triton kernels next to torch references (the definitions), picked for CUDA tensors (CPU tests run them under
TRITON_INTERPRET=1): dct (Fourier's DCT low-pass; the dispatcher is vltok.methods.fourier.dct_lowpass's ``impl``),
cgsm (CrossGET's matching), gather (token compaction at an in-LLM cut), select (the in-LLM cut's last-row
attention scores, stable top-k per row and column compaction) and dpp (the dpp method's greedy MAP, the whole loop
in one launch; the dispatcher is vltok.methods.dpp.dpp_greedy's ``impl``). eval/tools/kernel_bench.py times them on
a GPU (dpp: eval/tools/dpp_kernel_speed.py).
"""

if __name__ == "kernels":   # pragma: no cover - exercised by tests/test_compat.py in a subprocess
    # This folder was imported as the top-level package ``kernels`` because the repository root is on sys.path
    # (python -c / -m / pytest run from the repository root without -P). That name belongs to the PyPI package
    # ``kernels`` (transformers >= 5.25 imports it): load that one instead, from the rest of sys.path.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _rest = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _rest)
    if _spec is None:
        raise ImportError(
            f"'import kernels' found vltok's folder {_root}/kernels (vltok.kernels) because python runs with the "
            "repository root on sys.path, and the PyPI package 'kernels' is not installed. Run python with -P (or "
            "from another folder), or pip install kernels", name="kernels")
    _real = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _real   # the import statement that got here returns sys.modules["kernels"]
    _spec.loader.exec_module(_real)
