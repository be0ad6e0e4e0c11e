"""Reversible instance patching shared by the engines, adapters and methods' install() hooks."""
from __future__ import annotations


def set_instance_attr(obj, name: str, value, undo: list) -> None:
    """Set ``obj.name`` on the instance only, and remember how to restore it exactly."""
    had = name in obj.__dict__
    old = obj.__dict__.get(name)

    def restore():
        if had:
            obj.__dict__[name] = old
        else:
            obj.__dict__.pop(name, None)

    obj.__dict__[name] = value
    undo.append(restore)
