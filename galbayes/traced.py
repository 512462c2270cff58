"""Compiled programs kept on disk, so that a warm process neither traces nor compiles them
(on by default where the compilation cache is; ``GALBAYES_TRACED=off`` turns it off).

The persistent XLA cache (:mod:`galbayes.cache`) keeps *compiled* programs, but JAX keys it on
the traced program, so every new process still traces galbayes' model in Python first: numpyro
SVI, the LM polish and the renderer, ~10 s per MAP program and most of a warm ``galbayes fit``'s
fixed cost. :class:`TracedProgram` wraps a jitted function so that the first call with new
argument shapes compiles it and stores the executable
(:func:`jax.experimental.serialize_executable.serialize`) in ``<cache folder>/traced/``, as
``<key>.xexe`` plus ``<key>.trees`` (the argument and result tree structures); later processes
load it (a fraction of a second) and run it directly. (Storing the traced StableHLO with
:mod:`jax.export` instead was tried first: XLA compiled the exported program about twice as
slowly as the jitted one, which made cold runs slower; see benchmarks/README.md.)

What a stored program may be reused for is decided by a key that holds everything the trace and
the machine code depend on: the caller's description (model, options; see :func:`canon`), the
SHA-256 of galbayes' own source files, the versions of JAX, jaxlib, numpyro, optax, numpy and
scipy, the backend and device kinds, x64 and matmul precision, ``XLA_FLAGS``, the CPU
(:func:`host_signature`: a cache folder shared between cluster nodes must not hand one CPU's
code to another) and the shapes, dtypes and tree structure of the arguments. Callers only use it
for models made of galbayes' own profiles (a user's profile may call code whose changes no key
can see), and not under a mesh of several devices (a loaded executable is bound to one
device; :func:`galbayes.devices.data_parallel` runs a program per device); they trace as before
otherwise. Arguments that are JAX tracers (a call inside another trace), a cache that is off or
unsafe (:func:`galbayes.cache.cache_off_reason`), or any error while storing or
loading all fall back to the plain jitted function (an error with a warning, once); nothing is
ever half-written (files are renamed into place). Two jaxlib 0.10.1 details are handled here
and in :func:`galbayes.cache.compile_uncached`: LAPACK's function table is filled before a
program is loaded (it is otherwise filled lazily by lowering, and a loaded program would call a
null pointer), and a program to be stored is compiled past the XLA cache (an executable taken
from that cache serializes without its kernels). See docs/known-issues.md.
"""
from __future__ import annotations

import dataclasses
import functools
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

__all__ = ["TracedProgram", "canon", "host_signature", "source_digest", "traced_dir", "totals"]

FORMAT = 2
_lock = threading.Lock()
_memo_lock = threading.RLock()
_totals = {"traced_stored": 0, "traced_loaded": 0}


def totals() -> dict:
    """Programs stored (traced, compiled and written) and loaded from disk so far in this process."""
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


#: Environment variable: ``off`` (or ``0``, ``no``, ``false``) neither stores nor loads
#: compiled programs (every process traces its programs, the XLA cache still compiles nothing
#: twice). On by default.
ENV = "GALBAYES_TRACED"


def traced_dir():
    """Where compiled programs go: ``<compilation cache folder>/traced`` (None with
    ``GALBAYES_TRACED=off``, if the compilation cache is off, or where loading stored
    executables is unsafe: :func:`galbayes.cache.cache_off_reason`)."""
    from . import cache

    if os.environ.get(ENV, "").strip().lower() in ("off", "0", "no", "false"):
        return None
    folder = cache.cache_dir()
    if folder is None or cache.cache_off_reason() is not None:
        return None
    return Path(folder) / "traced"


@functools.lru_cache(maxsize=None)
def host_signature() -> str:
    """The CPU this process runs on (model name and instruction-set flags): a stored
    executable is machine code for one CPU, so a cache folder shared between machines (a
    home directory on a cluster) must not hand it to another."""
    import platform

    text = platform.machine() + "\0" + platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            seen = set()
            for line in fh:
                name = line.split(":", 1)[0].strip()
                if name in ("model name", "flags", "Features", "CPU part", "vendor_id") and name not in seen:
                    seen.add(name)
                    text += "\0" + line.strip()
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _prepare_custom_calls():
    """Fill jaxlib's LAPACK function table, as lowering a linear-algebra op does: a program
    loaded without being lowered in this process calls LAPACK through it (jaxlib 0.10.1: a
    null pointer and SIGSEGV at the first ``getrf`` otherwise)."""
    from jax._src.lib import lapack

    lapack._lapack.initialize()


def _skeleton(tree):
    """A picklable stand-in for a tree structure (the structure with 0 leaves)."""
    return tree.unflatten([0] * tree.num_leaves)


class _Ready:
    """What :meth:`TracedProgram.lower` returns for a program already compiled or loaded."""

    def __init__(self, compiled):
        self._compiled = compiled

    def compile(self):
        return self._compiled


class TracedProgram:
    """``jitted`` (a ``jax.jit`` of ``fn``), with its compiled program kept on disk per shape.

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

    ``stats`` counts ``stored`` (traced, compiled and written), ``loaded`` (read from disk) and
    ``fallback`` calls.
    """

    def __init__(self, fn, jitted, description, *, enabled: bool = True):
        self.fn, self.jitted, self.enabled = fn, jitted, bool(enabled)
        self._describe = description
        self._key_text = None
        self._by_shape: dict = {}
        self.stats = {"stored": 0, "loaded": 0, "fallback": 0}

    def __call__(self, *args):
        compiled = self._entry(args)
        if compiled is None:
            self.stats["fallback"] += 1
            return self.jitted(*args)
        return compiled(*args)

    def lower(self, *args):
        """The lowered program a call with ``args`` runs (``.compile()`` it to compile ahead)."""
        compiled = self._entry(args)
        return self.jitted.lower(*args) if compiled is None else _Ready(compiled)

    def _entry(self, args):
        """The compiled program for ``args`` (a ``jax.stages.Compiled``), or None to use ``jitted``."""
        return self._memo("program", "a stored compiled program", args,
                          lambda folder, sig: self._program(folder, sig, args))

    def eval_shape(self, name: str, fn, *args):
        """``jax.eval_shape(fn, *args)``, kept on disk beside the program (``<key>.shapes``).

        For a function whose result shapes depend on nothing but what the program's key holds
        (the MAP rounds' initial slots: tracing numpyro's SVI start just for its shapes costs
        seconds). Falls back to ``jax.eval_shape`` wherever the program itself would.
        """
        import jax

        shapes = self._memo(f"eval_shape:{name}", "stored shapes", args,
                            lambda folder, sig: self._shapes(folder, sig, fn, args))
        return jax.eval_shape(fn, *args) if shapes is None else shapes

    def _memo(self, kind: str, what: str, args, build):
        """``build(folder, sig)`` once per ``kind`` and argument signature; None where nothing
        stored may be used (disabled, cache off, tracers) or it failed (a warning, once)."""
        import jax

        leaves, in_tree = jax.tree_util.tree_flatten(args)
        folder = traced_dir() if self.enabled else None
        if folder is None or any(isinstance(x, jax.core.Tracer) for x in leaves):
            return None
        sig = (kind, str(in_tree), tuple((tuple(np.shape(x)), str(x.dtype) if hasattr(x, "dtype")
                                          else str(np.asarray(x).dtype)) for x in leaves))
        with _memo_lock:       # fit streams (threads) share a program: build it once
            if sig not in self._by_shape:
                try:
                    self._by_shape[sig] = build(folder, sig)
                except Exception as exc:  # noqa: BLE001  (any failure: trace as before)
                    warn_once(f"galbayes could not use {what} ({type(exc).__name__}: {exc}); tracing instead")
                    self._by_shape[sig] = None
            return self._by_shape[sig]

    def _shapes(self, folder: Path, sig, fn, args):
        import jax

        path = folder / f"{self._key(sig)}.shapes"
        if path.is_file():
            skeleton, leaves = pickle.loads(path.read_bytes())
            tree = jax.tree_util.tree_structure(skeleton)
            return tree.unflatten([jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype)) for shape, dtype in leaves])
        out = jax.eval_shape(fn, *args)
        leaves, tree = jax.tree_util.tree_flatten(out)
        blob = pickle.dumps((_skeleton(tree), [(tuple(x.shape), str(np.dtype(x.dtype))) for x in leaves]))
        atomic_write(path, lambda tmp: tmp.write_bytes(blob))
        return out

    def _key(self, sig) -> str:
        import jax

        config = [jax.default_backend(), [str(d.device_kind) for d in jax.local_devices()],
                  jax.config.jax_enable_x64, str(jax.config.jax_default_matmul_precision),
                  os.environ.get("XLA_FLAGS", ""), host_signature()]
        if self._key_text is None:
            self._key_text = json.dumps({"format": FORMAT, "caller": self._describe(), "galbayes": source_digest(),
                                         "versions": _versions()}, sort_keys=True)
        return hashlib.sha256((self._key_text + "\0" + json.dumps(config) + "\0"
                               + json.dumps(sig)).encode()).hexdigest()[:40]

    def _program(self, folder: Path, sig, args):
        import jax
        from jax.experimental import serialize_executable as se

        from . import cache

        key = self._key(sig)
        blob_path, tree_path = folder / f"{key}.xexe", folder / f"{key}.trees"
        with _lock:
            if blob_path.is_file() and tree_path.is_file():
                _prepare_custom_calls()
                in_skel, out_skel = pickle.loads(tree_path.read_bytes())
                compiled = se.deserialize_and_load(blob_path.read_bytes(), jax.tree_util.tree_structure(in_skel),
                                                   jax.tree_util.tree_structure(out_skel))
                self.stats["loaded"] += 1
                _totals["traced_loaded"] += 1
                return compiled
            compiled = cache.compile_uncached(self.jitted.lower(*args))
            try:
                blob, in_tree, out_tree = se.serialize(compiled)
                trees = pickle.dumps((_skeleton(in_tree), _skeleton(out_tree)))
            except Exception as exc:  # noqa: BLE001  (not serializable: use it, keep nothing)
                warn_once(f"galbayes could not store a compiled program ({type(exc).__name__}: {exc})")
                return compiled
            atomic_write(tree_path, lambda tmp: tmp.write_bytes(trees))
            atomic_write(blob_path, lambda tmp: tmp.write_bytes(blob))
            self.stats["stored"] += 1
            _totals["traced_stored"] += 1
            return compiled
