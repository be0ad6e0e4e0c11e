"""Methods: pure tensor functions registered by name. Importing this package registers them all."""
from . import baselines, fourier  # noqa: F401
from . import crossget, tome  # noqa: F401
from . import llavamini, tokenshuffle  # noqa: F401
from . import fastv, feather  # noqa: F401
from . import mustdrop  # noqa: F401
from . import temporal  # noqa: F401
from . import dart, dpp, visionzip  # noqa: F401
