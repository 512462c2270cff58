"""Cost of one Levenberg–Marquardt iteration per galaxy, this tree against a baseline revision.

The LM of :func:`galbayes.inference.map._lm_parts` linearises the residuals once per
iteration (one forward pass per free parameter) and solves a small system: that iteration is
the unit of MAP cost that model fidelity (issue 11: effective PSFs, padded canvas,
band-limited core) may raise by at most 30 %. Here one iteration is timed as the slope of a
jitted, vmapped loop of ``k`` LM bodies: ``(t(k_hi) − t(k_lo)) / (k_hi − k_lo) / batch``, so
dispatch and the start's linearisation drop out.

``--baseline REV`` checks REV out in a temporary ``git worktree`` and times it in separate
processes alternating with this tree's (A B A B …), so that a shared, noisy machine moves
both alike; the report is the median of each and their ratio. Without ``--baseline`` only this
tree is timed. The same synthetic galaxies (a Sérsic blob with noise, 41² Moffat PSF) are fed
to both; only the model code differs.

Examples::

    python benchmarks/bench_iteration.py --baseline 4d39e6c^        # before issue 11
    python benchmarks/bench_iteration.py --no-core                  # core off (Model(core=False))
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _galaxies(count, size, psf_size, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size].astype(float)
    c = (size - 1) / 2
    out = []
    for i in range(count):
        re, q, pa = rng.uniform(3, 15), rng.uniform(0.3, 1), rng.uniform(0, 180)
        t = np.radians(pa)
        dx, dy = x - c - rng.uniform(-1, 1), y - c - rng.uniform(-1, 1)
        u = -dx * np.sin(t) + dy * np.cos(t)
        v = dx * np.cos(t) + dy * np.sin(t)
        r = np.hypot(u, v / q)
        img = 50 * np.exp(-2.0 * ((r / re) ** 0.5 - 1))
        sigma = np.sqrt(0.01 ** 2 + np.abs(img) / 500) + 0.01
        img = img + rng.normal(size=img.shape) * sigma
        py, px = np.mgrid[:psf_size, :psf_size] - (psf_size - 1) / 2
        psf = (1 + (px ** 2 + py ** 2) / 2.4 ** 2) ** -3.5
        out.append(dict(image=img.astype("f4"), sigma=sigma.astype("f4"), psf=psf / psf.sum(), id=f"g{i}"))
    return out


def measure(*, batch, size, psf_size, k_lo, k_hi, repeats, core, seed=0):
    """Seconds per galaxy per LM iteration for the galbayes importable here."""
    import jax
    import jax.flatten_util

    import galbayes
    from galbayes.inference import map as gmap

    kw = {} if core else {"core": False}
    model = galbayes.Model([galbayes.Component("s", "sersic")], **kw)
    gals = model.stack([model.pack(galbayes.Observation(**g)) for g in _galaxies(batch, size, psf_size, seed)])
    opts = gmap.MapOptions()

    def run(gal, k):
        lm = gmap._lm_parts(model, gal, opts)
        z0 = gmap._z_template(model, gal)
        c = lm.start(jax.flatten_util.ravel_pytree(z0)[0])
        c = jax.lax.fori_loop(0, k, lambda i, c: lm.body(c), c)
        return c.x

    fns = {k: jax.jit(jax.vmap(lambda g, k=k: run(g, k))) for k in (k_lo, k_hi)}
    for f in fns.values():
        jax.block_until_ready(f(gals))
    times = {k: [] for k in fns}
    for _ in range(repeats):             # interleaved, so that a busy spell hits both
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(gals))
            times[k].append(time.perf_counter() - t0)
    return (min(times[k_hi]) - min(times[k_lo])) / (k_hi - k_lo) / batch


def _child(args, src, *, no_core=False):
    env = dict(os.environ, PYTHONPATH=str(src), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, __file__, "--child", "--batch", str(args.batch), "--size", str(args.size),
           "--psf-size", str(args.psf_size), "--k-lo", str(args.k_lo), "--k-hi", str(args.k_hi),
           "--repeats", str(args.repeats)] + (["--no-core"] if no_core else [])
    proc = subprocess.run(cmd, env=env, cwd=src, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"the timing process for {src} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["per_iter"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", help="git revision to compare with (checked out in a temporary worktree)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=128, help="stamp side (pixels)")
    ap.add_argument("--psf-size", type=int, default=41)
    ap.add_argument("--k-lo", type=int, default=1)
    ap.add_argument("--k-hi", type=int, default=17)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per k (the fastest counts)")
    ap.add_argument("--rounds", type=int, default=4, help="alternating process pairs")
    ap.add_argument("--no-core", action="store_true", help="this tree with Model(core=False)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        per = measure(batch=args.batch, size=args.size, psf_size=args.psf_size, k_lo=args.k_lo,
                         k_hi=args.k_hi, repeats=args.repeats, core=not args.no_core)
        print(json.dumps({"per_iter": per}))
        return 0
    trees = {"this tree": REPO}
    tmp = None
    if args.baseline:
        tmp = tempfile.mkdtemp(prefix="galbayes-baseline-")
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", tmp, args.baseline],
                       check=True, capture_output=True)
        trees = {f"baseline {args.baseline}": Path(tmp), "this tree": REPO}
    try:
        got = {name: [] for name in trees}
        for r in range(args.rounds):
            for name, src in trees.items():
                # --no-core is this tree's option (a baseline may have no such switch)
                got[name].append(_child(args, src, no_core=args.no_core and src == REPO))
                print(f"round {r + 1}: {name}: {1e3 * got[name][-1]:.2f} ms/galaxy/iteration", flush=True)
    finally:
        if tmp:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", tmp], capture_output=True)
    med = {name: statistics.median(v) for name, v in got.items()}
    print(f"\nLM iteration, {args.size}² stamps, {args.psf_size}² PSF, batch {args.batch}, "
          f"median of {args.rounds} processes:")
    for name, v in med.items():
        print(f"  {name}: {1e3 * v:.2f} ms/galaxy")
    report = {"median_s": med, "all_s": got, "args": vars(args)}
    if args.baseline:
        ratios = [b / a for a, b in zip(*got.values())]
        report["ratio"] = statistics.median(ratios)
        print(f"  this tree / baseline: {report['ratio']:.3f} (per pair: "
              + ", ".join(f"{x:.3f}" for x in ratios) + ")")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
