"""Where the examples live, and loading one as a module (they are scripts, not a package)."""

import importlib.util
import itertools
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")
_fresh = itertools.count()


def load_example(name):
    """A fresh module object of ``examples/<name>.py`` (its flags parsed by each test anew)."""
    spec = importlib.util.spec_from_file_location(
        f"{name}_example_{next(_fresh)}", os.path.join(EXAMPLES, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
