"""The command line: `galbayes demo` (reduced iteration budget), `galbayes fit` on a tiny
catalog, and exit code 2 with a message on stderr for bad input."""
from __future__ import annotations


import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from galbayes.cli import main
from galbayes.datasets import EXAMPLES
from galbayes.recipe import load_recipe

# The demo's budget; `fit` below uses the same one on two 128×128 galaxies with a 41×41 PSF,
# i.e. the same compiled program as the demo's two single-Sérsic galaxies.
BUDGET = ["--max-iter", "5", "--lm-iter", "10"]




@pytest.fixture(scope="module")
def tiny_catalog(tmp_path_factory):
    """A CSV catalog of two GalSim mocks (relative paths), without initial values."""
    pytest.importorskip("galsim")
    from galbayes.mocks import sersic_mocks

    d = tmp_path_factory.mktemp("cli")
    lines = ["id,image,sigma,psf"]
    for i, m in enumerate(sersic_mocks(2, seed=5)):
        names = []
        for role, arr in (("img", m.obs.image), ("sig", m.obs.sigma), ("psf", m.obs.psf)):
            fits.PrimaryHDU(np.asarray(arr, np.float32)).writeto(d / f"m{i}_{role}.fits")
            names.append(f"m{i}_{role}.fits")
        lines.append(",".join([f"m{i}"] + names))
    (d / "catalog.csv").write_text("\n".join(lines) + "\n")
    return d / "catalog.csv"


def test_demo(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path)] + BUDGET + ["--no-plots"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = []
    for recipe in sorted({r for r, _, _ in EXAMPLES.values()}):
        folder = tmp_path / recipe
        assert (folder / "results.csv").is_file()
        table = Table.read(folder / "results.fits")
        free = load_recipe(recipe).free_keys
        for row in table:
            gid = str(row["id"])
            rows.append(gid)
            assert row["status"] == "ok", row["status"]
            assert all(np.isfinite(row[k]) for k in free + ["chi2", "chi2_red", "loglike"]), gid
            assert 0.5 < row["chi2_red"] < 5.0, (gid, row["chi2_red"])
            assert (folder / "blocks" / f"{gid}.fits").is_file()
    assert sorted(rows) == sorted(EXAMPLES)
    for name in EXAMPLES:
        assert name in out


def test_fit_command(tiny_catalog, tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["fit", str(tiny_catalog), "--model", "sersic", "--out", str(out), "--quiet"] + BUDGET)
    assert rc == 0
    assert "fitted 2/2" in capsys.readouterr().out
    for name in ("results.fits", "results.csv"):
        t = Table.read(out / name, format="fits" if name.endswith("fits") else "ascii.csv")
        assert [str(i) for i in t["id"]] == ["m0", "m1"]
        assert all(str(s) == "ok" for s in t["status"])
        assert np.all(np.isfinite(t["sersic_re"]))
    assert sorted(p.name for p in (out / "blocks").iterdir()) == ["m0.fits", "m1.fits"]


def test_unknown_recipe_exit_code_2(tiny_catalog, tmp_path, capsys):
    rc = main(["fit", str(tiny_catalog), "--model", "no_such_recipe", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no_such_recipe" in err and "not found" in err
    assert not (tmp_path / "o" / "results.fits").exists()


def test_malformed_catalog_exit_code_2(tiny_catalog, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    lines = tiny_catalog.read_text().splitlines()
    bad.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")   # drop the psf column
    rc = main(["fit", str(bad), "--model", "sersic", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "missing required column" in err and "psf" in err
    assert not (tmp_path / "o" / "results.fits").exists()


def test_choice_lists_are_the_package_constants():
    import argparse

    from galbayes.cli import build_parser
    from galbayes.inference.map import OPTIMIZERS, POLISH_METHODS
    from galbayes.likelihood import LIKELIHOODS
    from galbayes.pipeline import ERROR_METHODS
    from galbayes.psf import PSF_TYPES

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))

    def choices(command, flag):
        act = next(a for a in sub.choices[command]._actions if flag in a.option_strings)
        return tuple(act.choices)

    assert choices("fit", "--errors") == tuple(ERROR_METHODS)
    assert choices("fit", "--likelihood") == choices("sample", "--likelihood") == tuple(LIKELIHOODS)
    assert choices("fit", "--psf-type") == tuple(PSF_TYPES)
    assert choices("fit", "--polish") == choices("demo", "--polish") == tuple(POLISH_METHODS)
    assert choices("fit", "--optimizer") == tuple(sorted(OPTIMIZERS))


_NOISY = r'''
import faulthandler, os, signal, sys
from galbayes.cli import _filter_jaxlib_noise
sys.argv = ["galbayes"] + sys.argv[1:]
_filter_jaxlib_noise()
faulthandler.enable()
head = b"E1202 11:23:46.352954   10146 cpu_aot_loader.cc:195] Loading XLA:CPU AOT result. Target machine feature "
os.write(2, head + b"+prefer-no-gather is not  supported on the host machine. Compile machine features: [...]\n")
os.write(2, b"progress 50%\r")                                  # no newline: passed on at once
os.write(2, head + b"+avx512f is not  supported on the host machine. This could lead to SIGILL.\n")
os.write(2, head[:40])                                            # a log line in two writes
os.write(2, head[40:] + b"+prefer-no-scatter is not  supported on the host machine.\n")
print("a real message", file=sys.stderr)
if "crash" in sys.argv:
    os.kill(os.getpid(), signal.SIGSEGV)
'''


@pytest.mark.parametrize("how", ["exit", "crash", "--debug"])
def test_stderr_filter_drops_only_jaxlib_false_alarms(tmp_path, how):
    """``galbayes`` drops jaxlib 0.10.1's '+prefer-no-gather is not supported' lines (logged on
    every program load), keeps every other line (a real CPU mismatch included), and a crash's
    faulthandler traceback still gets through; ``--debug`` filters nothing."""
    import os
    import subprocess
    import sys

    script = tmp_path / "noisy.py"
    script.write_text(_NOISY)
    env = {k: v for k, v in os.environ.items() if k != "GALBAYES_RAW_STDERR"}
    proc = subprocess.run([sys.executable, str(script), how], capture_output=True, env=env, timeout=120)
    err = proc.stderr.decode()
    assert "a real message" in err and "progress 50%" in err and "+avx512f is not" in err, err
    if how == "--debug":
        assert err.count("+prefer-") == 2, err
    else:
        assert "+prefer-" not in err, err
    if how == "crash":
        assert proc.returncode != 0 and "Fatal Python error" in err, err
    else:
        assert proc.returncode == 0, err
