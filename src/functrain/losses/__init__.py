"""``ft.losses``: optax 0.2.8's losses (``optax.losses``), on PyTorch tensors.

The same names, signatures, defaults and numerics as optax's, so that ported code only changes
its import; the losses optax also exports at its top level are at functrain's too
(``ft.softmax_cross_entropy_with_integer_labels is ft.losses.softmax_cross_entropy_with_integer_labels``).

**No reduction.** As optax's, every loss returns one value per element or per example (except
``ntxent``, ``ranking_softmax_loss`` and ``multiclass_generalized_dice_loss``, which optax
reduces too): average them yourself. ``torch.nn.functional``'s losses *mean* by default
(``reduction="mean"``), so ``F.cross_entropy(logits, y)`` is
``ft.softmax_cross_entropy_with_integer_labels(logits, y).mean()``, and the class axis is
``axis=-1`` here (torch's is 1).

All are differentiable with ``torch.func.grad``, batch with ``torch.func.vmap``, read nothing
back to the host (so they compile with ``fullgraph=True``; out-of-range integer labels give
NaN, a zero one-hot row or a clamped index, as optax's, instead of an error) and compute
float16/bfloat16 inputs in float32 before casting the result back (the CTC losses return
float32, as optax's), also under ``torch.autocast``. Bad shapes and dtypes raise an error
naming the argument, before anything is computed.

Topic modules: ``classification`` (softmax and sigmoid cross entropies, focal, poly),
``margin`` (hinge, perceptron, sparsemax), ``divergence`` (KL), ``regression`` (squared error,
Huber, log-cosh, cosine), ``ctc``, ``segmentation`` (Dice), ``self_supervised`` (NT-Xent,
triplet), ``ranking``, ``smoothing``, ``fenchel_young``.

Every public name of ``optax.losses`` 0.2.8 is here; none is left out.

Example:
    >>> import torch, functrain as ft
    >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    >>> labels = torch.tensor([0, 2])
    >>> ft.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    tensor([0.2413, 0.1096])
    >>> ft.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    tensor(0.1755)
"""

from functrain.losses.classification import (
    poly_loss_cross_entropy,
    safe_softmax_cross_entropy,
    sigmoid_binary_cross_entropy,
    sigmoid_focal_loss,
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
)
from functrain.losses.ctc import ctc_loss, ctc_loss_with_forward_probs
from functrain.losses.divergence import (
    convex_kl_divergence,
    generalized_kl_divergence,
    kl_divergence,
    kl_divergence_with_log_targets,
)
from functrain.losses.fenchel_young import make_fenchel_young_loss
from functrain.losses.margin import (
    hinge_loss,
    multiclass_hinge_loss,
    multiclass_perceptron_loss,
    multiclass_sparsemax_loss,
    perceptron_loss,
    sparsemax_loss,
)
from functrain.losses.ranking import ranking_softmax_loss
from functrain.losses.regression import (
    cosine_distance,
    cosine_similarity,
    huber_loss,
    l2_loss,
    log_cosh,
    squared_error,
)
from functrain.losses.segmentation import (
    binary_dice_loss,
    dice_loss,
    multiclass_generalized_dice_loss,
)
from functrain.losses.self_supervised import ntxent, triplet_margin_loss
from functrain.losses.smoothing import smooth_labels

__all__ = [
    "binary_dice_loss",
    "convex_kl_divergence",
    "cosine_distance",
    "cosine_similarity",
    "ctc_loss",
    "ctc_loss_with_forward_probs",
    "dice_loss",
    "generalized_kl_divergence",
    "hinge_loss",
    "huber_loss",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "l2_loss",
    "log_cosh",
    "make_fenchel_young_loss",
    "multiclass_generalized_dice_loss",
    "multiclass_hinge_loss",
    "multiclass_perceptron_loss",
    "multiclass_sparsemax_loss",
    "ntxent",
    "perceptron_loss",
    "poly_loss_cross_entropy",
    "ranking_softmax_loss",
    "safe_softmax_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "smooth_labels",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "sparsemax_loss",
    "squared_error",
    "triplet_margin_loss",
]
