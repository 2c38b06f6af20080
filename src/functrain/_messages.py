"""Reading the text of an exception that is not ours (internal)."""

from __future__ import annotations

__all__: list[str] = []  # internal


def message(err: BaseException) -> str:
    """``str(err)``, or ``""`` when the error's own ``__str__`` raises.

    The step reads the messages of ``loss_fn``'s errors to explain known torch refusals; an
    error that cannot be rendered is then re-raised as it is, not replaced by the error from
    rendering it.

    Example:
        >>> class Odd(Exception):
        ...     def __str__(self):
        ...         raise AttributeError
        >>> message(ValueError("bad")), message(Odd())
        ('bad', '')
    """
    try:
        return str(err)
    except Exception:
        return ""
