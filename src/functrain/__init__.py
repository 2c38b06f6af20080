"""functrain: pure-function training for PyTorch, in the style of JAX and optax.

The public API: optimizer transforms and schedules (optax names), ``ft.tree`` pytree maths,
``TrainState`` and ``make_train_step``, per-sample gradients and DP-SGD, and optax's losses
(``ft.losses``; those optax exports at its top level are here too). Submodules
``ft.logging``, ``ft.checkpoint``, ``ft.distributed``, ``ft.projections`` and ``ft.testing``
hold the rest; ``ft.contrib``, ``ft.schedules``, ``ft.transforms`` and ``ft.tree_utils`` spell
optax's namespaces of those names (the same objects as the top-level ones), and
``ft.second_order``, ``ft.perturbations``, ``ft.assignment``, ``ft.microbatching`` and
``ft.experimental`` implement optax's namespaces of those names.

Example:
    >>> import torch, functrain as ft
    >>> params = {"w": torch.zeros(3)}
    >>> tx = ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(1e-2))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": torch.ones(3)}, state, params)
    >>> ft.apply_updates(params, updates)["w"]
    tensor([-0.0100, -0.0100, -0.0100])
"""

from functrain import (
    assignment,
    checkpoint,
    contrib,
    distributed,
    experimental,
    grads,
    logging,
    losses,
    microbatching,
    optim,
    perturbations,
    projections,
    schedules,
    second_order,
    testing,
    train,
    transforms,
    tree,
    tree_utils,
)
from functrain.grads import *  # noqa: F403
from functrain.losses import (
    convex_kl_divergence,
    cosine_distance,
    cosine_similarity,
    ctc_loss,
    ctc_loss_with_forward_probs,
    generalized_kl_divergence,
    hinge_loss,
    huber_loss,
    kl_divergence,
    l2_loss,
    log_cosh,
    ntxent,
    safe_softmax_cross_entropy,
    sigmoid_binary_cross_entropy,
    sigmoid_focal_loss,
    smooth_labels,
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
    squared_error,
)
from functrain.microbatching import microbatch
from functrain.optim import *  # noqa: F403
from functrain.optim.torch_state import opt_state_from_torch, opt_state_to_torch

# optax's typing aliases (``params: optax.Params``), for annotations in ported code; not in
# ``__all__``, which lists functrain's own objects.
from functrain.optim.types import (
    ConditionFn,
    MaskOrFn,
    OptState,
    Params,
    ScalarOrSchedule,
    ShouldSkipUpdateFunction,
    TransformUpdateExtraArgsFn,
    Updates,
)
from functrain.train import *  # noqa: F403
from functrain.tree import (
    bias_correction,
    update_infinity_moment,
    update_moment,
    update_moment_per_elem_norm,
)

__version__ = "0.1.0"

# The losses optax 0.2.8 exports at its top level (optax.l2_loss); the rest stay in ft.losses.
_TOP_LEVEL_LOSSES = [
    "convex_kl_divergence",
    "cosine_distance",
    "cosine_similarity",
    "ctc_loss",
    "ctc_loss_with_forward_probs",
    "generalized_kl_divergence",
    "hinge_loss",
    "huber_loss",
    "kl_divergence",
    "l2_loss",
    "log_cosh",
    "ntxent",
    "safe_softmax_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "smooth_labels",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "squared_error",
]

# optax's moment helpers at its top level (optax.update_moment is optax.tree.update_moment).
_TOP_LEVEL_TREE = [
    "bias_correction",
    "update_infinity_moment",
    "update_moment",
    "update_moment_per_elem_norm",
]

__all__ = [
    "tree",
    *optim.__all__,
    "opt_state_from_torch",
    "opt_state_to_torch",
    *train.__all__,
    *grads.__all__,
    *_TOP_LEVEL_LOSSES,
    *_TOP_LEVEL_TREE,
    "microbatch",
]
