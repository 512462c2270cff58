"""Exceptions of galbayes; each names the galaxy, the array or parameter, and the problem.

Every error the package raises on purpose derives from :class:`GalbayesError`, so callers (the
CLI, a pipeline script) can catch "a galbayes error" in one clause and print it in one line;
anything else is a bug and keeps its traceback. The concrete classes also derive from the
builtin that fits (``ValueError`` for bad values), so ``except ValueError`` keeps working.

:class:`CatalogError` is also importable from :mod:`galbayes.catalog`, and :class:`ResumeError`
and :class:`OutputError` from :mod:`galbayes.runner` (the same class objects).
:class:`galbayes.runner.RunInterrupted` is not an error (a run stopped on request) and does not
derive from :class:`GalbayesError`.
"""

__all__ = ["GalbayesError", "InputError", "ModelError", "OptionsError", "CatalogError", "ResumeError",
           "OutputError", "warn_once"]

_warned: set = set()


def warn_once(message: str, *, stacklevel: int = 3) -> None:
    """A ``RuntimeWarning`` with ``message``, once per process per message (a condition the
    user should know of but that does not stop the work, e.g. a cache left off)."""
    if message in _warned:
        return
    _warned.add(message)
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


class GalbayesError(Exception):
    """Base of every error galbayes raises on purpose (bad input, model, catalog, output)."""


class InputError(GalbayesError, ValueError):
    """Bad input data (image, σ map, mask, PSF, catalog row) for one galaxy."""

    def __init__(self, problem: str, *, galaxy=None, what: str | None = None):
        self.galaxy, self.what, self.problem = galaxy, what, problem
        parts = []
        if galaxy is not None:
            parts.append(f"galaxy {galaxy}")
        if what:
            parts.append(what)
        super().__init__(": ".join(parts + [problem]) if parts else problem)


class ModelError(GalbayesError, ValueError):
    """A model or recipe that cannot be built (unknown profile or parameter, bad bounds)."""


class OptionsError(GalbayesError, ValueError):
    """A bad option or argument: a fit setting (:class:`~galbayes.inference.map.MapOptions`),
    a batch or shard size, an error-bar method, a device count, a plotting argument."""


class CatalogError(GalbayesError, ValueError):
    """A malformed catalog: raised before any fitting, naming the column or row."""


class ResumeError(CatalogError):
    """A run that cannot go on in ``out_dir``: its inputs changed since the recorded run
    (catalog, recipe, options or software), its manifest is unreadable, or another run is
    using the folder. Raised before any fitting."""


class OutputError(CatalogError):
    """``out_dir`` cannot be written (read-only, permission denied, disk full or over
    quota). Raised before the catalog is read if the folder is not writable, or when a
    write fails during the run; nothing half-written is left behind and the shards
    committed so far are kept for ``resume=True``."""
