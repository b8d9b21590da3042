"""Composition is generic (membench/technique.py: ordered, validate, apply_all); the order and the incompatible
pairs are declared by each technique (`order`, `incompatible`) and derived here from the registry."""

from membench.technique import apply_all, incompatible_pairs, ordered, validate

__all__ = ["apply_all", "ordered", "validate"]


def __getattr__(name: str):
    from membench import technique

    if name == "ORDER":  # the apply order of every registered technique
        return tuple(c.kind for c in sorted(technique.discover().values(), key=lambda c: (c.order, c.kind)))
    if name == "INCOMPATIBLE":
        return incompatible_pairs()
    raise AttributeError(name)
