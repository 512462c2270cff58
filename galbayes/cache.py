"""The persistent XLA compilation cache (on by default) and compile-time bookkeeping.

A fit program of a model and a stamp-shape bucket is compiled once *per machine*, not once
per process: compiled executables are kept in a per-user folder and reused by later runs,
other processes and Dask workers on the same file system.

Where
    ``$GALBAYES_CACHE_DIR`` if set, else the platform's user cache folder
    (``$XDG_CACHE_HOME/galbayes/xla``, ``~/.cache/galbayes/xla`` on Linux,
    ``~/Library/Caches/galbayes/xla`` on macOS, ``%LOCALAPPDATA%\\galbayes\\xla`` on
    Windows). ``galbayes fit --cache-dir DIR`` overrides both; ``--no-cache`` (or
    ``GALBAYES_CACHE_DIR=off``) turns the cache off. The CLI exports its choice in
    ``GALBAYES_CACHE_DIR`` so that local Dask workers follow it.

When
    :func:`ensure` is called before galbayes compiles anything (``fit_map`` does); it
    configures JAX's persistent cache unless the user already configured one
    (``jax_compilation_cache_dir``), which is then left alone. Every program is cached,
    however small or quick to compile (``jax_persistent_cache_min_compile_time_secs = 0``,
    ``jax_persistent_cache_min_entry_size_bytes = -1``).

Concurrency
    Entries are written to a temporary file in the cache folder and renamed into place
    (atomic on POSIX and NTFS), so processes that fill the cache at the same time never
    read a partial executable; two writers of the same key write identical bytes.

Which jaxlib
    jaxlib 0.9.x's CPU runtime crashes (SIGSEGV) when it loads a large program from the
    cache: LLVM links the program's ~1000+ kernel objects recursively on a 512 KiB worker
    thread stack and overflows it (galbayes' bulge+disk and multi-component MAP programs are
    that large; docs/known-issues.md). jaxlib 0.10.1 loads them. So on the CPU under
    jaxlib < 0.10 the cache is *off by default*, with a warning saying why; a folder the user
    names (``--cache-dir``, ``GALBAYES_CACHE_DIR``, ``configure(path)``) is still used, with
    the same warning. :func:`cache_off_reason` gives the reason, or None.

Keys
    JAX keys an entry by the serialized program (without source locations), the compile
    options and the backend, so a key survives new processes. galbayes' traced programs do
    not depend on ``PYTHONHASHSEED`` (no iteration over sets or ``id()``-ordered containers
    enters a trace; ``tests/test_cache.py`` runs the same fit in two fresh processes with
    different hash seeds and checks that the second compiles nothing).

The traced MAP programs (:mod:`galbayes.traced`) are kept in ``<folder>/traced``.

:class:`CompileStats` counts compilations and cache hits, and sums the time spent in XLA
compilation, from JAX's monitoring events; the CLI reports it after a run.
"""
from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path

from .errors import warn_once
from .results import atomic_write

__all__ = ["default_cache_dir", "configure", "ensure", "cache_dir", "cache_off_reason", "CompileStats",
           "compile_stats", "compile_uncached", "ENV"]

#: Environment variable: the cache folder, or ``off`` / ``none`` / ``0`` / empty to disable.
ENV = "GALBAYES_CACHE_DIR"
_OFF = ("", "0", "off", "none", "false", "no")

_lock = threading.Lock()
_state = {"configured": False, "dir": None}


def default_cache_dir() -> Path:
    """The per-user cache folder for compiled programs (platform-appropriate)."""
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "galbayes" / "xla"


def _requested():
    """The folder asked for by the environment (None = off), default when unset."""
    env = os.environ.get(ENV)
    if env is None:
        return default_cache_dir()
    if env.strip().lower() in _OFF:
        return None
    return Path(env).expanduser()


#: The first jaxlib whose CPU runtime loads galbayes' large programs from the cache.
SAFE_CPU_JAXLIB = (0, 10)


def _release(version: str) -> tuple:
    """(major, minor) of a version string such as '0.9.2' or '0.10.0rc1'."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def cache_off_reason(*, jaxlib_version=None, backend=None):
    """Why the persistent cache is unsafe in this process (a sentence), or None.

    Parameters
    ----------
    jaxlib_version : str, optional
        Default: the installed jaxlib's.
    backend : str, optional
        Default: ``jax.default_backend()`` (this starts the backend, as compiling would).
    """
    if jaxlib_version is None:
        import jaxlib.version

        jaxlib_version = jaxlib.version.__version__
    if _release(jaxlib_version) >= SAFE_CPU_JAXLIB:
        return None
    if backend is None:
        import jax

        backend = jax.default_backend()
    if backend != "cpu":
        return None
    return (f"jaxlib {jaxlib_version} crashes (SIGSEGV) on the CPU when it loads large programs from the "
            f"persistent compilation cache (docs/known-issues.md); jaxlib 0.10.1, the version CI tests "
            f"(pip install -c constraints.txt ...), loads them")


def _atomic_put(self, key: str, value: bytes) -> None:
    """LRUCache.put without eviction, written to a temporary file and renamed into place."""
    if not key:
        raise ValueError("key cannot be empty")
    path = self.path / f"{key}{_SUFFIX}"
    if path.exists():
        return
    atomic_write(path, lambda tmp: tmp.write_bytes(value))


_SUFFIX = "-cache"
_patched = False


def _patch_atomic_writes() -> None:
    """Make JAX's file cache write atomically when it does not evict (no file lock then)."""
    global _SUFFIX, _patched
    if _patched:
        return
    try:
        from jax._src import lru_cache
    except ImportError:  # pragma: no cover  (a JAX without it: keep its own writer)
        return
    _SUFFIX = getattr(lru_cache, "_CACHE_SUFFIX", _SUFFIX)
    original = lru_cache.LRUCache.put

    def put(self, key, value):
        if getattr(self, "eviction_enabled", True):
            return original(self, key, value)
        return _atomic_put(self, key, value)

    lru_cache.LRUCache.put = put
    _patched = True


def configure(path=None, *, enabled: bool = True, export: bool = False):
    """Set galbayes' persistent compilation cache now.

    Parameters
    ----------
    path : str or Path, optional
        Cache folder (default: ``$GALBAYES_CACHE_DIR``, else a folder already configured as
        ``jax_compilation_cache_dir``, else :func:`default_cache_dir`).
    enabled : bool
        ``False`` turns the cache off for this process.
    export : bool
        Also set ``GALBAYES_CACHE_DIR`` so that child processes (Dask workers) follow.

    Returns the folder in use, or None.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    with _lock:
        folder = None
        if enabled:
            named = path is not None or os.environ.get(ENV) is not None
            if path is not None:
                folder = Path(path).expanduser()
            elif ENV not in os.environ and jax.config.jax_compilation_cache_dir:
                folder = Path(jax.config.jax_compilation_cache_dir)   # the user's own choice stays
                named = True
            else:
                folder = _requested()
            reason = cache_off_reason() if folder is not None else None
            if reason is not None:
                if named:
                    warn_once(f"using the compilation cache in {folder} as asked, but {reason}")
                else:
                    warn_once(f"the compilation cache is off: {reason}")
                    folder = None
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError:
                folder = None
        if folder is None:
            if _state["dir"] is not None:
                jax.config.update("jax_compilation_cache_dir", None)
                cc.reset_cache()
            if export:
                os.environ[ENV] = "off"
        else:
            _patch_atomic_writes()
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
            if jax.config.jax_compilation_cache_dir != str(folder):
                jax.config.update("jax_compilation_cache_dir", str(folder))
                cc.reset_cache()   # takes effect even if something was compiled already
            if export:
                os.environ[ENV] = str(folder)
        _state.update(configured=True, dir=folder)
        return folder


def ensure():
    """Configure the default cache once per process (no-op if already configured, or if
    the user configured JAX's cache folder themselves)."""
    if _state["configured"]:
        return _state["dir"]
    import jax

    user_dir = jax.config.jax_compilation_cache_dir
    if user_dir:
        reason = cache_off_reason()
        if reason is not None:
            warn_once(f"JAX's compilation cache is set to {user_dir}, but {reason}")
        with _lock:
            _state.update(configured=True, dir=Path(user_dir))
        _patch_atomic_writes()
        return _state["dir"]
    return configure()


def cache_dir():
    """The cache folder in use (None if off or not configured yet)."""
    return _state["dir"]


def compile_uncached(lowered):
    """``lowered.compile()`` with the persistent cache bypassed for this one program.

    An executable that JAX took from the persistent cache serializes without its kernels
    (jaxlib 0.10.1: loading that copy fails with "Function ... not found"), so a program that
    is to be stored (:mod:`galbayes.traced`) must be compiled for real.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    with _lock:
        folder = jax.config.jax_compilation_cache_dir
        if not folder:
            return lowered.compile()
        jax.config.update("jax_compilation_cache_dir", None)
        cc.reset_cache()
        try:
            return lowered.compile()
        finally:
            jax.config.update("jax_compilation_cache_dir", folder)
            cc.reset_cache()


class CompileStats:
    """Counts of XLA compilations and persistent-cache hits, and the seconds spent compiling
    (XLA backend compile) and tracing/lowering, from ``jax.monitoring`` events."""

    _EVENTS = {
        "/jax/compilation_cache/cache_hits": "cache_hits",
        "/jax/compilation_cache/cache_misses": "cache_misses",
    }
    _DURATIONS = {
        "/jax/core/compile/backend_compile_duration": "compile_s",
        "/jax/core/compile/jaxpr_trace_duration": "trace_s",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
        "/jax/compilation_cache/cache_retrieval_time_sec": "retrieval_s",
    }

    def __init__(self):
        self.counts = {"cache_hits": 0, "cache_misses": 0, "compiles": 0}
        self.seconds = {"compile_s": 0.0, "trace_s": 0.0, "lower_s": 0.0, "retrieval_s": 0.0}
        self._installed = False

    def install(self):
        if self._installed:
            return self
        import jax.monitoring as mon

        def on_event(name, **kw):
            key = self._EVENTS.get(name)
            if key:
                self.counts[key] += 1

        def on_duration(name, secs, **kw):
            key = self._DURATIONS.get(name)
            if key:
                self.seconds[key] += float(secs)
            if name == "/jax/core/compile/backend_compile_duration":
                self.counts["compiles"] += 1

        mon.register_event_listener(on_event)
        mon.register_event_duration_secs_listener(on_duration)
        self._installed = True
        return self

    def snapshot(self) -> dict:
        return {**self.counts, **{k: round(v, 3) for k, v in self.seconds.items()}}

    def summary(self, since: dict | None = None) -> str:
        s = self.snapshot()
        if since:
            s = {k: (v - since.get(k, 0)) for k, v in s.items()}
        # backend_compile_duration is recorded for cache hits too (the retrieval); the XLA
        # compilations proper are the misses when the cache is on, else every compile
        built = s["cache_misses"] if (s["cache_hits"] or s["cache_misses"]) else s["compiles"]
        return (f"compile: {built} XLA program(s) built, {s['cache_hits']} from the cache; "
                f"{s['compile_s']:.1f} s compiling/loading, {s['trace_s'] + s['lower_s']:.1f} s tracing")


_STATS = CompileStats()


def compile_stats() -> CompileStats:
    """The process-wide :class:`CompileStats` (listeners installed on first call)."""
    return _STATS.install()
