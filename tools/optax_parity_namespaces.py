"""Differential check of functrain's twins of optax 0.2.8's newer, smaller namespaces, in float64.

``tools/optax_parity.py`` compares transforms, schedules and ``ft.tree`` on gradient pytrees;
this script covers the rest of optax 0.2.8's public names that functrain ports:
``second_order`` (hvp, hessian_diag, fisher_diag), ``perturbations`` (make_perturbed_fun,
Normal, Gumbel), ``assignment`` (hungarian_algorithm, base_hungarian_algorithm),
``microbatching`` (microbatch, micro_vmap, micro_grad, reshape_batch_axis, AccumulationType,
Accumulator), ``experimental.aggregating`` (its 14 names), ``inject_stateful_hyperparams`` /
``WrappedSchedule``, ``nnls``, ``power_iteration``, ``matrix_inverse_pth_root``,
``multi_normal``, ``scale_gradient``, ``transforms.unitwise_clip``, ``tree.random_like`` /
``split_key_like`` / ``unwrap_random_key_data`` and the moment helpers (``update_moment``,
``update_moment_per_elem_norm``, ``update_infinity_moment``, ``bias_correction``, at the top
level and in ``tree``).

Each case feeds the same random float64 inputs (NumPy, copied into torch and JAX with x64) to
both libraries, with the settings that matter (shapes, axes, accumulation types, decays, ``p``
values...), and reports the largest relative error ``max|a - b| / max|b|`` over every output
leaf (and, for differentiable functions, the gradients); a difference of structure, shape or
dtype kind, or of NaN/inf positions, is an infinite error. Random samplers cannot agree
(different generators): there the samples are fed to both sides (``make_perturbed_fun`` with a
noise that returns pre-drawn samples for each library's keys), or what does not depend on the
draws is compared (log-densities, shapes, dtypes, key-tree structures); the rest is listed
under "Not compared" with the reason. Documented differences get a tolerance and a reason.

Needs ``jax`` and ``optax`` (not project dependencies): run it from a separate environment,
``pip install torch "jax[cpu]" optax && pip install -e .``, then
``python tools/optax_parity_namespaces.py [name filters]``. Exits 0 (with a message) when optax
is missing, 1 when a case fails. Not part of the test suite.
"""

from __future__ import annotations

import os
import sys

import torch

try:
    import jax
    import optax  # noqa: F401
except ImportError:
    print(
        "optax_parity_namespaces: jax/optax are not installed; skipping (pip install "
        "'jax[cpu]' optax)."
    )
    sys.exit(0)

jax.config.update("jax_enable_x64", True)
# Python floats and the schedules' counts compute in torch's default dtype: float64, as JAX's
# with x64, so the comparison measures the formulas rather than float32 rounding.
torch.set_default_dtype(torch.float64)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _parity_ns_aggregating  # noqa: E402
import _parity_ns_functions  # noqa: E402
import _parity_ns_micro  # noqa: E402
import _parity_ns_rest  # noqa: E402
import _parity_ns_state_access  # noqa: E402
import _parity_ns_trees  # noqa: E402
from _parity_ns_common import TOL, Case  # noqa: E402

MODULES = (
    _parity_ns_functions,
    _parity_ns_trees,
    _parity_ns_micro,
    _parity_ns_aggregating,
    _parity_ns_rest,
    _parity_ns_state_access,
)


def main() -> int:
    only = sys.argv[1:]  # optional name filters
    rows: list[tuple[Case, float, str]] = []
    for module in MODULES:
        for case in module.cases():
            if only and not any(k in case.name for k in only):
                continue
            try:
                err, note = float(case.run()), ""
            except Exception as exc:  # a crash or a structural mismatch is a failed comparison
                first = str(exc).splitlines()[0][:90] if str(exc) else ""
                err, note = float("inf"), f"{type(exc).__name__}: {first}"
            rows.append((case, err, note))
        jax.clear_caches()

    print("| name | settings | max rel. error | result |\n|---|---|---|---|")
    failed = documented = 0
    for case, err, note in rows:
        ok = err <= case.tol
        result = "PASS" if ok else ("DIFF (documented)" if case.doc else "FAIL")
        failed += not ok and not case.doc
        documented += not ok and case.doc
        why = f" tol {case.tol:g}" if case.tol != TOL else ""
        why += f": {case.why}" if case.why else ""
        print(f"| {case.name} | {case.settings} | {err:.1e} | {result}{why} {note} |")
    print(
        f"\n{len(rows)} comparisons, {failed} failed, {documented} documented differences, "
        f"default tolerance {TOL:g}.\n"
    )
    if not only:
        print("Not compared:")
        skipped = {k: v for module in MODULES for k, v in module.NOT_COMPARED.items()}
        for name in sorted(skipped):
            print(f"- {name}: {skipped[name]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
