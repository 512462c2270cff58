"""Traced programs kept on disk, so that a warm process skips Python tracing (opt-in:
``GALBAYES_TRACED=on``; see :data:`ENV` for why it is off by default).

The persistent XLA cache (:mod:`galbayes.cache`) keeps *compiled* programs, but JAX keys it on
the traced program, so every new process still traces galbayes' model in Python first: numpyro
SVI, the LM polish and the renderer, ~5 s per program and most of a warm ``galbayes fit``'s
fixed cost. :class:`TracedProgram` wraps a jitted function so that the first call with new
argument shapes exports the traced program (:mod:`jax.export`, StableHLO) into
``<cache folder>/traced/``; later processes deserialize it (milliseconds), and its compilation
is then a hit in the XLA cache.

What a stored program may be reused for is decided by a key that holds everything the trace
depends on: the caller's description (model, options; see :func:`canon`), the SHA-256 of
galbayes' own source files, the versions of JAX, jaxlib, numpyro, optax and numpy, the backend
and the shapes, dtypes and tree structure of the arguments. Callers only use it for models made
of galbayes' own profiles (a user's profile may call code whose changes no key can see); they
trace as before otherwise. Arguments that are JAX tracers (a call inside another trace, e.g.
the per-device program under :func:`galbayes.devices.data_parallel`), a cache that is off, or
any error while exporting or loading all fall back to the plain jitted function (an error
with a warning, once); nothing is ever half-written (files are renamed into place).
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import pickle
import re
import threading
from pathlib import Path

import numpy as np

from .errors import warn_once
from .results import atomic_write

__all__ = ["TracedProgram", "canon", "source_digest", "traced_dir", "totals"]

FORMAT = 1
_lock = threading.Lock()
_totals = {"traced_exported": 0, "traced_loaded": 0}


def totals() -> dict:
    """Programs exported (traced and written) and loaded from disk so far in this process."""
    return dict(_totals)


def canon(obj, depth: int = 0):
    """A JSON-able, process-independent description of ``obj`` (no memory addresses)."""
    if depth > 12:
        return "..."
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, (np.generic,)):
        return canon(obj.item(), depth + 1)
    if isinstance(obj, np.ndarray) or type(obj).__module__.startswith("jax"):
        try:
            arr = np.asarray(obj)
            return {"array": str(arr.dtype), "shape": list(arr.shape),
                    "sha256": hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()}
        except Exception:  # noqa: BLE001  (a jax object that is not an array)
            pass
    if isinstance(obj, (list, tuple)):
        return [canon(v, depth + 1) for v in obj]
    if isinstance(obj, dict):
        return {str(k): canon(v, depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if callable(obj) and hasattr(obj, "__code__"):
        try:
            src = inspect.getsource(obj)
        except (OSError, TypeError):
            src = obj.__code__.co_code.hex()
        return {"function": f"{obj.__module__}.{obj.__qualname__}",
                "source_sha256": hashlib.sha256(src.encode()).hexdigest()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"type": type(obj).__qualname__,
                "fields": {f.name: canon(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj)}}
    if hasattr(obj, "__dict__"):
        state = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
        return {"type": f"{type(obj).__module__}.{type(obj).__qualname__}", "state": canon(state, depth + 1)}
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


_digest: dict = {}


def source_digest() -> str:
    """SHA-256 of every ``.py`` file of the installed galbayes package (paths and bytes)."""
    if "sha" not in _digest:
        root = Path(__file__).resolve().parent
        h = hashlib.sha256()
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
        _digest["sha"] = h.hexdigest()
    return _digest["sha"]


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("jax", "jaxlib", "numpyro", "optax", "numpy", "scipy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


#: Environment variable: ``on`` (or ``1``, ``yes``, ``true``) stores and loads traced programs.
#: Off by default: measured with jaxlib 0.10.1 on 128 galaxies (benchmarks/README.md), a warm
#: run is 15 % faster (tracing 17 s -> 4 s) but XLA compiles the exported program ~2x slower
#: than the directly traced one, so a cold run takes 40 s longer.
ENV = "GALBAYES_TRACED"


def traced_dir():
    """Where traced programs go: ``<compilation cache folder>/traced`` (None unless
    ``GALBAYES_TRACED=on``, or if the compilation cache is off)."""
    from . import cache

    if os.environ.get(ENV, "").strip().lower() not in ("on", "1", "yes", "true"):
        return None
    folder = cache.cache_dir()
    return None if folder is None else Path(folder) / "traced"


class TracedProgram:
    """``jitted`` (a ``jax.jit`` of ``fn``), with its traced program kept on disk per shape.

    Parameters
    ----------
    fn : callable
        The pure function (what ``jitted`` jits).
    jitted : callable
        ``jax.jit(fn)``: used for calls that cannot go through a stored program.
    description : callable
        ``description()`` returns (JSON-able) everything besides galbayes' source, the library
        versions and the arguments that the trace of ``fn`` depends on (for the MAP rounds: the
        model and the options); called only when a stored program is first used.
    enabled : bool
        False: always ``jitted`` (e.g. a model with a user's profile).

    ``stats`` counts ``exported`` (traced and written), ``loaded`` (read from disk) and
    ``fallback`` calls.
    """

    def __init__(self, fn, jitted, description, *, enabled: bool = True):
        self.fn, self.jitted, self.enabled = fn, jitted, bool(enabled)
        self._describe = description
        self._key_text = None
        self._by_shape: dict = {}
        self.stats = {"exported": 0, "loaded": 0, "fallback": 0}

    def __call__(self, *args):
        import jax

        leaves, entry = self._entry(args)
        if entry is None:
            self.stats["fallback"] += 1
            return self.jitted(*args)
        call, out_tree = entry
        return jax.tree_util.tree_unflatten(out_tree, call(*leaves))

    def lower(self, *args):
        """The lowered program a call with ``args`` runs (``.compile()`` it to compile ahead)."""
        leaves, entry = self._entry(args)
        return self.jitted.lower(*args) if entry is None else entry[0].lower(*leaves)

    def _entry(self, args):
        """(flat arguments, (jitted exported call, output tree) or None to use ``jitted``)."""
        import jax

        leaves, in_tree = jax.tree_util.tree_flatten(args)
        folder = traced_dir() if self.enabled else None
        if folder is None or any(isinstance(x, jax.core.Tracer) for x in leaves):
            return leaves, None
        sig = (str(in_tree), tuple((tuple(np.shape(x)), str(x.dtype) if hasattr(x, "dtype")
                                    else str(np.asarray(x).dtype)) for x in leaves))
        if sig not in self._by_shape:
            try:
                self._by_shape[sig] = self._program(folder, sig, leaves, in_tree)
            except Exception as exc:  # noqa: BLE001  (any failure: trace as before)
                warn_once(f"galbayes could not use a stored traced program ({type(exc).__name__}: {exc}); "
                           "tracing instead")
                self._by_shape[sig] = None
        return leaves, self._by_shape[sig]

    def _program(self, folder: Path, sig, leaves, in_tree):
        import jax
        from jax import export

        config = [jax.default_backend(), jax.config.jax_enable_x64, str(jax.config.jax_default_matmul_precision),
                  os.environ.get("XLA_FLAGS", "")]
        if self._key_text is None:
            self._key_text = json.dumps({"format": FORMAT, "caller": self._describe(), "galbayes": source_digest(),
                                         "versions": _versions()}, sort_keys=True)
        key = hashlib.sha256((self._key_text + "\0" + json.dumps(config) + "\0"
                              + json.dumps(sig)).encode()).hexdigest()[:40]
        blob_path, tree_path = folder / f"{key}.jexp", folder / f"{key}.tree"
        with _lock:
            if blob_path.is_file() and tree_path.is_file():
                exported = export.deserialize(bytearray(blob_path.read_bytes()))
                out_tree = jax.tree_util.tree_structure(pickle.loads(tree_path.read_bytes()))
                self.stats["loaded"] += 1
                _totals["traced_loaded"] += 1
            else:
                structure = {}

                def flat(*xs):
                    out = self.fn(*jax.tree_util.tree_unflatten(in_tree, xs))
                    out_leaves, structure["tree"] = jax.tree_util.tree_flatten(out)
                    return out_leaves

                avals = [jax.ShapeDtypeStruct(np.shape(x), x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
                         for x in leaves]
                exported = export.export(jax.jit(flat))(*avals)
                out_tree = structure["tree"]
                skeleton = jax.tree_util.tree_unflatten(out_tree, [0] * out_tree.num_leaves)
                tree, blob = pickle.dumps(skeleton), bytes(exported.serialize())
                atomic_write(tree_path, lambda tmp: tmp.write_bytes(tree))
                atomic_write(blob_path, lambda tmp: tmp.write_bytes(blob))
                self.stats["exported"] += 1
                _totals["traced_exported"] += 1
        return jax.jit(exported.call), out_tree
