"""The one cache of jitted functions per :class:`~galbayes.model.Model`.

:func:`compiled` returns the function that ``build()`` makes for a model and a key, built
once per (model object, key). Every site that jits something for a model (rendering, the
MAP round program, Laplace derivatives, NUTS programs, Fisher matrices, pointwise
log-likelihoods) goes through it.

Design: the cache lives *on the model object* (a lazily created attribute), not in a
module-level dictionary. A module-level dict keyed by ``id(model)`` keeps every model alive
(its value holds the model, or a closure over it) and a recycled id could alias another
model; a :class:`weakref.WeakKeyDictionary` does not help either, because its values (closures
over the model) would keep their keys alive. Stored on the model, the functions form at most
a reference cycle with it, so the cache dies with the model (the garbage collector frees the
cycle). The cache remembers its owner by a weak reference, so a ``copy.copy`` of a model (which
shares the attribute) builds its own functions instead of using the original's, and it
pickles (and deep-copies) as an empty cache, so a model sent to a Dask worker carries no
jitted functions.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Hashable

__all__ = ["compiled"]

_ATTR = "_galbayes_compiled"


class _Cache:
    """The functions of one model: ``fns[key]``; ``owner`` is a weak reference to the model
    (``None`` for a cache that came through pickle or copy)."""

    __slots__ = ("owner", "fns")

    def __init__(self, owner=None):
        self.owner = None if owner is None else weakref.ref(owner)
        self.fns: dict = {}

    def __reduce__(self):       # pickle / copy: an empty cache that belongs to no model
        return (_Cache, ())


def compiled(model, key: Hashable, build: Callable[[], Any]):
    """The function ``build()`` returns for ``model`` and ``key``, built once.

    Parameters
    ----------
    model : Model
        The model object (identity matters, not equality: two equal models compile
        separately, as before).
    key : hashable
        What distinguishes the functions of one model, e.g. ``("render",)`` or
        ``("map", opts, round_iter, render)``; begin it with the name of the site.
    build : callable
        ``build()`` makes the function (typically a ``jax.jit``); called only when
        ``(model, key)`` is not cached yet.

    Returns
    -------
    object
        The cached result of ``build()``.
    """
    cache = model.__dict__.get(_ATTR)
    if cache is None or cache.owner is None or cache.owner() is not model:
        cache = _Cache(model)
        model.__dict__[_ATTR] = cache
    fns = cache.fns
    if key not in fns:
        fns[key] = build()
    return fns[key]
