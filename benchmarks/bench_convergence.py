"""Does the MAP fitter stop on the χ² minimum, and how many LM steps does it take?

Two sets, each fitted by :func:`galbayes.inference.fit_map` in one batch, then every galaxy's
χ² compared with an independent float64 SciPy least-squares minimum of the same model
(:class:`galbayes.reference.Chi2Reference`, started from galbayes' answer and from the truth,
the lower kept):

* ``calib``   — many noise realisations of the 40×40 calibration mock of
  ``bench_errors.py`` (LM only, as the error-bar calibration fits).
* ``general`` — 128×128 GalSim mocks, n 0.5-6, re 2-20 px, perturbed starts, default options.

Reported: χ²(galbayes) − χ²(min) (median, 99th percentile, max, count above 0.1), LM steps per
galaxy (a machine-independent cost), and the wall time of the batch (compile excluded).

Run: ``python benchmarks/bench_convergence.py [--n-calib 400] [--n-general 64] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import galbayes as gb
from galbayes.inference import fit_map
from galbayes.recipe import load_recipe
from galbayes.reference import Chi2Reference


def _report(name, model, batch, obs, truths, **opts):
    fit_map(model, batch, **opts)                                  # compile
    t0 = time.perf_counter()
    res = fit_map(model, batch, **opts)
    wall = time.perf_counter() - t0
    ref = Chi2Reference(model)
    gaps = []
    for j, o in enumerate(obs):
        mine = dict(zip(model.keys, res.values[j]))
        c_gb = ref.chi2(o, mine)
        c_min = min(ref.minimum(o, mine)[0], ref.minimum(o, truths[j])[0])
        gaps.append(c_gb - c_min)
    gaps = np.asarray(gaps)
    out = {"n": len(obs), "gap_median": float(np.median(gaps)), "gap_p99": float(np.percentile(gaps, 99)),
           "gap_max": float(gaps.max()), "n_above_0.1": int((gaps > 0.1).sum()),
           "lm_steps_mean": float(res.n_lm.mean()), "lm_steps_median": float(np.median(res.n_lm)),
           "lm_steps_max": int(res.n_lm.max()), "svi_steps_mean": float(res.n_svi.mean()),
           "converged": float(res.converged.mean()), "wall_s": wall}
    print(f"== {name}: {len(obs)} galaxies; chi2 - min: median {out['gap_median']:+.4f}, 99th pct "
          f"{out['gap_p99']:+.4f}, max {out['gap_max']:+.4f}, above 0.1: {out['n_above_0.1']}; LM steps mean "
          f"{out['lm_steps_mean']:.1f} median {out['lm_steps_median']:.0f} max {out['lm_steps_max']}; "
          f"converged {out['converged']:.3f}; {wall:.1f} s")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-calib", type=int, default=400)
    ap.add_argument("--n-general", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_errors import TRUTH, _calibration_mock

    from galbayes.mocks import sersic_mocks

    out = {}
    model = gb.Model([gb.Component("sersic", "sersic", {"re": {"bounds": [0.3, 40.0]},
                                                       "n": {"bounds": [0.3, 8.0]}})], likelihood="gaussian")
    noiseless, sigma, psf = _calibration_mock()
    rng = np.random.default_rng(11)
    obs = [gb.Observation(image=noiseless + rng.normal(size=noiseless.shape) * sigma, sigma=sigma, psf=psf,
                          zp=22.5, id=f"r{i}") for i in range(args.n_calib)]
    batch = gb.Model.stack([model.pack(o, TRUTH) for o in obs])
    out["calib"] = _report("calib (LM only, from the truth)", model, batch, obs, [TRUTH] * len(obs), max_iter=0)
    model = load_recipe("sersic")
    mocks = sersic_mocks(args.n_general, seed=99)
    batch = gb.Model.stack([model.pack(m.obs, m.init) for m in mocks])
    out["general"] = _report("general (SVI + LM, perturbed starts)", model, batch, [m.obs for m in mocks],
                             [m.truth for m in mocks])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
