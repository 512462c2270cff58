"""Compiled programs on disk (galbayes.traced): a later process loads the stored executable instead
of tracing and compiling it, with the same results; the key separates everything the trace depends on; calls
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


def test_second_program_object_loads_what_the_first_stored(folder):
    first = traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"})
    ref = jax.jit(_fn)(*_args())
    assert _tree_equal(first(*_args()), ref)
    assert first.stats == {"stored": 1, "loaded": 0, "fallback": 0}
    assert len(list(folder.glob("*.xexe"))) == 1 and len(list(folder.glob("*.trees"))) == 1
    assert not list(folder.glob(".*tmp*"))                         # written atomically
    second = traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"})   # as a new process would
    assert _tree_equal(second(*_args()), ref)
    assert second.stats == {"stored": 0, "loaded": 1, "fallback": 0}
    second(*_args())                                               # same shapes: in memory now
    assert second.stats["loaded"] == 1
    assert _tree_equal(second.lower(*_args()).compile()(*_args()), ref)


def test_key_separates_description_shapes_and_dtypes(folder):
    traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"})(*_args())
    other = traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy", "options": 2})
    other(*_args())
    assert other.stats["stored"] == 1                            # another description: not reused
    same = traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"})
    same(*_args(7))                                                # another shape
    x, y = _args()
    same(x.astype(np.float64) if jax.config.jax_enable_x64 else x.astype(np.int32), y)   # another dtype
    assert same.stats == {"stored": 2, "loaded": 0, "fallback": 0}
    assert len(list(folder.glob("*.xexe"))) == 4


def test_fallbacks_trace_as_before(folder, monkeypatch):
    prog = traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"})
    out = jax.jit(lambda x, y: prog(x, y))(*_args())               # tracers: the plain jitted function
    assert _tree_equal(out, jax.jit(_fn)(*_args())) and prog.stats["fallback"] == 1
    off = traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"}, enabled=False)
    off(*_args())
    assert off.stats == {"stored": 0, "loaded": 0, "fallback": 1} and not folder.exists()
    monkeypatch.undo()
    from galbayes import cache
    monkeypatch.delenv(traced.ENV, raising=False)                  # on by default, where the cache is
    usable = cache.cache_dir() is not None and cache.cache_off_reason() is None
    assert traced.traced_dir() == (cache.cache_dir() / "traced" if usable else None)
    for word in ("off", "0", "No", "false "):
        monkeypatch.setenv(traced.ENV, word)
        assert traced.traced_dir() is None
    monkeypatch.setattr(traced, "traced_dir", lambda: None)       # compilation cache off
    none = traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"})
    none(*_args())
    assert none.stats["fallback"] == 1


def test_unreadable_stored_program_warns_and_traces(folder):
    traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"})(*_args())
    for p in folder.glob("*.xexe"):
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


_STEPS = r'''
import sys, jax, jax.numpy as jnp, numpy as np
from galbayes import cache, traced
cache.configure(sys.argv[2])
def f(x, y):
    r = jax.lax.while_loop(lambda c: c[1] < 10, lambda c: (c[0] * 0.9 + jnp.sin(c[0]), c[1] + 1), (x, 0))[0]
    return {"a": jnp.linalg.solve(r @ y + 3 * jnp.eye(16), y), "b": r.sum()}
x, y = np.full((16, 16), 0.3, np.float32), np.eye(16, dtype=np.float32) * 2
if sys.argv[1] == "plain":                 # only the XLA cache: its entry exists before anything is stored
    out = jax.jit(f)(x, y)
else:
    prog = traced.TracedProgram(f, jax.jit(f), lambda: {"what": "steps"})
    out = prog(x, y)
    print("STATS", prog.stats)
np.save(sys.argv[3], np.asarray(out["a"]))
'''


def test_program_that_hit_the_xla_cache_is_stored_whole(tmp_path):
    """A process whose XLA compile would be a persistent-cache hit still stores an executable
    that a third, fresh process can run (one taken from the cache serializes without its
    kernels); all three give the same numbers."""
    import subprocess
    import sys

    script = tmp_path / "steps.py"
    script.write_text(_STEPS)
    env = {k: v for k, v in __import__("os").environ.items() if k not in (traced.ENV,)}
    runs = {}
    for mode in ("plain", "store", "load"):
        proc = subprocess.run([sys.executable, str(script), "plain" if mode == "plain" else "traced",
                               str(tmp_path / "xla"), str(tmp_path / f"{mode}.npy")],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (mode, proc.stderr[-3000:])
        runs[mode] = proc.stdout
    assert "'stored': 1" in runs["store"] and "'loaded': 1" in runs["load"], runs
    assert len(list((tmp_path / "xla" / "traced").glob("*.xexe"))) == 1
    a, b, c = (np.load(tmp_path / f"{m}.npy") for m in ("plain", "store", "load"))
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_result_shapes_kept_beside_the_program(folder):
    """``eval_shape`` of a function (the MAP rounds' initial slots) is read back by a later
    program object without tracing the function; another argument shape is not reused."""
    calls = []

    def make():                                                    # a new function: no trace cache
        def blank(x, y):
            calls.append(1)
            return {"s": jnp.zeros((x.shape[0], 2), jnp.float32), "k": (y["k"].astype(jnp.int32), None)}
        return blank

    first = traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"})
    ref = jax.eval_shape(make(), *_args())
    assert first.eval_shape("blank", make(), *_args()) == ref and len(calls) == 2
    assert len(list(folder.glob("*.shapes"))) == 1
    second = traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"})
    got = second.eval_shape("blank", make(), *_args())
    assert got == ref and len(calls) == 2                          # read back, not traced
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(ref)
    assert second.eval_shape("blank", make(), *_args(7))["s"].shape == (7, 2) and len(calls) == 3
    off = traced.TracedProgram(_fn, jax.jit(_fn), lambda: {"what": "toy"}, enabled=False)
    assert off.eval_shape("blank", make(), *_args()) == ref and len(calls) == 4
