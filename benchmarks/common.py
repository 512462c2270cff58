"""Shared pieces of the benchmarks: a cached GalSim mock pool, accuracy summaries, peak memory
and a machine description (the Imfit fitter is :mod:`galbayes.reference`)."""
from __future__ import annotations

import datetime
import os
import platform
import resource
import sys
from pathlib import Path

import numpy as np

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
