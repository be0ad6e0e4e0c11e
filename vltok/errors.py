"""Errors raised by vltok. Every message names the problem and the fix."""


class VltokError(ValueError):
    """Base class of every error vltok raises on bad input."""


class UnknownMethodError(VltokError):
    pass


class InvalidKeepError(VltokError):
    pass


class UnsupportedModelError(VltokError):
    pass


class AlreadyPatchedError(VltokError):
    pass


class NotPatchedError(VltokError):
    pass


class IncompatibleError(VltokError):
    """A method/model (or method/input) combination that cannot work."""


class InvalidOptionError(VltokError):
    """A method option with a value of the wrong type or outside its range (checked at patch time)."""
