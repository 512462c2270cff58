"""The durable, sharded catalog runner (galbayes.runner): kill and resume, bad input at scale,
refused resumes, malformed catalogs and recipes, streamed results.

Stamps are 32×32 analytic Gaussians with a 9×9 PSF and the fits use tiny iteration budgets;
one model object is shared by every test (and by test_devices/test_dask) so its fit program
is compiled once per batch size.
"""
from __future__ import annotations

import csv
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

import galbayes.fitting as fitting
import galbayes.runner as runner
from galbayes.catalog import CatalogError
from galbayes.errors import ModelError
from galbayes.pipeline import fit_catalog
from galbayes.recipe import recipe_from_dict
from galbayes.runner import ResumeError

MODEL_CFG = {"oversample": [], "components": {"g": {"profile": "gaussian"}}}
MODEL_TOML = 'oversample = []\n\n[components.g]\nprofile = "gaussian"\n'
FIT = dict(max_iter=5, lm_iter=3)
BATCH = 8
N_STAMPS = 4


@functools.lru_cache(maxsize=None)
def model():
    """The shared test model (compiled programs are cached per Model object)."""
    return recipe_from_dict(MODEL_CFG)


def _gauss(size, xc, yc, s, flux):
    y, x = np.mgrid[:size, :size].astype(np.float64)
    g = np.exp(-((x - xc) ** 2 + (y - yc) ** 2) / (2 * s * s))
    return flux * g / g.sum()


def write_stamps(folder: Path, count: int = N_STAMPS, size: int = 32, psf_size: int = 9):
    """``img{i}.fits``, ``sig{i}.fits`` (noisy Gaussians, σ = 0.05) and ``psf.fits``."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "psf.fits").exists():
        c = (psf_size - 1) / 2
        fits.writeto(folder / "psf.fits", _gauss(psf_size, c, c, 1.2, 1.0), overwrite=True)
    for i in range(count):
        if (folder / f"img{i}.fits").exists():
            continue
        rng = np.random.default_rng(100 + i)
        img = _gauss(size, 15.3 + 0.4 * i, 15.6 - 0.3 * i, 2.0 + 0.4 * i, 150.0)
        img = img + rng.normal(0.0, 0.05, img.shape)
        fits.writeto(folder / f"img{i}.fits", img.astype(np.float32), overwrite=True)
        fits.writeto(folder / f"sig{i}.fits", np.full(img.shape, 0.05, np.float32), overwrite=True)


def good_row(j: int, gid: str | None = None) -> dict:
    i = j % N_STAMPS
    return {"id": gid or f"g{j:05d}", "image": f"img{i}.fits", "sigma": f"sig{i}.fits", "psf": "psf.fits"}


def write_catalog(folder: Path, rows, name: str = "cat.csv") -> Path:
    """A CSV catalog next to the stamps; ``rows`` is an int (that many good rows) or dicts."""
    write_stamps(folder)
    if isinstance(rows, int):
        rows = [good_row(j) for j in range(rows)]
    std = ("id", "image", "sigma", "psf")
    cols = [c for c in std if not rows or any(c in r for r in rows)]
    cols += sorted({k for r in rows for k in r} - set(std))
    path = folder / name
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})
    return path


def run(cat, out, **kw):
    kw = {"batch_size": BATCH, "shard_size": 8, "blocks": False, "progress": False, **FIT, **kw}
    return fit_catalog(cat, model(), out, **kw)


def same_files(a: Path, b: Path):
    for name in ("results.fits", "results.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


class Counter:
    """Counts shards fitted in this process (wraps runner._finish_shard)."""

    def __init__(self, monkeypatch):
        self.shards = []
        orig = runner._finish_shard

        def wrapped(model, job, k, rows, loaded, **kw):
            self.shards.append(k)
            return orig(model, job, k, rows, loaded, **kw)

        monkeypatch.setattr(runner, "_finish_shard", wrapped)


# --------------------------------------------------------------------------- kill and resume
def test_sigkill_then_resume_is_identical_to_an_uninterrupted_run(tmp_path, monkeypatch):
    n_rows, shard = 96, 8
    n_shards = n_rows // shard
    cat = write_catalog(tmp_path, n_rows)
    (tmp_path / "gauss.toml").write_text(MODEL_TOML)
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import sys, time
        import galbayes.runner as R
        _orig = R._finish_shard
        def slow(*a, **k):  # a pause after each shard file, before the journal update
            res = _orig(*a, **k)
            time.sleep(0.4)
            return res
        R._finish_shard = slow
        from galbayes.cli import main
        sys.exit(main(["fit", {str(cat)!r}, "--model", {str(tmp_path / 'gauss.toml')!r}, "--out", {str(out)!r},
                       "--batch-size", "{BATCH}", "--shard-size", "{shard}", "--max-iter", "{FIT['max_iter']}",
                       "--lm-iter", "{FIT['lm_iter']}", "--no-blocks", "--quiet"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if list((out / "shards").glob("shard_*.fits")):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.fits").exists()
    at_kill = runner.read_manifest(out)  # manifest.json + the shards committed in manifest.jsonl
    assert not at_kill["complete"]
    finished = {int(k) for k in at_kill["shards"]}
    assert 1 <= len(list((out / "shards").glob("shard_*.fits"))) and len(finished) < n_shards

    counter = Counter(monkeypatch)
    resumed = run(cat, out, resume=True, shard_size=shard)
    assert sorted(counter.shards) == sorted(set(range(n_shards)) - finished)  # only the missing shards
    reference = run(cat, tmp_path / "reference", shard_size=shard)
    same_files(out, tmp_path / "reference")  # bit-identical results.fits and results.csv
    assert list(resumed["id"]) == [f"g{j:05d}" for j in range(n_rows)]  # every row once, in order
    for c in resumed.colnames:
        assert np.array_equal(np.asarray(resumed[c]), np.asarray(reference[c])), c
    assert set(resumed["status"]) == {"ok"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and sorted(map(int, manifest["shards"])) == list(range(n_shards))


def test_resume_skips_finished_shards_and_refits_damaged_ones(tmp_path, monkeypatch):
    cat = write_catalog(tmp_path, 20)  # shards of 8, 8, 4
    out = tmp_path / "out"
    first = run(cat, out, blocks=True)
    assert len(first) == 20 and set(first["status"]) == {"ok"}
    assert len(list((out / "blocks").glob("*.fits"))) == 20
    before = {p.name: p.read_bytes() for p in (out / "shards").glob("*.fits")}
    assert sorted(before) == ["shard_00000.fits", "shard_00001.fits", "shard_00002.fits"]

    counter = Counter(monkeypatch)
    again = run(cat, out, blocks=True, resume=True)  # complete run: nothing to fit
    assert counter.shards == []
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.fits")} == before
    assert np.array_equal(np.asarray(again["g_xc"]), np.asarray(first["g_xc"]))

    (out / "shards" / "shard_00001.fits").write_bytes(b"damaged")
    (out / "results.fits").unlink()
    with pytest.warns(RuntimeWarning, match="shard 1"):
        run(cat, out, blocks=True, resume=True)
    assert counter.shards == [1]
    assert (out / "shards" / "shard_00001.fits").read_bytes() == before["shard_00001.fits"]
    t = Table.read(out / "results.fits")
    assert len(t) == 20 and len(set(t["id"])) == 20

    # without resume the recorded run is discarded and everything is fitted again
    counter.shards.clear()
    run(cat, out, blocks=True)
    assert sorted(counter.shards) == [0, 1, 2]


def test_streams_recorded_and_reused_on_resume(tmp_path, monkeypatch):
    """The stream count a run used is in its manifest; a resume that does not give one uses
    it again (a galaxy's fit depends on it at float32 rounding: same count, same bytes)."""
    from galbayes.inference.map import default_streams

    cat = write_catalog(tmp_path, 12)  # shards of 8, 4
    out = tmp_path / "out"
    run(cat, out)
    assert json.loads((out / "manifest.json").read_text())["streams"] == default_streams()
    run(cat, out, streams=3)
    assert json.loads((out / "manifest.json").read_text())["streams"] == 3
    used = []
    orig = runner._finish_shard

    def spy(model, job, k, rows, loaded, **kw):
        used.append(job.streams)
        return orig(model, job, k, rows, loaded, **kw)
    monkeypatch.setattr(runner, "_finish_shard", spy)
    (out / "shards" / "shard_00001.fits").write_bytes(b"damaged")
    with pytest.warns(RuntimeWarning, match="shard 1"):
        run(cat, out, resume=True)
    assert used == [3]
    assert json.loads((out / "manifest.json").read_text())["streams"] == 3
    with pytest.raises(runner.OptionsError, match="streams"):
        run(cat, tmp_path / "out2", streams=0)


def test_resume_refused_when_inputs_changed(tmp_path, monkeypatch):
    cat = write_catalog(tmp_path, 8)
    out = tmp_path / "out"
    run(cat, out)
    # catalog contents changed
    rows = [good_row(j) for j in range(8)]
    rows[3]["image"] = "img0.fits"
    write_catalog(tmp_path, rows)
    with pytest.raises(ResumeError, match="catalog file's contents changed") as exc:
        run(cat, out, resume=True)
    assert "without --resume" in str(exc.value)
    write_catalog(tmp_path, 8)
    # recipe changed: the message names the parameter that differs
    other = recipe_from_dict({"oversample": [], "components": {"g": {"profile": "gaussian",
                                                                      "params": {"q": {"bounds": [0.2, 1.0]}}}}})
    with pytest.raises(ResumeError, match=r"recipe/model changed.*g_q"):
        fit_catalog(cat, other, out, batch_size=BATCH, shard_size=8, blocks=False, progress=False,
                    resume=True, **FIT)
    # fit options and shard size changed
    with pytest.raises(ResumeError, match=r"fit options changed \(max_iter 5 → 6\)"):
        run(cat, out, resume=True, max_iter=6)
    with pytest.raises(ResumeError, match=r"shard_size 8 → 4"):
        run(cat, out, resume=True, shard_size=4)
    # the unchanged run resumes (nothing to do) and the CLI reports a refusal as an error
    run(cat, out, resume=True)
    # without a shard size, a resumed run keeps the recorded one (8), not the default (256)
    counter = Counter(monkeypatch)
    run(cat, out, resume=True, shard_size=None)
    assert counter.shards == [] and runner.read_manifest(out)["shard_size"] == 8
    from galbayes.cli import main

    (tmp_path / "gauss.toml").write_text(MODEL_TOML)
    rc = main(["fit", str(cat), "--model", str(tmp_path / "gauss.toml"), "--out", str(out), "--resume",
               "--shard-size", "8", "--batch-size", str(BATCH), "--max-iter", "7", "--no-blocks", "--quiet"])
    assert rc == 2


def test_default_shard_size():
    """8 × batch_size, at least MIN_SHARD_ROWS (256) locally; a Dask run keeps 8 × batch_size."""
    assert runner.MIN_SHARD_ROWS == 256
    assert runner.default_shard_size(8) == 256 and runner.default_shard_size(256) == 2048
    assert runner.default_shard_size(8, dask=True) == 64 and runner.default_shard_size(1, dask=True) == 8


def test_out_dir_in_use_is_refused(tmp_path):
    cat = write_catalog(tmp_path, 4)
    out = tmp_path / "out"
    out.mkdir()
    with runner._Lock(out):
        with pytest.raises(ResumeError, match="another galbayes run"):
            run(cat, out)


# --------------------------------------------------------------------------- bad input at scale
def _bad_inputs(folder: Path):
    """One row of each kind of bad input; returns {id: (row, expected status fragment)}."""
    write_stamps(folder)
    img = fits.getdata(folder / "img0.fits").astype(np.float64)
    sig = fits.getdata(folder / "sig0.fits").astype(np.float64)
    nan = img.copy()
    nan[3, 4] = np.nan
    inf = img.copy()
    inf[5, 6] = np.inf
    sig0 = sig.copy()
    sig0[7, 7] = 0.0
    fits.writeto(folder / "nan.fits", nan, overwrite=True)
    fits.writeto(folder / "inf.fits", inf, overwrite=True)
    fits.writeto(folder / "sigzero.fits", sig0, overwrite=True)
    fits.writeto(folder / "allmasked.fits", np.ones(img.shape, np.int16), overwrite=True)
    fits.writeto(folder / "bigpsf.fits", _gauss(81, 40, 40, 2.0, 1.0), overwrite=True)
    (folder / "corrupt.fits").write_bytes(b"SIMPLE  = this is not a FITS file" * 40)
    base = good_row(0)
    return {
        "missing": ({**base, "image": "nowhere.fits"}, "file not found"),
        "corrupt": ({**base, "sigma": "corrupt.fits"}, "cannot read"),
        "nan": ({**base, "image": "nan.fits"}, "NaN/inf pixel"),
        "inf": ({**base, "image": "inf.fits"}, "NaN/inf pixel"),
        "sigma0": ({**base, "sigma": "sigzero.fits"}, "σ ≤ 0"),
        "allmasked": ({**base, "mask": "allmasked.fits"}, "every pixel is masked"),
        "bigpsf": ({**base, "psf": "bigpsf.fits"}, "larger than twice the image"),
        "empty_psf": ({**base, "psf": ""}, "no file given"),
    }


def test_bad_inputs_each_get_a_status_and_good_galaxies_fit_as_in_a_clean_run(tmp_path, monkeypatch):
    bad = _bad_inputs(tmp_path)
    # 24 galaxies that load: 22 good + one whose fit comes out non-finite (zp 22.6) + one whose
    # batch raises (zp 22.7); the loading failures are spread between them.
    loadable = [good_row(j) for j in range(22)]
    loadable.insert(5, {**good_row(5, "nonfinite"), "zp": 22.6})
    loadable.insert(11, {**good_row(11, "raises"), "zp": 22.7})
    rows, bad_iter = [], iter(bad.items())
    for j, r in enumerate(loadable):
        rows.append(r)
        if j % 3 == 1:
            nxt = next(bad_iter, None)
            if nxt:
                rows.append({**nxt[1][0], "id": nxt[0]})
    assert len(rows) == 24 + len(bad)
    cat = write_catalog(tmp_path, rows, "bad.csv")
    clean = write_catalog(tmp_path, loadable, "clean.csv")
    shard = 64  # one shard: the galaxies that load form the same batches in both runs
    reference = run(clean, tmp_path / "clean", shard_size=shard)
    assert set(reference["status"]) == {"ok"}

    real_fit_map = fitting.fit_map

    def flaky_fit_map(model, batch, **kw):
        zp = np.asarray(batch.zp)
        if np.any(np.isclose(zp, 22.7)):
            raise RuntimeError("boom")
        res = real_fit_map(model, batch, **kw)
        res.values[np.isclose(zp, 22.6)] = np.nan
        return res

    monkeypatch.setattr(fitting, "fit_map", flaky_fit_map)
    with pytest.warns(RuntimeWarning, match="one by one"):
        table = run(cat, tmp_path / "bad", shard_size=shard)
    assert list(table["id"]) == [r["id"] for r in rows]  # one row per galaxy, input order
    status = dict(zip(table["id"], table["status"]))
    for gid, (_, fragment) in bad.items():
        assert status[gid].startswith("error:") and fragment in status[gid], (gid, status[gid])
        assert gid in status[gid] or "galaxy" not in status[gid]
    assert status["nonfinite"] == "fit failed: non-finite parameters or chi2"
    assert status["raises"] == "fit failed: RuntimeError: boom"
    ref = {r["id"]: r for r in reference}
    got = {r["id"]: r for r in table}
    raising_batch = {r["id"] for r in loadable[8:16]}  # fitted one by one after the batch raised
    assert "raises" in raising_batch
    for r in loadable:
        gid = r["id"]
        if gid in ("nonfinite", "raises"):
            assert np.isnan(got[gid]["g_xc"])
            continue
        assert got[gid]["status"] == "ok"
        for k in model().keys + ["chi2", "loglike"]:
            if gid in raising_batch:
                assert np.isclose(got[gid][k], ref[gid][k], rtol=1e-3, atol=1e-3), (gid, k)
            else:
                # the MAP runs in rounds and hands finished galaxies' slots to waiting ones, so
                # a galaxy's batch neighbours (and slot) differ between the two runs: rounding
                # differences move where the LM stops within its tolerance (seen: pa 6.6e-4 deg)
                assert (np.isclose(got[gid][k], ref[gid][k], rtol=1e-3, atol=1e-3)
                        or (np.isnan(got[gid][k]) and np.isnan(ref[gid][k]))), (gid, k, got[gid][k], ref[gid][k])
    for gid in bad:
        assert np.isnan(got[gid]["g_xc"]) and got[gid]["n_iter"] == -1
    # results.csv keeps the messages verbatim; results.fits (ASCII only) spells σ and ≤ out
    csv_rows = {r["id"]: r for r in csv.DictReader(open(tmp_path / "bad" / "results.csv", encoding="utf-8"))}
    assert csv_rows["sigma0"]["status"] == status["sigma0"]
    t = Table.read(tmp_path / "bad" / "results.fits")
    fits_status = {i.decode() if isinstance(i, bytes) else i: s for i, s in zip(t["id"], t["status"])}
    assert "sigma <= 0" in str(fits_status["sigma0"])
    assert len(t) == len(rows)


def test_streamed_results_match_the_table_writer(tmp_path):
    """results.fits/.csv assembled from shards hold the same data as astropy's writer."""
    from galbayes.results import write_table

    cat = write_catalog(tmp_path, 20)
    table = run(cat, tmp_path / "out")  # uneven shards: 8, 8, 4
    write_table(table, tmp_path / "direct")
    assert (tmp_path / "out" / "results.csv").read_bytes() == (tmp_path / "direct" / "results.csv").read_bytes()
    a, b = fits.open(tmp_path / "out" / "results.fits"), fits.open(tmp_path / "direct" / "results.fits")
    assert a[1].columns.names == b[1].columns.names and a[1].columns.formats == b[1].columns.formats
    for c in a[1].columns.names:
        assert np.array_equal(a[1].data[c], b[1].data[c]), c
    assert a[1].header["TUNIT2"] == b[1].header["TUNIT2"]
    a.close()
    b.close()


def test_empty_catalog(tmp_path):
    cat = write_catalog(tmp_path, [])
    table = run(cat, tmp_path / "out")
    assert len(table) == 0
    assert len(Table.read(tmp_path / "out" / "results.fits")) == 0
    assert (tmp_path / "out" / "results.csv").read_text().startswith("id,g_xc")


# --------------------------------------------------------------------------- malformed input
@pytest.mark.parametrize("change, message", [
    (lambda rows: [{k: v for k, v in r.items() if k != "psf"} for r in rows], r"missing required column\(s\) \['psf'\]"),
    (lambda rows: rows[:1] + [{**rows[1], "rms": rows[1]["sigma"]}], r"row 2 \(id g00001\): give one noise map"),
    (lambda rows: rows[:2] + [{**rows[2], "id": rows[0]["id"]}], r"duplicate id 'g00000' in rows 1 and 3"),
    (lambda rows: [{**r, "g_size": 3.0} for r in rows], r"column 'g_size' names no parameter"),
    (lambda rows: rows[:1] + [{**rows[1], "zp": "bright"}], r"row 2 \(id g00001\): column 'zp' is not a number"),
    (lambda rows: rows[:1] + [{**rows[1], "id": ""}], r"row 2: empty id"),
])
def test_malformed_catalog_stops_before_fitting(tmp_path, change, message):
    rows = change([good_row(j) for j in range(3)])
    cat = write_catalog(tmp_path, rows)
    with pytest.raises(CatalogError, match=message):
        run(cat, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cfg, message", [
    ({"components": {"g": {"profile": "gausian"}}}, r"unknown profile 'gausian'"),
    ({"components": {"g": {"profile": "gaussian", "params": {"sigma": 2.0}}}}, r"unknown parameter\(s\) \['sigma'\]"),
    ({"components": {"g": {"profile": "gaussian", "parms": {}}}}, r"\[components.g\] unknown key"),
])
def test_malformed_recipe_stops_before_fitting(cfg, message):
    with pytest.raises(ModelError, match=message):
        recipe_from_dict(cfg, source="bad.toml")


def test_fingerprint_ignores_recipe_formatting_but_not_content(tmp_path):
    from galbayes.recipe import load_recipe
    from galbayes.runner import describe_model

    (tmp_path / "a.toml").write_text(MODEL_TOML)
    (tmp_path / "b.toml").write_text("# a comment\n" + MODEL_TOML.replace("oversample = []", "oversample=[ ]"))
    (tmp_path / "c.toml").write_text(MODEL_TOML + 'params.q = { bounds = [0.3, 1.0] }\n')
    a, b, c = (describe_model(load_recipe(tmp_path / f"{x}.toml")) for x in "abc")
    assert a == b == describe_model(model()) and a != c
    json.dumps(a)  # JSON-able
