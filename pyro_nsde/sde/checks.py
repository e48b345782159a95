"""Argument checks shared across the package: positive counts, choices and broadcasting.

Each raises :class:`ValueError` (or :class:`TypeError`) naming the argument, what was expected
and what was received.
"""


def check_positive_int(name: str, value, *, optional: bool = False):
    """Return ``value`` if it is an ``int >= 1`` (not a ``bool``; or ``None`` when
    ``optional``); else raise ``ValueError`` naming ``name``."""
    if optional and value is None:
        return value
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        expected = "a positive integer or None" if optional else "a positive integer"
        raise ValueError(f"{name} must be {expected}, but got {value!r}")
    return value


def check_choice(name: str, value, choices):
    """Return ``value`` if it is one of ``choices``; else raise ``ValueError`` naming them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, but got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    """Return ``value`` if it is ``True`` or ``False``; else raise ``TypeError``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, but got {value!r}")
    return value


def broadcastable(shape, other) -> bool:
    """Whether two shapes broadcast with each other (aligned from the right)."""
    return all(p == q or 1 in (p, q) for p, q in zip(shape[::-1], other[::-1], strict=False))


def broadcasts_to(shape, target) -> bool:
    """Whether ``shape`` broadcasts to ``target``: their broadcast is ``target`` itself."""
    return len(shape) <= len(target) and all(
        p in (q, 1) for p, q in zip(shape[::-1], target[::-1], strict=False)
    )


def check_expand(batch_shape, new_shape) -> None:
    """Raise ``ValueError`` unless ``batch_shape`` broadcasts to ``new_shape``."""
    if not broadcasts_to(batch_shape, new_shape):
        raise ValueError(f"cannot expand batch_shape {tuple(batch_shape)} to {tuple(new_shape)}")


__all__ = [
    "broadcastable",
    "broadcasts_to",
    "check_bool",
    "check_choice",
    "check_expand",
    "check_positive_int",
]
