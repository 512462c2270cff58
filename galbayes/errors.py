"""Exceptions raised for bad input; each names the galaxy, the array or parameter, and the problem."""


class InputError(ValueError):
    """Bad input data (image, σ map, mask, PSF, catalog row) for one galaxy."""

    def __init__(self, problem: str, *, galaxy=None, what: str | None = None):
        self.galaxy, self.what, self.problem = galaxy, what, problem
        parts = []
        if galaxy is not None:
            parts.append(f"galaxy {galaxy}")
        if what:
            parts.append(what)
        super().__init__(": ".join(parts + [problem]) if parts else problem)


class ModelError(ValueError):
    """A model or recipe that cannot be built (unknown profile or parameter, bad bounds)."""
