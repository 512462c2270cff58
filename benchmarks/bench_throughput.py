"""Throughput as users see it: `galbayes fit CATALOG --model sersic --out DIR`, every default,
timed as a subprocess (Python start, catalog read, FITS loading, compile, fit, blocks,
results), cold (empty compilation cache) and warm (cache filled), against Imfit's LM on two
processes on the same galaxies in the same run.

    python benchmarks/bench_throughput.py [--n 256] [--n-large 2048] [--n-mixed 256]
        [--imfit-n 256] [--n-paper 8289] [--workdir DIR] [--json FILE] [--no-imfit]

Figures:
* cold and warm wall time of the n-galaxy run (gal/s including everything);
* steady-state rate: (n_large - n) / (warm wall(n_large) - warm wall(n)), i.e. without the
  fixed cost of a run;
* fixed overhead of a run: wall(n) - n / steady rate (cold and warm);
* a catalog of mixed stamp sizes (64²-192², uniformly drawn; 41² PSF), cold and warm, per
  galaxy against the uniform 128² run of the same size;
* compilations (XLA programs built / loaded from the cache) and compile seconds, from the
  run's run.json; peak RSS of each run (VmHWM of the fitting process);
* with ``--n-paper N``: a cold run (its own empty cache) of N uniform mocks, N = 8289 being
  the paper's catalog (without it, that figure is estimated from the cold overhead and the
  steady rate);
* the warm n-galaxy run with ``--streams 1`` (one fit loop; the default runs one per core);
* Imfit (galbayes.reference.imfit_fit, pyimfit LM, one OpenMP thread per worker) on 2
  worker processes over the first ``--imfit-n`` galaxies of the uniform set, started from
  the mocks' perturbed values (galbayes starts from image moments: the CLI default).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Peak RSS of the fitting process: VmHWM (reset by exec), not ru_maxrss, which Linux carries
# over exec from the forked parent (a bench holding 8,289 mocks made every run read 3.4 GB).
RUNNER = ("import resource, sys\n"
          "from galbayes.cli import main\n"
          "rc = main(sys.argv[1:])\n"
          "try:\n"
          "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
          "except (OSError, IndexError):\n"
          "    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
          "print('GALBAYES_MAXRSS_KB', hwm, flush=True)\n"
          "sys.exit(rc)\n")


def write_catalog(folder: Path, mocks, *, shared_psf: bool = True) -> Path:
    """FITS files + catalog.csv (columns id, image, sigma, psf; no initial values: the CLI
    default starts from image moments)."""
    from astropy.io import fits

    folder.mkdir(parents=True, exist_ok=True)
    lines = ["id,image,sigma,psf"]
    psf_names = {}
    for i, m in enumerate(mocks):
        fits.PrimaryHDU(np.asarray(m.obs.image, np.float32)).writeto(folder / f"g{i:05d}_img.fits", overwrite=True)
        fits.PrimaryHDU(np.asarray(m.obs.sigma, np.float32)).writeto(folder / f"g{i:05d}_sig.fits", overwrite=True)
        psf = np.asarray(m.obs.psf, np.float32)
        key = psf.tobytes() if shared_psf else i
        if key not in psf_names:
            psf_names[key] = f"psf{len(psf_names):05d}.fits"
            fits.PrimaryHDU(psf).writeto(folder / psf_names[key], overwrite=True)
        lines.append(f"g{i:05d},g{i:05d}_img.fits,g{i:05d}_sig.fits,{psf_names[key]}")
    (folder / "catalog.csv").write_text("\n".join(lines) + "\n")
    return folder / "catalog.csv"


def run_cli(catalog: Path, out: Path, cache_dir: Path, extra=()) -> dict:
    cmd = [sys.executable, "-c", RUNNER, "fit", str(catalog), "--model", "sersic", "--out", str(out),
           "--cache-dir", str(cache_dir), "--quiet", *extra]
    env = dict(os.environ)
    env.pop("GALBAYES_CACHE_DIR", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"galbayes fit failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("GALBAYES_MAXRSS_KB")]
    timing = json.loads((out / "run.json").read_text()).get("timing", {})
    from astropy.table import Table

    from galbayes.status import is_usable

    t = Table.read(out / "results.fits")
    n_ok = int(np.sum([is_usable(s) for s in t["status"]]))
    return {"wall_s": round(wall, 2), "n": len(t), "n_ok": n_ok, "gal_per_s": round(len(t) / wall, 3),
            "peak_rss_mb": round(rss[0] / 1024, 1) if rss else None, "timing": timing,
            "converged": int(np.sum(t["converged"]))}


def _imfit_one(args):
    from galbayes.reference import imfit_fit

    obs, init = args
    return imfit_fit(obs, init)


def imfit_rate(mocks, processes: int = 2) -> dict:
    env_threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS",)}
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        ctx = mp.get_context("spawn")
        with ctx.Pool(processes) as pool:
            pool.map(_imfit_one, [(mocks[0].obs, mocks[0].init)] * processes)   # warm the workers
            t0 = time.perf_counter()
            pool.map(_imfit_one, [(m.obs, m.init) for m in mocks], chunksize=1)
            wall = time.perf_counter() - t0
    finally:
        for k, v in env_threads.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"n": len(mocks), "wall_s": round(wall, 2), "gal_per_s": round(len(mocks) / wall, 3),
            "processes": processes}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=256, help="galaxies of the main (uniform 128²) run")
    ap.add_argument("--n-large", type=int, default=2048, help="galaxies of the large run (steady-state rate)")
    ap.add_argument("--n-mixed", type=int, default=256, help="galaxies of the mixed-size run (0: skip)")
    ap.add_argument("--imfit-n", type=int, default=256, help="galaxies Imfit fits (0 / --no-imfit: skip)")
    ap.add_argument("--no-imfit", action="store_true")
    ap.add_argument("--no-cold-large", action="store_true", help="time the large run warm only")
    ap.add_argument("--n-paper", type=int, default=0,
                    help="also time a cold run (empty cache) of this many mocks: 8289 is the paper's "
                         "catalog (0: skip, the 8,289 figure is then estimated from the rates)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--workdir", default=None, help="folder for mocks, caches and outputs (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from common import machine  # noqa: E402  (benchmarks/common.py)
    from galbayes.mocks import sersic_mocks

    work = Path(args.workdir or tempfile.mkdtemp(prefix="galbayes-bench-tp-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "args": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}

    def load():
        try:
            return os.getloadavg()[0]
        except OSError:
            return None

    def log(name, r):
        report[name] = {**r, "load1": load()}
        print(f"{name}: {json.dumps(report[name])}", flush=True)

    n_max = max(args.n, args.n_large, args.n_paper)
    t0 = time.perf_counter()
    mocks = sersic_mocks(n_max, seed=args.seed)
    print(f"{n_max} mocks in {time.perf_counter() - t0:.0f} s", flush=True)
    cat_small = write_catalog(work / "uniform_small", mocks[: args.n])
    cat_large = write_catalog(work / "uniform_large", mocks[: args.n_large]) if args.n_large > args.n else None

    cache = work / "xla"
    shutil.rmtree(cache, ignore_errors=True)
    log("cold_small", run_cli(cat_small, work / "out_cold_small", cache))
    log("warm_small", run_cli(cat_small, work / "out_warm_small", cache))
    log("warm_small_no_blocks", run_cli(cat_small, work / "out_warm_small_nb", cache, ["--no-blocks"]))
    log("warm_small_streams1", run_cli(cat_small, work / "out_warm_small_s1", cache, ["--streams", "1"]))
    if cat_large is not None:
        if not args.no_cold_large:
            log("cold_large", run_cli(cat_large, work / "out_cold_large", work / "xla_large"))
        log("warm_large", run_cli(cat_large, work / "out_warm_large", cache))
        dn = args.n_large - args.n
        dt = report["warm_large"]["wall_s"] - report["warm_small"]["wall_s"]
        steady = dn / dt if dt > 0 else float("nan")
        report["steady_gal_per_s"] = round(steady, 3)
        report["overhead_warm_s"] = round(report["warm_small"]["wall_s"] - args.n / steady, 2)
        report["overhead_cold_s"] = round(report["cold_small"]["wall_s"] - args.n / steady, 2)
        print(f"steady state {steady:.2f} gal/s; fixed overhead warm {report['overhead_warm_s']} s, "
              f"cold {report['overhead_cold_s']} s", flush=True)

    if args.n_paper:
        cat_paper = write_catalog(work / "paper", mocks[: args.n_paper])
        log("cold_paper", run_cli(cat_paper, work / "out_cold_paper", work / "xla_paper"))
        print(f"{args.n_paper} galaxies cold (measured): {report['cold_paper']['wall_s'] / 60:.1f} min", flush=True)

    if args.n_mixed:
        rng = np.random.default_rng(args.seed + 1)
        sizes = rng.integers(64, 193, args.n_mixed)
        mixed = []
        for s in np.unique(sizes):
            k = int(np.sum(sizes == s))
            mixed += sersic_mocks(k, size=int(s), seed=args.seed + 100 + int(s))
        order = rng.permutation(len(mixed))
        mixed = [mixed[i] for i in order]
        cat_mixed = write_catalog(work / "mixed", mixed)
        report["mixed_sizes"] = {"distinct": int(len(np.unique(sizes))), "min": int(sizes.min()), "max": int(sizes.max())}
        log("cold_mixed", run_cli(cat_mixed, work / "out_cold_mixed", work / "xla_mixed"))
        log("warm_mixed", run_cli(cat_mixed, work / "out_warm_mixed", work / "xla_mixed"))
        uniform = report["warm_small"]["wall_s"] / args.n
        report["mixed_vs_uniform_warm"] = round(report["warm_mixed"]["wall_s"] / args.n_mixed / uniform, 3)
        report["mixed_vs_uniform_cold"] = round(report["cold_mixed"]["wall_s"] / args.n_mixed
                                                / (report["cold_small"]["wall_s"] / args.n), 3)
        print(f"mixed / uniform per galaxy: warm {report['mixed_vs_uniform_warm']}, "
              f"cold {report['mixed_vs_uniform_cold']}", flush=True)

    if args.imfit_n and not args.no_imfit:
        im = imfit_rate(mocks[: args.imfit_n])
        log("imfit_2proc", im)
        for k in ("warm_small", "cold_small"):
            report[f"{k}_vs_imfit"] = round(report[k]["gal_per_s"] / im["gal_per_s"], 2)
        if "steady_gal_per_s" in report:
            report["steady_vs_imfit"] = round(report["steady_gal_per_s"] / im["gal_per_s"], 2)
        print({k: v for k, v in report.items() if k.endswith("_vs_imfit")}, flush=True)
    if "steady_gal_per_s" in report:
        n_paper = 8289
        cold_est = report["overhead_cold_s"] + n_paper / report["steady_gal_per_s"]
        report["paper_8289_cold_estimate_s"] = round(cold_est, 1)
        print(f"8,289 galaxies cold (estimate from the measured rates): {cold_est / 60:.1f} min", flush=True)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
