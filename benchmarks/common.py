"""Shared pieces of the benchmarks: a cached GalSim mock pool, an Imfit (pyimfit) fitter in
galbayes' conventions, accuracy summaries, peak memory and a machine description."""
from __future__ import annotations

import datetime
import os
import platform
import resource
import sys
from pathlib import Path

import numpy as np
from scipy import special

KEYS = ("sersic_xc", "sersic_yc", "sersic_pa", "sersic_q", "sersic_re", "sersic_n", "sersic_mag")


# --------------------------------------------------------------------------- mocks
def save_mocks(path, mocks) -> Path:
    """Write GalSim mocks (128×128, 41×41 PSF by default) to one .npz, so that subprocesses
    do not re-render them."""
    path = Path(path)
    np.savez(path, image=np.stack([m.obs.image for m in mocks]), sigma=np.stack([m.obs.sigma for m in mocks]),
             psf=mocks[0].obs.psf, zp=mocks[0].obs.zp,
             truth=np.array([[m.truth[k] for k in KEYS] for m in mocks]),
             init=np.array([[m.init[k] for k in KEYS] for m in mocks]))
    return path


def load_mocks(path):
    """(observations, truths, inits) from :func:`save_mocks`."""
    from galbayes.data import Observation

    d = np.load(path)
    obs = [Observation(image=d["image"][i], sigma=d["sigma"][i], psf=d["psf"], id=f"mock{i:05d}", zp=float(d["zp"]))
           for i in range(len(d["image"]))]
    truths = [dict(zip(KEYS, map(float, t))) for t in d["truth"]]
    inits = [dict(zip(KEYS, map(float, t))) for t in d["init"]]
    return obs, truths, inits


def mock_pool(count: int, seed: int, path) -> Path:
    """Render ``count`` perturbed-start Sérsic mocks (galbayes.mocks defaults: n 0.5-6, re 2-20 px,
    q 0.25-1, 128×128, Moffat PSF 41×41) once and cache them at ``path``."""
    path = Path(path)
    if not path.exists():
        from galbayes.mocks import sersic_mocks

        save_mocks(path, sersic_mocks(count, seed=seed))
    return path


# --------------------------------------------------------------------------- Imfit
def sersic_flux_norm(n, re, q):
    """Total flux / I_e of an elliptical Sérsic profile (I_e at the major-axis r_e)."""
    nu = special.gammaincinv(2.0 * n, 0.5)
    return 2.0 * np.pi * q * re**2 * n * special.gamma(2.0 * n) * np.exp(nu) / nu ** (2.0 * n)


def imfit_fit(obs, init: dict, *, solver: str = "LM") -> dict:
    """Fit one galaxy with Imfit (pyimfit) from ``init``; values in galbayes' conventions.

    Imfit uses 1-based pixel centres (x = x0 + 1), PA counter-clockwise from +y (as galbayes),
    ell = 1 - q and the surface brightness I_e at r_e, converted to a total magnitude with
    the analytic Sérsic flux. Bounds as galbayes' 'sersic' recipe (n 0.3-10, re 0.3-200 px,
    q >= 0.05), centre within ±10 px of the start, PA within ±90°.
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
    return {"sersic_xc": x0 - 1.0, "sersic_yc": y0 - 1.0, "sersic_pa": (pa + 90.0) % 180.0 - 90.0,
            "sersic_q": q, "sersic_n": n, "sersic_re": re,
            "sersic_mag": zp - 2.5 * np.log10(ie * sersic_flux_norm(n, re, q)),
            "chi2": float(fitter.fitStatistic), "n_iter": int(result.nIter),
            "converged": bool(result.fitConverged)}


# --------------------------------------------------------------------------- metrics
def accuracy(rows, truths) -> dict:
    """Median absolute fractional errors in re and n, median |Δmag|, median signed Δn/n, and
    the fraction of galaxies within 10% in both re and n."""
    dre = np.array([r["sersic_re"] / t["sersic_re"] - 1.0 for r, t in zip(rows, truths)])
    dn = np.array([r["sersic_n"] / t["sersic_n"] - 1.0 for r, t in zip(rows, truths)])
    dmag = np.array([r["sersic_mag"] - t["sersic_mag"] for r, t in zip(rows, truths)])
    return {"med_abs_dre": float(np.median(np.abs(dre))), "med_abs_dn": float(np.median(np.abs(dn))),
            "med_abs_dmag": float(np.median(np.abs(dmag))), "med_dn": float(np.median(dn)),
            "within10": float(np.mean((np.abs(dre) < 0.1) & (np.abs(dn) < 0.1)))}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB; Linux reports ru_maxrss in KiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def machine() -> dict:
    import jax

    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend(),
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}
