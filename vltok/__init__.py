"""vltok: visual-token reduction for Hugging Face vision-language models.

    handle = vltok.patch(model, "fourier", keep=0.16)
    ...
    vltok.unpatch(model)
"""
from . import methods as _methods  # noqa: F401  (registers the methods)
from .compat import TransformersCompatError
from .api import PatchHandle, get_handle, patch, patched, unpatch
from .errors import (AlreadyPatchedError, IncompatibleError, InvalidKeepError, InvalidOptionError, NotPatchedError,
                     UnknownMethodError, UnsupportedModelError, VltokError)
from .registry import methods
from .resize import resize_processor

__version__ = "0.1.0"
__all__ = ["patch", "unpatch", "patched", "methods", "get_handle", "PatchHandle", "VltokError", "UnknownMethodError",
           "InvalidKeepError", "InvalidOptionError", "UnsupportedModelError", "AlreadyPatchedError", "NotPatchedError",
           "IncompatibleError", "TransformersCompatError", "resize_processor"]

# submodules a user reaches as attributes after `import vltok` (imported on first use: the reference VLMs pull in
# their loaders only when asked for), e.g. `vltok.reference.load()`
_LAZY_SUBMODULES = ("reference", "reference_video", "video", "stages", "kernels", "adapters")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
