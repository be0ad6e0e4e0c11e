"""Method registry: name -> factory, description and stages."""
from __future__ import annotations

import functools
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import InvalidOptionError, UnknownMethodError
from .stages import STAGES, Method, StageProtocolError, check_method


# -- option specs: what each option of a method accepts, checked at patch time before anything is installed --------
@dataclass(frozen=True)
class Opt:
    """One option's accepted values: ``ok(value)`` says whether a value is accepted; ``accepts`` says which (for the
    error message)."""

    accepts: str
    ok: Callable[[Any], bool]
    why: Callable[[str, Any], str] | None = None   # more detail on a refused value (e.g. a missing file)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(float(v))


def choice(*values) -> Opt:
    return Opt("one of " + ", ".join(map(repr, values)), lambda v: any(v is x or (type(v) is type(x) and v == x)
                                                                     for x in values))


def boolean() -> Opt:
    return Opt("True or False", lambda v: isinstance(v, bool))


def integer(lo: int | None = None, hi: int | None = None) -> Opt:
    rng = (f" >= {lo}" if hi is None else f" in {lo}..{hi}") if lo is not None else ""
    return Opt(f"an integer{rng}", lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi))


def number() -> Opt:
    return Opt("a number", _is_real)


def real(lo: float, hi: float, hi_open: bool = False, lo_open: bool = False) -> Opt:
    text = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return Opt(text, lambda v: _is_real(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi))


def int_pair(lo: int = 1, ordered: bool = False) -> Opt:
    """An integer >= lo (both axes) or a pair (a, b) of them; ``ordered``: a pair only, lo <= a < b."""
    if ordered:
        return Opt(f"a pair (a, b) of integers with {lo} <= a < b",
                   lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_int(x) for x in v)
                   and lo <= v[0] < v[1])
    return Opt(f"an integer >= {lo} or a pair (a, b) of them",
               lambda v: (_is_int(v) and v >= lo) or (isinstance(v, (tuple, list)) and len(v) == 2
                                                      and all(_is_int(x) and x >= lo for x in v)))


def seq_of(item: Opt, n: int | None = None, min_len: int = 1, extra: Callable[[Any], bool] = lambda v: True,
           accepts: str | None = None) -> Opt:
    size = f"{n} " if n is not None else ""
    text = accepts or f"a list / tuple of {size}values, each {item.accepts}"
    return Opt(text, lambda v: isinstance(v, (tuple, list)) and (len(v) == n if n is not None else len(v) >= min_len)
               and all(item.ok(x) for x in v) and extra(v))


def optional(opt: Opt) -> Opt:
    return Opt(f"None or {opt.accepts}", lambda v: v is None or opt.ok(v), opt.why)


def file_or(types: Callable[[], tuple], what: str) -> Opt:
    """An existing file (str / os.PathLike) or an instance of ``types()`` (imported lazily)."""
    def why(key, v):
        return f" (cannot read {key}: no file at {os.fspath(v)!r})" if isinstance(v, (str, os.PathLike)) else ""

    return Opt(f"the path of an existing checkpoint file or {what}",
               lambda v: (isinstance(v, (str, os.PathLike)) and os.path.isfile(v)) or isinstance(v, types()), why)


def check_options(info: "MethodInfo", kwargs: dict) -> None:
    """Refuse an option value its method does not accept (type and range), naming the option, the value and what
    is accepted. Cross-option rules stay in the factories."""
    for key, value in kwargs.items():
        opt = info.options.get(key)
        if opt is not None and not opt.ok(value):
            raise InvalidOptionError(f"method {info.name!r}: option {key}={value!r} is not accepted; {key} must be "
                                     f"{opt.accepts}{opt.why(key, value) if opt.why else ''}")


@dataclass(frozen=True)
class FixedBudget:
    """Option values that fix the visual-token budget themselves, so ``keep`` is not theirs to choose (a method's
    ``register(budget=...)`` returns one for such options, None otherwise). ``vltok.patch`` then takes its keep from
    them when none is given, and refuses an explicit keep they do not agree with (vltok.api.resolve_keep)."""

    option: str                 # the option(s) as written, e.g. "r=(10, 10)"
    implied: str                # what they fix, in words, e.g. "a 10x10 grid per image (keep = 100/(h*w))"
    fix: str                    # how to let keep choose instead, e.g. "drop r=... to let keep choose the grid"
    keep: float | None = None   # the keep they imply where it is one number for every model and image (else None:
    #                             the handle reports the achieved one after each call)
    accepts: Callable[[float], bool] = field(default=lambda keep: False, repr=False, compare=False)
    #                             an explicit keep that agrees with them (the same plan as without it)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    description: str
    stages: tuple[str, ...]
    factory: Callable[..., Method] = field(repr=False, compare=False)
    trained_variant: bool = False
    # options that make the method run in other stages (e.g. llavamini mode=early_fusion): (label, options) pairs,
    # each a row of the support matrix (vltok/support.py)
    variants: tuple = ()
    # option name -> Opt: what each factory option accepts (every option has one: tests/test_robust.py checks)
    options: dict = field(default_factory=dict, repr=False, compare=False)
    # options -> FixedBudget | None: which option values fix the budget themselves (keep then not given, or agreeing)
    budget: Callable[[dict], FixedBudget | None] | None = field(default=None, repr=False, compare=False)

    def fixed_budget(self, options: dict) -> FixedBudget | None:
        """The FixedBudget of these (checked) options, None when keep chooses the budget."""
        return self.budget(dict(options)) if self.budget is not None else None

    def __str__(self) -> str:
        return f"{self.name:<10} [{', '.join(self.stages)}] {self.description}"


_REGISTRY: dict[str, MethodInfo] = {}


def register(name: str, description: str, stages: tuple[str, ...], trained_variant: bool = False,
             variants: tuple = (), options: dict | None = None,
             budget: Callable[[dict], FixedBudget | None] | None = None):
    """Register a method factory ``(keep, **options) -> Method``. Every Method it builds is checked against the stage
    protocol (vltok.stages.check_stage: a TypeError naming what is missing) before anyone uses it. ``budget``: the
    options (as given) -> a :class:`FixedBudget` where they fix the budget themselves; the factory then gets
    ``keep=None`` (or the FixedBudget's keep) when the caller gave none."""
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise TypeError(f"method {name!r}: unknown stage(s) {bad}; stages are {STAGES}")

    def deco(factory):
        @functools.wraps(factory)
        def checked(*args, **kwargs):
            m = factory(*args, **kwargs)
            if not isinstance(m, Method):
                raise StageProtocolError(f"method {name!r}: its factory returned {type(m).__name__}, not a vltok.stages.Method")
            return check_method(m)

        _REGISTRY[name] = MethodInfo(name, description, stages, checked, trained_variant, tuple(variants),
                                     dict(options or {}), budget)
        return factory

    return deco


class MethodTable(dict):
    """``vltok.methods()``: a dict name -> MethodInfo that prints as a table."""

    def __str__(self) -> str:
        return "\n".join(str(info) for info in self.values())


def methods() -> MethodTable:
    return MethodTable(sorted(_REGISTRY.items()))


def get(name: str) -> MethodInfo:
    if isinstance(name, str) and name not in _REGISTRY:   # case-insensitive: "FastV" is fastv
        name = {k.lower(): k for k in _REGISTRY}.get(name.lower(), name)
    if not isinstance(name, str) or name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name.lower(), sorted(_REGISTRY), n=3) if isinstance(name, str) else []
        raise UnknownMethodError(
            f"unknown method {name!r}{' (did you mean ' + ' or '.join(map(repr, close)) + '?)' if close else ''}; "
            f"valid methods are: {', '.join(sorted(_REGISTRY))} (see vltok.methods() for what each does)"
        )
    return _REGISTRY[name]


# -- model families: the one place outside vltok.adapters (and eval / training / demos / the CLI) that finds them ----
def adapter_for(model):
    """The adapter class of a model instance (vltok.adapters.find_adapter; UnsupportedModelError if none)."""
    from vltok.adapters import find_adapter   # adapters import vltok: imported on first use

    return find_adapter(model)


def adapter_classes() -> dict:
    """Model class name -> adapter class, in registration order."""
    from vltok.adapters import SUPPORTED

    return dict(SUPPORTED)


def sites_of(model):
    """The adapter of ``model`` as a vltok.stages.Sites (no method attached): where a method may install extras."""
    return adapter_for(model)(model, None, None)
