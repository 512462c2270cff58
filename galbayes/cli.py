"""Command line: ``galbayes fit``, ``galbayes sample``, ``galbayes demo``, ``galbayes recipes``, ``galbayes prepare``.

Argument parsing only; the work is done by :mod:`galbayes.pipeline` and friends.

Exit status: 0 on success; 2 for a usage error or any :class:`~galbayes.errors.GalbayesError`
(bad catalog, recipe, input, option or output folder), printed as one line
``galbayes: error: <message>`` on stderr (``--debug``, before or after the command, shows the
traceback instead); 75 for a run stopped by SIGINT/SIGTERM at a shard boundary (finish it with
``--resume``); 130 for a second signal (stopped at once).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import GalbayesError

__all__ = ["main"]


def _map_args(p):
    from .inference.map import OPTIMIZERS, POLISH_METHODS, MapOptions

    d = MapOptions()      # the defaults the help texts quote

    p.add_argument("--batch-size", type=int, default=None,
                   help="galaxies per jitted batch (default 8 on CPU, 256 on GPU)")
    p.add_argument("--max-iter", type=int, default=None,
                   help=f"cap on SVI steps per galaxy (default {d.max_iter}; 0 = LM only)")
    p.add_argument("--lm-iter", type=int, default=None,
                   help=f"cap on Levenberg-Marquardt polish steps (default {d.lm_iter})")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=None,
                   help=f"optax optimizer for SVI (default {d.optimizer})")
    p.add_argument("--learning-rate", type=float, default=None, help=f"SVI step size (default {d.learning_rate})")
    p.add_argument("--polish", choices=list(POLISH_METHODS), default=None,
                   help=f"second-order polish after SVI (default {d.polish})")
    p.add_argument("--seed", type=int, default=None)


def _cache_args(p):
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="folder of the persistent XLA compilation cache (default $GALBAYES_CACHE_DIR, "
                        "else ~/.cache/galbayes/xla or the platform's user cache folder)")
    p.add_argument("--no-cache", action="store_true",
                   help="do not read or write compiled programs (compile everything afresh)")


def _setup_cache(args):
    """Configure the compilation cache from the flags (exported to child processes such as
    local Dask workers) and start counting compilations."""
    if not hasattr(args, "no_cache"):
        return None
    from . import cache

    cache.configure(args.cache_dir, enabled=not args.no_cache, export=True)
    return cache.compile_stats()


def _options(args):
    from .inference.map import MapOptions

    kw = {k: v for k, v in dict(max_iter=args.max_iter, lm_iter=args.lm_iter, optimizer=args.optimizer,
                                  learning_rate=args.learning_rate, polish=args.polish, seed=args.seed).items()
          if v is not None}
    return MapOptions(**kw)


def _print_table(table, keys):
    cols = ["id"] + keys + ["chi2_red", "n_iter", "converged", "status"]
    widths = [max(len(c), 10) for c in cols]
    widths[0] = max(len(str(v)) for v in list(table["id"]) + ["id"])
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in table:
        cells = []
        for c, w in zip(cols, widths):
            v = row[c]
            if isinstance(v, float) or hasattr(v, "dtype") and getattr(v.dtype, "kind", "") == "f":
                cells.append(f"{float(v):.4g}".ljust(w))
            else:
                cells.append(str(v).ljust(w))
        print("  ".join(cells))


def cmd_fit(args):
    from .pipeline import fit_catalog
    from .recipe import load_recipe

    import time

    stats = _setup_cache(args)
    t0 = time.perf_counter()
    model = load_recipe(args.model, likelihood=args.likelihood, psf_type=args.psf_type)
    table = fit_catalog(args.catalog, model, args.out, options=_options(args), batch_size=args.batch_size,
                        blocks=not args.no_blocks, progress=not args.quiet,
                        resume=args.resume, shard_size=args.shard_size, dask=args.dask,
                        errors=args.errors, streams=args.streams)
    from .status import is_usable
    n_ok = int(sum(1 for s in table["status"] if is_usable(s)))
    wall = time.perf_counter() - t0
    print(f"fitted {n_ok}/{len(table)} galaxies in {wall:.1f} s; results in {Path(args.out) / 'results.fits'}")
    if stats is not None and not args.quiet:
        from . import cache

        where = cache.cache_dir() or "off"
        print(f"{stats.summary()} (cache: {where}; per-run figures in {Path(args.out) / 'run.json'})")
    if not args.quiet:
        _print_table(table, [k for k in model.free_keys if k in model.keys])
    return 0


def cmd_demo(args):
    from .datasets import EXAMPLES, PIXEL_SCALE, write_demo_catalog
    from .pipeline import fit_catalog
    from .recipe import load_recipe

    _setup_cache(args)
    out = Path(args.out)
    by_recipe: dict = {}
    for name, (recipe, _, _) in EXAMPLES.items():
        by_recipe.setdefault(recipe, []).append(name)
    opts = _options(args)
    for recipe, names in by_recipe.items():
        model = load_recipe(recipe)
        cat = write_demo_catalog(out / recipe / "catalog.csv", names)
        table = fit_catalog(cat, model, out / recipe, options=opts, batch_size=args.batch_size,
                            progress=False)
        print(f"\n== recipe {recipe!r}: {', '.join(names)}  (sizes in pixels; 1 px = {PIXEL_SCALE}\")")
        _print_table(table, model.free_keys)
        if not args.no_plots:
            try:
                from .plot import save_fit_figures
            except ImportError:  # plotting lands with the notebooks issue
                continue
            save_fit_figures(model, out / recipe)
    print(f"\nresults and image blocks under {out}/")
    return 0


def cmd_sample(args):
    from .sampling import sample_results

    if not args.ids and not args.worst and args.rows is None and args.where is None:
        print("galbayes: error: give --ids ID [ID ...], --worst N, --rows I [I ...] or --where EXPR",
              file=sys.stderr)
        return 2
    summary, skipped = sample_results(args.results_dir, ids=args.ids, worst=args.worst, rows=args.rows,
                                      where=args.where, chains=args.chains,
                                      draws=args.draws, warmup=args.warmup, seed=args.seed or 0,
                                      likelihood=args.likelihood, batch_size=args.batch_size,
                                      log_likelihood=args.log_likelihood)
    for gid, why in skipped.items():
        print(f"skipped {gid}: {why}", file=sys.stderr)
    out = Path(args.results_dir)
    print(f"sampled {len(set(summary['id']))} galaxies; posteriors in {out / 'posteriors'}/, "
          f"diagnostics in {out / 'posterior_summary.csv'}")
    for row in summary:
        print(f"{row['id']}  {row['param']:<16} mean {row['mean']:<10.5g} sd {row['sd']:<10.3g} "
              f"r_hat {row['r_hat']:.4f}  ess_bulk {row['ess_bulk']:.0f}  divergences {row['divergences']}")
    return 0 if summary is not None and len(summary) else 1


def cmd_compare(args):
    from .compare import compare_runs

    table = compare_runs(args.run_dirs, out=args.out, loo=not args.no_loo)
    labels = [c[len("bic_"):] for c in table.colnames if c.startswith("bic_")]
    counts = {lab: int(sum(1 for p in table["preferred"] if p == lab)) for lab in labels}
    print(f"compared {len(labels)} runs over {len(table)} galaxies; table in {args.out}")
    print("preferred (lowest BIC): " + ", ".join(f"{lab} {n}" for lab, n in counts.items()))
    if not args.quiet:
        w = max([len(str(i)) for i in table["id"]] + [2])
        print(f"{'id'.ljust(w)}  {'preferred':<12} {'delta_bic':>10}  note")
        for row in table:
            print(f"{str(row['id']).ljust(w)}  {str(row['preferred']):<12} {float(row['delta_bic']):>10.2f}  "
                  f"{row['note']}")
    return 0


def cmd_recipes(args):
    from .recipe import builtin_recipes, load_recipe

    for name in builtin_recipes():
        m = load_recipe(name)
        print(f"{name}: {', '.join(m.free_keys)}")
    return 0


def cmd_prepare(args):
    from .prepare import prepare_cutouts, prepare_frame

    common = dict(out=args.out, gain=args.gain, zp=args.zp, pixel_scale=args.pixel_scale,
                  data_bounds=args.data_bounds, progress=None if args.quiet else print)
    if args.image is not None:
        if args.images or args.positions is None:
            print("galbayes: error: --image FRAME needs --positions RADEC.csv and no cutout files", file=sys.stderr)
            return 2
        cat = prepare_frame(image=args.image, positions=args.positions, psf=args.psf, sigma=args.sigma, **common)
    else:
        if not args.images:
            print("galbayes: error: give cutout FITS files, or --image FRAME --positions RADEC.csv", file=sys.stderr)
            return 2
        cat = prepare_cutouts(images=args.images, psf=args.psf, sigma_suffix=args.sigma_suffix,
                              image_suffix=args.image_suffix, sigma_pattern=args.sigma_pattern, **common)
    status = Path(cat).parent / "prepare_status.csv"
    import csv

    with open(status, newline="") as fh:
        rows = list(csv.DictReader(fh))
    from .status import is_usable
    n_ok = sum(1 for r in rows if is_usable(r["status"]))
    print(f"prepared {n_ok}/{len(rows)} targets: catalog {cat}, status per target in {status}")
    return 0


DEBUG_HELP = "on an error, show its traceback (default: one line 'galbayes: error: ...' on stderr, exit 2)"


def build_parser():
    from .likelihood import LIKELIHOODS
    from .fitting import ERROR_METHODS
    from .psf import PSF_TYPES

    parser = argparse.ArgumentParser(prog="galbayes", description="Batched Bayesian galaxy profile fitting.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="MAP-fit every galaxy of a catalog")
    p.add_argument("catalog", help="CSV/ECSV/FITS table: id, image, sigma, psf[, mask, mask_keep, zp, pixel_scale, hdu]")
    p.add_argument("--model", required=True, help="recipe TOML file or shipped recipe name (see 'galbayes recipes')")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--likelihood", choices=list(LIKELIHOODS), default=None)
    p.add_argument("--psf-type", choices=list(PSF_TYPES), default=None,
                   help="PSF images include the pixel response ('effective', default: PSFs measured from stars) "
                        "or are sampled at pixel centres ('optical'); a catalog psf_type column wins per galaxy")
    p.add_argument("--no-blocks", action="store_true",
                   help="do not write blocks/<id>.fits (catalog runs that only want the table)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out (refused if catalog, recipe or options changed)")
    p.add_argument("--shard-size", type=int, default=None,
                   help="catalog rows per durable shard file (default 8 x batch size, at least 256 without "
                        "--dask; --resume keeps the run's)")
    p.add_argument("--dask", default=None, metavar="ADDRESS|local:N",
                   help="fit shards on a Dask cluster: scheduler address, or local:N worker processes")
    p.add_argument("--streams", type=int, default=None, metavar="N",
                   help="fit loops run at once in this process (default: the CPU cores, at most 8; 1 on "
                        "a GPU and in each Dask worker); results change only at float32 rounding")
    p.add_argument("--errors", choices=list(ERROR_METHODS), default="none",
                   help="error bars: numpyro Laplace, the paper's (J^T W J)^-1, or a 100-replica pixel "
                        "bootstrap; adds <param>_err columns and covariance/<id>.fits (default none)")
    _map_args(p)
    _cache_args(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("sample", help="NUTS posteriors of chosen galaxies of a 'galbayes fit' output folder")
    p.add_argument("results_dir", help="output folder of 'galbayes fit' (results.fits, run.json)")
    p.add_argument("--ids", nargs="+", default=None, metavar="ID", help="galaxies to sample")
    p.add_argument("--worst", type=int, default=None, metavar="N",
                   help="and/or: the N fitted galaxies with the highest reduced chi2")
    p.add_argument("--rows", type=int, nargs="+", default=None, metavar="I",
                   help="and/or: 0-based row numbers of results.fits")
    p.add_argument("--where", default=None, metavar="EXPR",
                   help="and/or: rows of results.fits meeting 'COLUMN OP VALUE', e.g. 'sersic_n>4'")
    p.add_argument("--chains", type=int, default=4, help="chains per galaxy (default 4)")
    p.add_argument("--draws", type=int, default=1000, help="kept draws per chain (default 1000)")
    p.add_argument("--warmup", type=int, default=500, help="warmup iterations per chain (default 500)")
    p.add_argument("--likelihood", choices=list(LIKELIHOODS), default="gaussian",
                   help="pixel likelihood of the posterior (default gaussian; see galbayes.inference.nuts)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="galaxies whose chains run together (default 1 on CPU, 16 on GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-likelihood", action="store_true",
                   help="store per-pixel log-likelihoods of every draw in posteriors/<id>.nc (PSIS-LOO in "
                        "'galbayes compare'; n_pix x chains x draws floats per galaxy)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("compare", help="model choice (BIC, AIC, PSIS-LOO) between runs of one catalog")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="output folders of 'galbayes fit' over the same catalog with different recipes")
    p.add_argument("--out", default="compare.fits",
                   help="comparison table, .fits or .csv (default ./compare.fits)")
    p.add_argument("--no-loo", action="store_true", help="skip PSIS-LOO from posteriors/<id>.nc")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="fit the three bundled SDSS galaxies and print their parameters")
    p.add_argument("--out", default="galbayes-demo", help="output folder (default ./galbayes-demo)")
    p.add_argument("--no-plots", action="store_true")
    _map_args(p)
    _cache_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("prepare", help="cutouts or a frame + RA/Dec list -> masks, sigma maps, starting values, "
                                       "a catalog for 'galbayes fit' (galbayes.prepare)")
    p.add_argument("images", nargs="*", help="existing cutout FITS files (target at each centre)")
    p.add_argument("--out", required=True, help="catalog to write (.csv); masks etc. go to <stem>_prep/ beside it")
    p.add_argument("--psf", default=None, help="PSF FITS file (default: <name>_psf.fits beside each cutout)")
    p.add_argument("--sigma-suffix", default="_sigma", help="sigma map beside <name>_image.fits (default _sigma)")
    p.add_argument("--image-suffix", default="_image", help="suffix of the cutouts' names (default _image)")
    p.add_argument("--sigma-pattern", default=None, help="sigma file name pattern with {name}, {stem}, {ext}")
    p.add_argument("--image", default=None, metavar="FRAME", help="a large image with a WCS (with --positions)")
    p.add_argument("--positions", default=None, metavar="CSV", help="ra, dec[, id, psf] of the targets in FRAME")
    p.add_argument("--sigma", default=None, help="sigma map of FRAME (default: estimated per cutout)")
    p.add_argument("--gain", type=float, default=None, help="electrons per image unit (default: header GAIN)")
    p.add_argument("--zp", type=float, default=None, help="zero point (default: header MAGZP etc., else 22.5)")
    p.add_argument("--pixel-scale", type=float, default=None, help="arcsec per pixel for the catalog")
    p.add_argument("--data-bounds", action="store_true",
                   help="also write per-galaxy bounds columns (sersic_xc_lo, ...) centred on the estimates: centre "
                        "± 3 px, re within a factor 3, mag ± 1; galbayes fit applies them")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("recipes", help="list the shipped model recipes")
    p.set_defaults(func=cmd_recipes)

    # --debug also after the command; SUPPRESS keeps a subcommand from resetting a --debug
    # given before it (argparse copies every subcommand default into the namespace)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


#: Environment variable: set (to anything) to see jaxlib's stderr unfiltered (as ``--debug`` does).
RAW_STDERR_ENV = "GALBAYES_RAW_STDERR"

# The stderr filter (a separate process, so that it outlives a crash of the fitting process
# and still passes on faulthandler's traceback): drops jaxlib 0.10.1's false alarms about
# tuning pseudo-features (docs/known-issues.md), passes everything else on at once.
_FILTER = r"""
import os, re, signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
noise = re.compile(rb"cpu_aot_loader\.cc:\d+\] Loading XLA:CPU AOT result\. Target machine feature "
                   rb"\+(prefer|fast)-[\w.-]+ is not +supported on the host machine")
held = b""
while True:
    chunk = os.read(0, 1 << 16)
    if not chunk:
        break
    *lines, held = (held + chunk).split(b"\n")
    out = b"".join(line + b"\n" for line in lines if not noise.search(line))
    if held and not re.match(rb"[EWIF]\d", held):   # not a log line's start: pass it on now
        out, held = out + held, b""
    if out:
        os.write(2, out)
if held and not noise.search(held):
    os.write(2, held)
"""


def _filter_jaxlib_noise() -> None:
    """Route this process's stderr (file descriptor 2) through :data:`_FILTER`.

    Every load of a compiled program (XLA cache, stored programs) makes jaxlib 0.10.1 log two
    long ``E ... cpu_aot_loader.cc`` lines claiming a CPU mismatch that is not one
    (``+prefer-no-gather``, ``+prefer-no-scatter``: tuning features XLA itself adds). A
    warm ``galbayes fit`` would print ~30 of them. Real mismatches (an instruction set the host
    lacks) and everything else pass. Off with ``--debug`` or ``GALBAYES_RAW_STDERR``; nothing
    is filtered if the helper process cannot start.
    """
    import atexit
    import subprocess

    if os.environ.get(RAW_STDERR_ENV) or "--debug" in sys.argv:
        return
    try:
        sys.stderr.flush()
        read_end, write_end = os.pipe()
        proc = subprocess.Popen([sys.executable, "-S", "-E", "-c", _FILTER], stdin=read_end,
                                stdout=subprocess.DEVNULL, start_new_session=True)
    except (OSError, ValueError):
        return
    os.close(read_end)
    original = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def restore():
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(original, 2)          # the pipe's last copy closes: the filter drains and exits
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:   # a child process still holds the pipe
            pass

    atexit.register(restore)


def main(argv=None) -> int:
    """Run one command; returns the exit status (see the module docstring).

    Parameters
    ----------
    argv : list of str, optional
        The arguments after ``galbayes`` (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 2 for a :class:`~galbayes.errors.GalbayesError` (one line on stderr;
        re-raised with ``--debug``), 75 when stopped at a shard boundary, 130 when stopped at once.
    """
    from .runner import EXIT_INTERRUPTED, RunInterrupted

    if argv is None:   # the command itself (not a call from Python)
        _filter_jaxlib_noise()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GalbayesError as exc:  # a bad input, model, option, catalog or output folder
        if getattr(args, "debug", False):
            raise
        message = " ".join(str(exc).splitlines())  # one line, whatever the message holds
        print(f"galbayes: error: {message}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:  # SIGINT/SIGTERM: stopped at a shard boundary
        print(f"galbayes: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt as exc:  # a second signal: stopped at once
        print(f"galbayes: stopped at once ({exc or 'interrupted'}); the shard being fitted is not "
              "committed: run again with --resume to finish", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
