"""Turning an ``nn.Module`` into a pure function of explicit parameter and buffer dicts.

``model, params, buffers = ft.functionalize(module)`` gives:

* ``params``: ``{name: tensor}`` with **one entry per distinct parameter tensor**, detached.
  Tied weights (e.g. a language model whose output layer reuses the embedding matrix) appear
  once, under the first name ``module.named_parameters()`` gives them; the forward uses that one
  tensor in every tied place, so its gradient is the sum over all uses, exactly as
  ``nn.Module`` autograd accumulates it.
* ``buffers``: ``{name: tensor}`` of all buffers (persistent or not), detached.
* ``model``: a :class:`FunctionalModel`, a pure function built on
  ``torch.func.functional_call``. ``model(params, *args, **kwargs)`` returns the forward output;
  ``model.apply(params, buffers, *args, **kwargs)`` returns ``(output, new_buffers)`` for models
  that update buffers (BatchNorm in training mode). Neither ever mutates its inputs or the
  module's own tensors.

The module itself becomes a stateless skeleton that describes the computation: its own parameter
tensors are never read by ``model`` (every parameter and buffer is replaced in each call).

This module holds :class:`FunctionalModel` and :func:`functionalize`; the helpers that inspect
the module and check its buffers live in ``functrain.train._module_utils`` (re-exported here).

Example:
    >>> import torch, functrain as ft
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model, params, buffers = ft.functionalize(torch.nn.Linear(3, 2))
    >>> sorted(params), buffers
    (['bias', 'weight'], {})
    >>> model(params, torch.ones(1, 3)).shape
    torch.Size([1, 2])
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from functrain.train import _recompute
from functrain.train._module_utils import (
    _add_placement_note,
    _aliases,
    _check_materialized,
    _drop_cached,
    _no_function_modes,
    _norm_modules,
    _parametrized,
    _written,
)
from functrain.tree import TreeMismatchError

__all__ = ["FunctionalModel", "functionalize"]


_NO_MODE_CHANGE = contextlib.nullcontext()


class FunctionalModel:
    """A pure forward function of an ``nn.Module``: ``model(params, *args, **kwargs)``.

    Args:
        module: the module whose forward computation to run.
        buffers: the buffers used when a call does not pass any (a read-only snapshot).
        training: run the module in training (``True``) or evaluation (``False``) mode for
            the duration of each call; ``None`` uses whatever mode the module is in.

    Calls check that ``params`` has exactly the module's parameter names (a silent fallback to the
    module's own tensors for a missing name is impossible) and raise a ``KeyError`` naming the
    missing and unexpected names otherwise; a value that is not a tensor raises a ``TypeError``
    and a tensor of another shape than the module's raises a
    :class:`~functrain.tree.TreeMismatchError`, each naming the path (and the shapes).

    A call swaps the given tensors into the module for its duration (as ``functional_call``
    does), so calls in sequence never see each other's tensors, and a forward may call another
    functional model of one of its submodules. Two threads must not call models of the same
    module at once (two ``ft.functionalize(module)`` share that module's slots): give each
    thread its own copy, ``ft.functionalize(copy.deepcopy(module))``.

    The model is bound to the submodules it saw when built: replacing one (``net[0] = ...``) or
    registering a parametrization afterwards raises on the next call; rebuild the model then.

    Activation checkpointing inside the module's ``forward`` recomputes during backward, after
    the call returned: ``make_train_step``'s step reinstalls the call's tensors and mode for that
    recompute; a backward run by hand recomputes with the module's own tensors.

    Example:
        >>> import torch, functrain as ft
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> model, params, buffers = ft.functionalize(net)
        >>> out, new_buffers = model.apply(params, buffers, torch.randn(4, 2))
        >>> int(new_buffers["1.num_batches_tracked"]), int(buffers["1.num_batches_tracked"])
        (1, 0)
        >>> # eval mode with the trained running statistics, no update; model.eval()(params, x)
        >>> # would use the snapshot buffers from ft.functionalize instead
        >>> model.eval().apply(params, new_buffers, torch.randn(4, 2))[0].shape
        torch.Size([4, 2])
    """

    def __init__(
        self, module: nn.Module, buffers: dict[str, torch.Tensor], training: bool | None = None
    ) -> None:
        if not torch.compiler.is_compiling():  # model.eval() may be traced; is_lazy is not
            _check_materialized(module)
        self.module = module
        self.buffers = buffers
        self.training = training
        self.param_names = tuple(name for name, _ in module.named_parameters())
        self._param_set = frozenset(self.param_names)
        self.buffer_names = tuple(name for name, _ in module.named_buffers())
        self._buffer_set = frozenset(self.buffer_names)
        # A wrong shape can broadcast silently (a (1,) bias), so shapes are checked per call.
        self._shapes = {
            **{n: t.shape for n, t in module.named_parameters()},
            **{n: t.shape for n, t in module.named_buffers()},
        }
        self._norms = _norm_modules(module)
        # Every name a tied tensor has beyond its first one, resolved once here, so calls can
        # skip functional_call's per-call tie analysis (tie_weights=False with all names given).
        self._aliases = _aliases(module)
        self._cache_keys = _parametrized(module)
        # An RNN keeps strong references to the weights of its last forward (_flat_weights); our
        # swap bypasses its __setattr__, so those are reset after each call, or the module would
        # hold the last call's params (and any autograd graph behind them) until the next one.
        self._rnns = tuple(
            m
            for m in module.modules()
            if isinstance(m, nn.RNNBase) and hasattr(m, "_init_flat_weights")
        )
        self._links: tuple[tuple[dict[str, Any], str, nn.Module], ...] = ()
        self._slots = self._slot_tables()
        # (name, name in the buffers dict) of each buffer slot, tied names included
        self._buffer_slots = (
            *((n, n) for n in self.buffer_names),
            *((a, n) for a, n in self._aliases if n in self._buffer_set),
        )

    def train(self, mode: bool = True) -> FunctionalModel:
        """This model, run in training mode (dropout on, BatchNorm batch statistics)."""
        return FunctionalModel(self.module, self.buffers, training=mode)

    def eval(self) -> FunctionalModel:
        """This model, run in evaluation mode (dropout off, BatchNorm running statistics)."""
        return self.train(False)

    def _check_names(self, params: dict[str, Any], buffers: dict[str, Any]) -> None:
        if not isinstance(params, dict):
            raise TypeError(
                f"params must be a dict of name -> tensor (see ft.functionalize), got "
                f"{type(params).__name__}"
            )
        if tuple(params) != self.param_names and params.keys() != self._param_set:
            missing = sorted(self._param_set - params.keys())
            unexpected = sorted(params.keys() - self._param_set)
            raise KeyError(
                f"params do not match the module's parameters: missing {missing}, "
                f"unexpected {unexpected}. Did the model change after the state was made? "
                "Rebuild params with ft.functionalize(module)."
            )
        if buffers.keys() != self._buffer_set:
            missing = sorted(self._buffer_set - buffers.keys())
            unexpected = sorted(buffers.keys() - self._buffer_set)
            raise KeyError(
                f"buffers do not match the module's buffers: missing {missing}, "
                f"unexpected {unexpected}"
            )
        if torch._C._is_torch_function_mode_enabled() and not torch.compiler.is_compiling():
            with torch._C.DisableTorchFunction():  # as _no_function_modes, without a generator
                self._check_shapes(params, buffers)
        else:
            self._check_shapes(params, buffers)

    def _check_shapes(self, params: dict[str, Any], buffers: dict[str, Any]) -> None:
        for root, tree in (("params", params), ("buffers", buffers)):
            for name, t in tree.items():
                if getattr(t, "shape", None) != self._shapes[name]:
                    self._shape_error(root, name, t)

    def _shape_error(self, root: str, name: str, t: Any) -> None:
        expected = tuple(self._shapes[name])
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{root}[{name!r}]: expected a tensor of shape {expected}, got {type(t).__name__}"
            )
        raise TreeMismatchError(
            f"{root}[{name!r}]: shape {tuple(t.shape)} does not match the module's shape "
            f"{expected}. Did the model change after the state was made? Rebuild it with "
            "ft.functionalize(module)."
        )

    def _mode(self) -> contextlib.AbstractContextManager[None]:
        if self.training is None:
            return _NO_MODE_CHANGE
        return self._set_mode(self.training)

    @contextlib.contextmanager
    def _set_mode(self, training: bool) -> Iterator[None]:
        previous = [(m, m.training) for m in self.module.modules()]
        self.module.train(training)
        try:
            yield
        finally:
            for m, mode in previous:
                m.training = mode

    def _slot_tables(self) -> dict[str, tuple[dict[str, Any], str]] | None:
        """For each tensor name, the owning module's ``_parameters``/``_buffers`` dict and key.

        ``None`` when a name lives elsewhere (then ``functional_call`` does the general work).
        """
        slots: dict[str, tuple[dict[str, Any], str]] = {}
        # Every parent -> child link on the way to an owner: the tables belong to the submodules
        # seen now, so a call checks the links still hold (a replaced submodule would otherwise
        # take no notice of the params: silently the new submodule's own tensors, zero gradient).
        links: dict[tuple[int, str], tuple[dict[str, Any], str, nn.Module]] = {}
        names = (*self.param_names, *self.buffer_names, *(alias for alias, _ in self._aliases))
        for name in names:
            owner_name, _, attr = name.rpartition(".")
            owner = self.module
            for key in owner_name.split(".") if owner_name else ():
                child = owner.get_submodule(key)
                links.setdefault((id(owner), key), (owner._modules, key, child))
                owner = child
            if attr in owner._parameters:
                slots[name] = (owner._parameters, attr)
            elif attr in owner._buffers:
                slots[name] = (owner._buffers, attr)
            else:
                return None
        self._links = tuple(links.values())
        return slots

    def _structure_error(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"the module changed after ft.functionalize ({what}), so this model no longer "
            "reaches its tensors: rebuild it with ft.functionalize(module)"
        )

    def _run(
        self, params: dict[str, Any], buffers: dict[str, Any], args: Any, kwargs: Any, source: Any
    ) -> Any:
        compiling = torch.compiler.is_compiling()
        if not compiling:
            _drop_cached(self._cache_keys)
        try:
            return self._swap_and_run(params, buffers, args, kwargs, source)
        except Exception as err:
            with _no_function_modes():
                _add_placement_note(err, {**params, **buffers})
            raise
        finally:
            if not compiling:
                _drop_cached(self._cache_keys)

    def _swap_and_run(
        self, params: dict[str, Any], buffers: dict[str, Any], args: Any, kwargs: Any, source: Any
    ) -> Any:
        """Runs the forward on ``params`` and ``buffers`` (copies of ``source``); a buffer the
        forward *reassigns* (``self.avg = 0.9 * self.avg + ...``, not in place) is written back
        into ``buffers``."""
        tensors = {**params, **buffers}
        for alias, name in self._aliases:
            tensors[alias] = tensors[name]
        if not torch.compiler.is_compiling():
            _recompute.note(self, tensors, params, source)  # activation checkpointing
        if torch.compiler.is_compiling() or self._slots is None:
            # functional_call writes reassigned tensors back into the dict it was given
            out = functional_call(
                self.module, tensors, tuple(args), kwargs, tie_weights=False, strict=False
            )
            for name in buffers:
                buffers[name] = tensors[name]
            return out
        for modules, key, child in self._links:
            if modules.get(key) is not child:
                raise self._structure_error(f"submodule {key!r} was replaced or removed")
        saved: list[tuple[dict[str, Any], str, Any]] = []
        try:
            self._swap_in(tensors, saved)
            out = self.module(*args, **kwargs)
            for name, first in self._buffer_slots:
                table, attr = self._slots[name]
                if table[attr] is not tensors[name]:
                    buffers[first] = table[attr]
            return out
        finally:
            self._swap_out(saved)

    def _swap_in(
        self, tensors: dict[str, Any], saved: list[tuple[dict[str, Any], str, Any]]
    ) -> None:
        """Puts ``tensors`` into the module's slots, appending what they held to ``saved``.

        functional_call's swap, minus its per-call name resolution and checks (the names were
        resolved once in __init__ and checked by _check_names): ~4% of a small model's step.
        """
        assert self._slots is not None
        for name, tensor in tensors.items():
            table, attr = self._slots[name]
            if attr not in table:  # e.g. a parametrization registered since
                raise self._structure_error(f"{name!r} is no longer a parameter or buffer")
            saved.append((table, attr, table[attr]))
            table[attr] = tensor

    def _swap_out(self, saved: list[tuple[dict[str, Any], str, Any]]) -> None:
        for table, attr, original in reversed(saved):
            table[attr] = original
        for rnn in self._rnns:
            rnn._init_flat_weights()

    def _install(self, tensors: dict[str, Any]) -> contextlib.ExitStack:
        """The module holding ``tensors`` until the returned stack is closed (a recompute of
        activation checkpointing during backward, :mod:`functrain.train._recompute`)."""
        stack = contextlib.ExitStack()
        try:
            # the recompute runs in the call's mode: dropout, BatchNorm as in the forward
            stack.enter_context(self._mode())
            if self._slots is None:
                stack.enter_context(
                    torch.nn.utils.stateless._reparametrize_module(
                        self.module, tensors, tie_weights=False, strict=False
                    )
                )
                return stack
            saved: list[tuple[dict[str, Any], str, Any]] = []
            stack.callback(self._swap_out, saved)
            self._swap_in(tensors, saved)
        except BaseException:  # a structure error half-way: put back what was swapped in
            stack.close()
            raise
        return stack

    def __call__(self, params: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """The forward output, using the snapshot buffers read-only.

        Raises:
            RuntimeError: when the forward would update buffers (BatchNorm in training mode with
                running statistics, ``spectral_norm``'s power iteration, any in-place write to a
                buffer): use :meth:`apply`, which returns the new buffers.
        """
        self._check_names(params, self.buffers)
        with self._mode():
            if any(m.training for m in self._norms):
                raise RuntimeError(
                    "this model updates its buffers in training mode (BatchNorm running "
                    "statistics), so model(params, ...) would drop the update: call "
                    "out, new_buffers = model.apply(params, buffers, ...) and return the new "
                    "buffers from the loss (ft.LossOutput(loss, buffers=new_buffers)), or use "
                    "model.eval()"
                )
            copies = {k: v.clone() for k, v in self.buffers.items()}
            buffers = dict(copies)
            out = self._run(params, buffers, args, kwargs, self.buffers)
        # Any other in-place buffer write (spectral_norm's u and v, a custom counter) bumps the
        # copy's version counter, a reassigned buffer comes back as another tensor: refuse to
        # drop either silently. Dynamo cannot trace _version, and inference tensors have none.
        updated = (
            []
            if torch.compiler.is_compiling()
            else sorted(k for k in buffers if buffers[k] is not copies[k])
        )
        if not updated and not (torch.compiler.is_compiling() or torch.is_inference_mode_enabled()):
            updated = _written(buffers)
        if updated:
            raise RuntimeError(
                f"the forward updated the buffers {updated}, which model(params, ...) would "
                "drop: call out, new_buffers = model.apply(params, buffers, ...) and return the "
                "new buffers from the loss (ft.LossOutput(loss, buffers=new_buffers)), or use "
                "model.eval() if the update only happens in training mode"
            )
        return out

    def apply(
        self,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor] | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        """Runs the forward with explicit buffers; returns ``(output, new_buffers)``.

        ``buffers`` is not modified: the forward runs on copies, which come back as
        ``new_buffers`` (holding, e.g., BatchNorm's updated running statistics). A buffer the
        forward reassigns (``self.avg = 0.9 * self.avg + ...``) comes back as its new tensor.

        Example:
            >>> import torch, functrain as ft
            >>> model, params, buffers = ft.functionalize(torch.nn.BatchNorm1d(2))
            >>> _, new = model.apply(params, buffers, torch.tensor([[0.0, 2.0], [2.0, 4.0]]))
            >>> new["running_mean"], buffers["running_mean"]
            (tensor([0.1000, 0.3000]), tensor([0., 0.]))
        """
        buffers = self.buffers if buffers is None else buffers
        self._check_names(params, buffers)
        new_buffers = {k: v.clone() for k, v in buffers.items()}
        with self._mode():
            out = self._run(params, new_buffers, args, kwargs, buffers)
        return out, new_buffers

    def __repr__(self) -> str:
        mode = {None: "", True: ", training=True", False: ", training=False"}[self.training]
        return f"FunctionalModel({type(self.module).__name__}{mode})"


def functionalize(
    module: nn.Module, *, copy: bool = False
) -> tuple[FunctionalModel, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Splits a module into a pure function and detached ``params`` / ``buffers`` dicts.

    Args:
        module: any ``nn.Module`` (tied weights, buffers and third-party models such as
            Hugging Face transformers included).
        copy: return copies instead of detached views sharing the module's memory. Either way
            nothing requires grad; :meth:`TrainState.create` copies by default, so the usual
            ``TrainState.create(params=params, ...)`` leaves the module's tensors untouched.

    Returns:
        ``(model, params, buffers)``: a :class:`FunctionalModel`, one parameter tensor per
        distinct parameter (tied weights once), and all buffers.

    Differences from ``torch.func.functional_call`` used directly: names and shapes are checked
    (a missing parameter name raises instead of silently using the module's own tensor), buffers
    are never mutated, and tied weights appear once so their gradient is summed over all uses.
    Parameters with ``requires_grad=False`` are included and differentiated like the others:
    functrain ignores the flag, freeze them with :func:`functrain.freeze` instead.

    A forward that writes a *parameter* in place (``nn.Embedding(max_norm=...)`` renormalizes
    its rows) writes the given ``params`` in place, as the module writes its own weight; with
    ``copy=False`` those share the module's memory. Lazy modules must be run once first.

    Example:
        >>> import torch, functrain as ft
        >>> emb = torch.nn.Embedding(5, 3)
        >>> head = torch.nn.Linear(3, 5, bias=False)
        >>> head.weight = emb.weight  # tied
        >>> model, params, _ = ft.functionalize(torch.nn.Sequential(emb, head))
        >>> list(params)
        ['0.weight']
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"functionalize expects an nn.Module, got {type(module).__name__}")
    _check_materialized(module)

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone() if copy else t.detach()

    params = {name: take(p) for name, p in module.named_parameters()}
    buffers = {name: take(b) for name, b in module.named_buffers()}
    return FunctionalModel(module, buffers), params, buffers
