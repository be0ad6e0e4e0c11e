"""Method registry: name -> factory, description and stages."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .errors import UnknownMethodError
from .stages import Method


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

    def __str__(self) -> str:
        return f"{self.name:<10} [{', '.join(self.stages)}] {self.description}"


_REGISTRY: dict[str, MethodInfo] = {}


def register(name: str, description: str, stages: tuple[str, ...], trained_variant: bool = False,
             variants: tuple = ()):
    def deco(factory):
        _REGISTRY[name] = MethodInfo(name, description, stages, factory, trained_variant, tuple(variants))
        return factory

    return deco


class MethodTable(dict):
    """``vltok.methods()``: a dict name -> MethodInfo that prints as a table."""

    def __str__(self) -> str:
        return "\n".join(str(info) for info in self.values())


def methods() -> MethodTable:
    return MethodTable(sorted(_REGISTRY.items()))


def get(name: str) -> MethodInfo:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownMethodError(
            f"unknown method {name!r}; valid methods are: {', '.join(sorted(_REGISTRY))} "
            "(see vltok.methods() for what each does)"
        )
    return _REGISTRY[name]
