"""Every public symbol is documented with a runnable example.

"Public" means listed in ``functrain.__all__`` or in the ``__all__`` of the user-facing
submodules. Each must have its own docstring containing an ``Example:`` (or ``Examples:``)
section with at least one ``>>>`` line; pytest's ``--doctest-modules`` then runs those examples.

Exception: NamedTuple *state* classes (``FooState``, the optimizer states that ``init`` returns)
only need a docstring of their own; they are built by their transform, not by users.
"""

from __future__ import annotations

import importlib
import inspect
import re
import types

import pytest

import functrain

SUBMODULES = [
    "tree",
    "testing",
    "logging",
    "checkpoint",
    "distributed",
    "contrib",
    "projections",
    "losses",
    "schedules",
    "transforms",
    "tree_utils",
    "second_order",
    "perturbations",
    "assignment",
    "microbatching",
    "experimental",
    "experimental.aggregating",
]


def _modules() -> list[types.ModuleType]:
    return [functrain, *(importlib.import_module(f"functrain.{name}") for name in SUBMODULES)]


MODULES = _modules()
PUBLIC = sorted({(m.__name__, name) for m in MODULES for name in m.__all__})
EXAMPLE = re.compile(r"^\s*Examples?:\s*\n(?:.*\n)*?\s*>>> ", re.MULTILINE)


def _is_state_class(obj: object) -> bool:
    """A NamedTuple whose name ends in "State" and that is not the user-built TrainState."""
    return (
        isinstance(obj, type)
        and issubclass(obj, tuple)
        and hasattr(obj, "_fields")
        and obj.__name__.endswith("State")
        and obj.__name__ != "TrainState"
    )


def _own_doc(obj: object) -> str | None:
    doc = obj.__doc__ if isinstance(obj, (type, types.FunctionType, types.ModuleType)) else None
    if doc is None:
        doc = inspect.getdoc(obj)
    if doc and isinstance(obj, type) and re.fullmatch(rf"{obj.__name__}\(.*\)", doc.strip()):
        return None  # the docstring namedtuple() writes by itself
    return doc


@pytest.mark.parametrize("module, name", PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_symbol_has_docstring_with_example(module: str, name: str):
    obj = getattr(importlib.import_module(module), name)
    doc = _own_doc(obj)
    assert doc and doc.strip(), f"{module}.{name} has no docstring"
    if _is_state_class(obj):
        return  # the documented exception: a docstring is enough for optimizer state classes
    assert EXAMPLE.search(inspect.cleandoc(doc) + "\n"), (
        f"{module}.{name}: the docstring needs an 'Example:' section with a '>>>' line"
    )


@pytest.mark.parametrize("module", MODULES, ids=[m.__name__ for m in MODULES])
def test_all_lists_existing_unique_names(module: types.ModuleType):
    names = list(module.__all__)
    assert len(names) == len(set(names)), f"duplicates in {module.__name__}.__all__"
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{module.__name__}.__all__ lists undefined names: {missing}"


def test_top_level_reexports_the_subpackages():
    for sub in ("optim", "train", "grads"):
        package = importlib.import_module(f"functrain.{sub}")
        missing = sorted(set(package.__all__) - set(functrain.__all__))
        assert not missing, f"functrain.__all__ lacks functrain.{sub} names: {missing}"
