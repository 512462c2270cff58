"""Independent references for checking fits: Imfit (pyimfit) in galbayes' conventions, and a
float64 SciPy least-squares minimum of galbayes' own χ².

Used by the tests and the benchmarks (``pyimfit`` is a test-only dependency and imported
only when :func:`imfit_fit` is called). Everything here works on one galaxy at a time on the
host: it is a yardstick, not a fitter.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize, special

from .params import wrap_angle

__all__ = ["sersic_flux_norm", "imfit_fit", "Chi2Reference"]


def sersic_flux_norm(n, re, q):
    """Total flux / I_e of an elliptical Sérsic profile (I_e at the major-axis r_e), float64."""
    nu = special.gammaincinv(2.0 * n, 0.5)
    return 2.0 * np.pi * q * re**2 * n * special.gamma(2.0 * n) * np.exp(nu) / nu ** (2.0 * n)


def imfit_fit(obs, init: dict, *, solver: str = "LM") -> dict:
    """Fit one galaxy with a single Imfit Sérsic (pyimfit) from ``init``.

    Parameters
    ----------
    obs : galbayes.Observation
        Image, σ, PSF, weight (0 = masked) and zero point.
    init : dict
        Starting values keyed ``sersic_xc ... sersic_mag`` (galbayes' conventions).
    solver : {"LM", "NM", "DE"}
        Imfit's solver.

    Returns
    -------
    dict
        The fitted ``sersic_*`` values in galbayes' conventions, plus ``chi2`` (Imfit's fit
        statistic), ``n_iter`` and ``converged``.

    Notes
    -----
    Imfit uses 1-based pixel centres (x = x0 + 1), PA counter-clockwise from +y (as
    galbayes), ell = 1 - q and the surface brightness I_e at r_e, converted to a total
    magnitude with the analytic Sérsic flux. Bounds as galbayes' ``sersic`` recipe
    (n 0.3-10, re 0.3-200 px, q >= 0.05), centre within ±10 px of the start, PA within ±90°.
    """
    import pyimfit

    zp = obs.zp
    x0, y0 = init["sersic_xc"] + 1.0, init["sersic_yc"] + 1.0
    n, re, q, pa = init["sersic_n"], init["sersic_re"], init["sersic_q"], init["sersic_pa"]
    ie = 10 ** (-0.4 * (init["sersic_mag"] - zp)) / sersic_flux_norm(n, re, q)
    md = pyimfit.SimpleModelDescription()
    md.x0.setValue(x0, [x0 - 10.0, x0 + 10.0])
    md.y0.setValue(y0, [y0 - 10.0, y0 + 10.0])
    f = pyimfit.make_imfit_function("Sersic", label="sersic")
    f.PA.setValue(pa, [pa - 90.0, pa + 90.0])
    f.ell.setValue(min(max(1.0 - q, 0.0), 0.95), [0.0, 0.95])
    f.n.setValue(n, [0.3, 10.0])
    f.I_e.setValue(ie, [ie * 1e-3, ie * 1e3])
    f.r_e.setValue(re, [0.3, 200.0])
    md.addFunction(f)
    fitter = pyimfit.Imfit(md, psf=np.asarray(obs.psf, np.float64))
    result = fitter.fit(np.asarray(obs.image, np.float64), error=np.asarray(obs.sigma, np.float64),
                        mask=(np.asarray(obs.weight) == 0).astype(np.float64), solver=solver)
    x0, y0, pa, ell, n, ie, re = fitter.getRawParameters()
    q = 1.0 - ell
    return {"sersic_xc": x0 - 1.0, "sersic_yc": y0 - 1.0, "sersic_pa": wrap_angle(pa),
            "sersic_q": q, "sersic_n": n, "sersic_re": re,
            "sersic_mag": zp - 2.5 * np.log10(ie * sersic_flux_norm(n, re, q)),
            "chi2": float(fitter.fitStatistic), "n_iter": int(result.nIter),
            "converged": bool(result.fitConverged)}


class Chi2Reference:
    """χ² of galbayes' own model (its float32 residuals summed in float64) and an independent
    minimum of it.

    The minimum is SciPy's ``least_squares`` (MINPACK Levenberg–Marquardt, Jacobian by
    ``jax.jacfwd``, tolerances 1e-10) from a given start, falling back to the bounded
    trust-region solver when LM leaves the model's bounds, so that both minimise over the
    same domain.

    Parameters
    ----------
    model : galbayes.Model
    """

    def __init__(self, model):
        self.model = model
        self._res = jax.jit(model.residuals)
        self._jac = jax.jit(jax.jacfwd(model.residuals))

    def _gal(self, obs, init):
        return jax.tree_util.tree_map(jnp.asarray, self.model.pack(obs, init))

    def _full(self, gal, x):
        return gal.values0.at[jnp.asarray(self.model.free)].set(jnp.asarray(x, jnp.float32))

    def chi2(self, obs, values: dict) -> float:
        """χ² at ``values`` (keyed by parameter; the free ones are read)."""
        gal = self._gal(obs, {k: values[k] for k in self.model.free_keys})
        r = np.asarray(self._res(gal.values0, gal), np.float64)
        return float(r @ r)

    def minimum(self, obs, start: dict) -> tuple[float, dict]:
        """Least-squares minimum from ``start``; returns (χ², free values keyed by parameter)."""
        free = self.model.free
        gal = self._gal(obs, {k: start[k] for k in self.model.free_keys})
        lo, hi = np.asarray(gal.lo, np.float64), np.asarray(gal.hi, np.float64)
        x0 = np.asarray(gal.values0, np.float64)[free]
        fun = lambda x: np.asarray(self._res(self._full(gal, x), gal), np.float64)  # noqa: E731
        jac = lambda x: np.asarray(self._jac(self._full(gal, x), gal), np.float64)[:, free]  # noqa: E731
        tol = dict(ftol=1e-10, xtol=1e-10, gtol=1e-10, x_scale="jac")
        sol = optimize.least_squares(fun, x0, jac=jac, method="lm", max_nfev=200, **tol)
        if not (np.all(np.isfinite(sol.x)) and np.all((sol.x >= lo) & (sol.x <= hi))):
            span = hi - lo
            x0 = np.clip(x0, lo + 1e-6 * span, hi - 1e-6 * span)
            sol = optimize.least_squares(fun, x0, jac=jac, bounds=(lo, hi), method="trf", max_nfev=200, **tol)
        r = fun(sol.x)
        return float(r @ r), dict(zip(self.model.free_keys, sol.x))
