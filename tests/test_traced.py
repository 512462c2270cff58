"""Traced programs on disk (galbayes.traced): a later process loads the exported program instead
of tracing it, with the same results; the key separates everything the trace depends on; calls
that cannot use a stored program (tracers, cache off, errors, a user's profile) trace as before.

The end-to-end check (a second ``galbayes fit`` process loads the MAP program and compiles
nothing) is in tests/test_cache.py."""
from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from galbayes import errors, traced
from galbayes.model import galbayes_code_only
from galbayes.recipe import load_recipe


def _fn(x, y):
    return {"s": jnp.sin(x) * y["w"], "n": (x.sum(), y["k"] + 1)}


def _args(n=5):
    return np.linspace(0, 1, n, dtype=np.float32), {"w": np.float32(2.0), "k": np.arange(3, dtype=np.int32)}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(traced, "traced_dir", lambda: tmp_path / "traced")
    return tmp_path / "traced"


def _tree_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_second_program_object_loads_what_the_first_exported(folder):
    first = traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"})
    ref = jax.jit(_fn)(*_args())
    assert _tree_equal(first(*_args()), ref)
    assert first.stats == {"exported": 1, "loaded": 0, "fallback": 0}
    assert len(list(folder.glob("*.jexp"))) == 1 and len(list(folder.glob("*.tree"))) == 1
    assert not list(folder.glob(".*tmp*"))                         # written atomically
    second = traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"})   # as a new process would
    assert _tree_equal(second(*_args()), ref)
    assert second.stats == {"exported": 0, "loaded": 1, "fallback": 0}
    second(*_args())                                               # same shapes: in memory now
    assert second.stats["loaded"] == 1
    assert _tree_equal(second.lower(*_args()).compile()(*jax.tree_util.tree_leaves(_args())),
                       jax.tree_util.tree_leaves(ref))


def test_key_separates_description_shapes_and_dtypes(folder):
    traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"})(*_args())
    other = traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy", "options": 2})
    other(*_args())
    assert other.stats["exported"] == 1                            # another description: not reused
    same = traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"})
    same(*_args(7))                                                # another shape
    x, y = _args()
    same(x.astype(np.float64) if jax.config.jax_enable_x64 else x.astype(np.int32), y)   # another dtype
    assert same.stats == {"exported": 2, "loaded": 0, "fallback": 0}
    assert len(list(folder.glob("*.jexp"))) == 4


def test_fallbacks_trace_as_before(folder, monkeypatch):
    prog = traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"})
    out = jax.jit(lambda x, y: prog(x, y))(*_args())               # tracers: the plain jitted function
    assert _tree_equal(out, jax.jit(_fn)(*_args())) and prog.stats["fallback"] == 1
    off = traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"}, enabled=False)
    off(*_args())
    assert off.stats == {"exported": 0, "loaded": 0, "fallback": 1} and not folder.exists()
    monkeypatch.undo()
    monkeypatch.delenv(traced.ENV, raising=False)
    assert traced.traced_dir() is None                             # off unless GALBAYES_TRACED=on
    monkeypatch.setenv(traced.ENV, "on")
    from galbayes import cache
    assert traced.traced_dir() == (None if cache.cache_dir() is None else cache.cache_dir() / "traced")
    monkeypatch.setattr(traced, "traced_dir", lambda: None)       # compilation cache off
    none = traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"})
    none(*_args())
    assert none.stats["fallback"] == 1


def test_unreadable_stored_program_warns_and_traces(folder):
    traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"})(*_args())
    for p in folder.glob("*.jexp"):
        p.write_bytes(b"not a program")
    prog = traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"})
    monkey = errors._warned.copy()
    errors._warned.clear()
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = prog(*_args())
        assert any("tracing instead" in str(x.message) for x in w)
    finally:
        errors._warned.clear()
        errors._warned.update(monkey)
    assert _tree_equal(out, jax.jit(_fn)(*_args())) and prog.stats["fallback"] == 1


def test_source_digest_and_who_may_use_stored_programs():
    d = traced.source_digest()
    assert len(d) == 64 and d == traced.source_digest()
    model = load_recipe("sersic")
    assert galbayes_code_only(model)
    c = model.components[0].name
    model.profiles[c] = dataclasses.replace(model.profiles[c], fn=lambda p, grid: grid.x * 0)   # a user's code
    assert not galbayes_code_only(model)
