"""Exceptions of galbayes; each names the galaxy, the array or parameter, and the problem.

Every error the package raises on purpose derives from :class:`GalbayesError`, so callers (the
CLI, a pipeline script) can catch "a galbayes error" in one clause and print it in one line;
anything else is a bug and keeps its traceback. The concrete classes also derive from the
builtin that fits (``ValueError`` for bad values), so ``except ValueError`` keeps working.
"""


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
