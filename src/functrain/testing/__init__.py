"""chex-like test helpers: pytree assertions, compile counting and eager/compiled variants.

Use them to test your own training code the way functrain tests itself:

- **Assertions** compare whole pytrees and, on failure, name the pytree path and the worst
  element, e.g.

  ```text
  AssertionError: trees differ at ['fc']['weight'] (shape (3, 4), torch.float32):
  1 of 12 elements differ; worst at index (2, 1): a=1.5, b=1.0, |a-b|=0.5;
  allowed |a-b| <= atol=1e-06 + rtol=1e-05*|b|
  ```

- **Compile counting** (:func:`count_compiles`, :func:`assert_max_compiles`,
  :func:`assert_max_traces`) checks that a ``torch.compile``-d step is traced once and that
  changing a tensor hyperparameter does not recompile.
- **Variants** (:func:`variants`) run one test eagerly, under ``torch.compile(fullgraph=True)``
  and on every available device.

Example:
    >>> import torch
    >>> from functrain import testing
    >>> testing.assert_trees_all_close({"w": torch.ones(2)}, {"w": torch.ones(2) + 1e-9})
    >>> try:
    ...     testing.assert_trees_all_close({"w": torch.ones(2)}, {"w": torch.tensor([1.0, 2.0])})
    ... except AssertionError as err:
    ...     print(str(err).split(";")[0])
    trees differ at ['w'] (shape (2,), torch.float32): 1 of 2 elements differ
"""

from functrain.testing import _assertions, _compile, _variants
from functrain.testing._assertions import *  # noqa: F403
from functrain.testing._compile import *  # noqa: F403
from functrain.testing._variants import *  # noqa: F403

__all__ = [*_assertions.__all__, *_compile.__all__, *_variants.__all__]
