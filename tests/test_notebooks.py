"""Execute the example notebooks top to bottom (reduced settings, ``FULL = False``) and check the
numbers they report.

Each notebook writes its key results as JSON to the path in ``GALBAYES_NB_RESULTS``; the
assertions below are the claims the notebooks make in their text. The notebooks run in a
temporary working directory with a kernel of the current interpreter (a kernel spec written
for the test, so no ``ipykernel install`` is needed). Total runtime on 2 CPU cores: a few
minutes, dominated by JAX compilation.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "galbayes-test-python"
CELL_TIMEOUT = 600


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory):
    """A Jupyter data dir holding a kernel spec that runs the current interpreter."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "galbayes tests", "language": "python"}))
    return root


def run_notebook(name, tmp_path, monkeypatch, kernel_dir) -> dict:
    """Execute ``notebooks/<name>`` in ``tmp_path``; return the JSON results it wrote."""
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    results = tmp_path / "results.json"
    monkeypatch.setenv("GALBAYES_NB_RESULTS", str(results))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert first_code.source.startswith("FULL = False"), "the first code cell must set FULL = False"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        f"{name} is saved with outputs; clear them"
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    assert results.exists(), f"{name} did not write its results"
    out = json.loads(results.read_text())
    assert out["FULL"] is False
    return out


def finite(x) -> bool:
    return x is not None and math.isfinite(float(x))


def test_01_single_sersic(tmp_path, monkeypatch, kernel_dir):
    r = run_notebook("01_single_sersic.ipynb", tmp_path, monkeypatch, kernel_dir)
    p = r["params"]
    assert r["converged"]
    # a real SDSS galaxy: the Sérsic model leaves some structure, but the fit is good
    assert 0.8 < r["chi2_red"] < 3.0
    assert all(finite(v) for v in p.values())
    # near the paper's SExtractor start (App. A: centre 64.93, 64.45 in 0-based pixels, q 0.64)
    assert abs(p["sersic_xc"] - 64.93) < 1.5 and abs(p["sersic_yc"] - 64.45) < 1.5
    assert abs(p["sersic_q"] - 0.64) < 0.1
    assert 0.35 < p["sersic_n"] < 9.5 and 1.0 < p["sersic_re"] < 100.0   # inside, not at, the bounds
    assert 15.0 < p["sersic_mag"] < 19.0
    assert r["flag"] == "ok"
    err = r["err_jacobian"]
    assert all(finite(e) and e > 0 for e in err.values())
    assert err["sersic_mag"] < 0.1 and err["sersic_re"] < 0.1 * p["sersic_re"] and err["sersic_n"] < 0.5
    assert r["n_axes"] == 6        # model, data, residual, histogram + profile and its residual


def test_02_bulge_disk(tmp_path, monkeypatch, kernel_dir):
    r = run_notebook("02_bulge_disk.ipynb", tmp_path, monkeypatch, kernel_dir)
    p = r["params"]
    assert r["converged"]
    assert 0.8 < r["chi2_red"] < 1.5
    assert all(finite(v) for v in p.values())
    assert abs(r["total_mag"] - 17.97) < 0.5           # the paper's SExtractor magnitude
    assert 0.0 < r["bulge_to_total"] < 1.0
    assert r["n_good"] >= 0.8 * r["n_boot"], r["boot_flag"]
    for k in ("disk_pa", "disk_q", "disk_rs", "disk_mag", "bulge_mag", "bulge_xc"):
        b, c = r["err_boot"][k], r["err_cov"][k]
        assert finite(b) and b > 0 and finite(c) and c > 0, k
        # two estimates of the same error: same order of magnitude (16 replicas in reduced mode)
        assert 0.1 < b / c < 10.0, (k, b, c)
    assert r["n_axes"] == 8        # model, bulge, disk, data, residual, histogram + 2 profile axes
    assert r["n_axes_fig4"] == len(r["err_cov"])


def test_03_complex_scene(tmp_path, monkeypatch, kernel_dir):
    r = run_notebook("03_complex_scene.ipynb", tmp_path, monkeypatch, kernel_dir)
    assert r["converged"]
    # χ² per dof within 4 standard deviations of 1 (fitted noise is exactly Gaussian, σ known)
    assert abs(r["chi2_red"] - 1.0) < 4.0 * math.sqrt(2.0 / r["dof"])
    # the optimiser found a point at least as good as the truth: differences from the truth are
    # the data's, not the fitter's
    assert r["chi2"] <= r["chi2_truth"] + 1.0
    # every parameter of the detectable components (disk, side galaxy, point sources, cluster:
    # 27 parameters) within 4σ of the truth. With Gaussian errors the chance that any of 27
    # exceeds 4σ is 0.2 %; the faint bulge and bar (≈ 3 % of the central light, degenerate with
    # each other and the disk) are excluded, their combined light is checked below.
    pulls = r["detectable"]
    assert len(pulls) == 27
    bad = {k: v for k, v in pulls.items() if not (finite(v) and abs(v) < 4.0)}
    assert not bad, bad
    c = r["central_mag"]
    assert finite(c["err"]) and 0 < c["err"] < 0.05
    assert abs(c["fit"] - c["truth"]) < 4.0 * c["err"]
    assert r["preview_axes"] == 3  # (a), (b) and the colour bar
    assert r["fit_axes"] == 13     # model + 7 components + data + residual + histogram + 2


def test_04_custom_profile(tmp_path, monkeypatch, kernel_dir):
    r = run_notebook("04_custom_profile.ipynb", tmp_path, monkeypatch, kernel_dir)
    assert r["registered"]
    assert r["converged"] and r["flag"] == "ok"
    assert abs(r["chi2_red"] - 1.0) < 0.05
    t, f, e = r["truth"], r["fitted"], r["err"]
    for k in ("sky_sky0", "sky_kx", "sky_ky"):
        assert finite(e[k]) and e[k] > 0
        assert abs(f[k] - t[k]) < 4.0 * e[k], (k, f[k], t[k], e[k])
    for k in ("sky_kx", "sky_ky"):            # the gradient, to a few per cent
        assert abs(f[k] - t[k]) < 0.05 * abs(t[k]), (k, f[k], t[k])
    for k in t:                               # the galaxy too (GalSim truth)
        assert abs(f[k] - t[k]) < 5.0 * e[k], (k, f[k], t[k], e[k])
    assert r["n_axes"] == 8        # model, galaxy, sky, data, residual, histogram + 2


def test_05_catalog_and_posteriors(tmp_path, monkeypatch, kernel_dir):
    pytest.importorskip("galsim")
    r = run_notebook("05_catalog_and_posteriors.ipynb", tmp_path, monkeypatch, kernel_dir)
    assert r["n_ok"] == r["n"]
    assert 0.9 < r["median_chi2_red"] < 1.1
    r2 = r["r2"]
    assert r2["mag"] > 0.99 and r2["q"] > 0.99 and r2["re"] > 0.99 and r2["n"] > 0.95, r2
    assert r["r2_pa_elongated"] > 0.99
    assert r["n_figures"] == 3 and r["fig3_axes"] == 5 and r["corner_axes"] == 10
    assert (tmp_path / "catalog_05" / "results" / "figures" / "mock00000.png").stat().st_size > 10_000
    # NUTS: converged chains and a posterior width matching the Laplace errors for these
    # high-S/N, near-Gaussian posteriors (400 draws: sd known to ~5-10 %)
    assert r["r_hat_max"] < 1.1
    assert max(r["divergences"]) <= 10
    ratios = np.array([v for g in r["sd_ratio"].values() for v in g.values()])
    assert np.all((ratios > 0.7) & (ratios < 1.4)), r["sd_ratio"]
