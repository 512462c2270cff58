"""Catalog runs: one output row per input row in input order, bad galaxies reported (not
dropped), good ones identical to a clean run, image blocks, malformed catalogs refused before
any fit, CSV/ECSV/FITS catalogs, mask_keep.

The good galaxies are 128×128 GalSim mocks with a 41×41 PSF, five of them, so the fitted
batch has the same compiled shape (8) as the default fits of test_map.py.
"""
from __future__ import annotations

import csv

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

import galbayes.inference.map as map_module
from galbayes.catalog import CatalogError, read_catalog
from galbayes.pipeline import fit_catalog
from galbayes.recipe import load_recipe

pytest.importorskip("galsim")
from galbayes.mocks import sersic_mocks  # noqa: E402



INIT_KEYS = ("sersic_xc", "sersic_yc", "sersic_pa", "sersic_q", "sersic_re", "sersic_n", "sersic_mag")
COLUMNS = ["id", "image", "sigma", "psf", "mask", "mask_keep", "zp"] + list(INIT_KEYS)
SEG_GALAXY, SEG_NEIGHBOUR = 3, 5

# bad row id -> words its status must contain
BAD = {
    "bad_missing_image": ("image", "file not found"),
    "bad_nan_sigma": ("sigma", "NaN"),
    "bad_psf_1d": ("PSF", "2-D"),
    "bad_psf_3d": ("PSF", "2-D"),
    "bad_corrupt_fits": ("image", "cannot read"),
    "bad_all_masked": ("mask", "every pixel is masked"),
}
ORDER = ["g0", "bad_missing_image", "g1", "bad_nan_sigma", "g2", "bad_psf_1d", "bad_corrupt_fits",
         "g3", "bad_psf_3d", "bad_all_masked", "g4"]
GOOD = [i for i in ORDER if i.startswith("g")]


def _write(folder, name, arr):
    fits.PrimaryHDU(np.asarray(arr, np.float32)).writeto(folder / name, overwrite=True)
    return f"data/{name}"


def _segmentation(shape):
    """0 sky, SEG_GALAXY around the centre, SEG_NEIGHBOUR in a corner blob."""
    yy, xx = np.indices(shape)
    seg = np.zeros(shape, np.int16)
    seg[(xx - 63.5) ** 2 + (yy - 63.5) ** 2 < 30**2] = SEG_GALAXY
    seg[(xx - 110) ** 2 + (yy - 15) ** 2 < 8**2] = SEG_NEIGHBOUR
    return seg


def write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r[c] for c in COLUMNS])
    return path


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """(folder, rows) of a catalog on disk: 5 good mocks and one bad galaxy of each kind."""
    d = tmp_path_factory.mktemp("catalog")
    data = d / "data"
    data.mkdir()
    mocks = sersic_mocks(5, seed=77)
    rows = {}
    for i, m in enumerate(mocks):
        gid = f"g{i}"
        rows[gid] = {"id": gid, "image": _write(data, f"{gid}_img.fits", m.obs.image),
                     "sigma": _write(data, f"{gid}_sig.fits", m.obs.sigma),
                     "psf": _write(data, f"{gid}_psf.fits", m.obs.psf), "zp": 22.5,
                     **{k: m.init[k] for k in INIT_KEYS}}
    rows["g2"].update(mask=_write(data, "g2_seg.fits", _segmentation(mocks[2].obs.shape)), mask_keep=SEG_GALAXY)
    base = rows["g0"]
    m0 = mocks[0]
    sig = np.array(m0.obs.sigma)
    sig[10, 20] = np.nan
    rows["bad_missing_image"] = dict(base, id="bad_missing_image", image="data/does_not_exist.fits")
    rows["bad_nan_sigma"] = dict(base, id="bad_nan_sigma", sigma=_write(data, "nan_sig.fits", sig))
    rows["bad_psf_1d"] = dict(base, id="bad_psf_1d", psf=_write(data, "psf_1d.fits", m0.obs.psf[20]))
    rows["bad_psf_3d"] = dict(base, id="bad_psf_3d", psf=_write(data, "psf_3d.fits", np.stack([m0.obs.psf] * 2)))
    (data / "corrupt.fits").write_bytes(np.random.default_rng(1).bytes(8640))
    rows["bad_corrupt_fits"] = dict(base, id="bad_corrupt_fits", image="data/corrupt.fits")
    rows["bad_all_masked"] = dict(base, id="bad_all_masked",
                                  mask=_write(data, "all_masked.fits", np.ones(m0.obs.shape)))
    return d, [rows[i] for i in ORDER]


@pytest.fixture(scope="module")
def model():
    return load_recipe("sersic")


@pytest.fixture(scope="module")
def full_run(catalog, model):
    folder, rows = catalog
    cat = write_csv(folder / "catalog.csv", rows)
    table = fit_catalog(cat, model, folder / "out", progress=False)
    return folder / "out", table


@pytest.fixture(scope="module")
def clean_run(catalog, model):
    folder, rows = catalog
    cat = write_csv(folder / "clean.csv", [r for r in rows if r["id"] in GOOD])
    return fit_catalog(cat, model, folder / "out_clean", progress=False, blocks=False)


def _by_id(table):
    return {str(r["id"]): r for r in table}


def test_one_row_per_input_in_order(full_run):
    out, table = full_run
    assert list(table["id"]) == ORDER
    on_disk = Table.read(out / "results.fits")
    assert [str(i) for i in on_disk["id"]] == ORDER
    assert [str(i) for i in Table.read(out / "results.csv", format="ascii.csv")["id"]] == ORDER


def test_bad_rows_name_their_problem(full_run):
    _, table = full_run
    rows = _by_id(table)
    for gid, words in BAD.items():
        status = str(rows[gid]["status"])
        assert status != "ok"
        for w in words:
            assert w in status, (gid, status)
        assert np.isnan(rows[gid]["sersic_re"])


def test_good_rows_match_a_clean_run(full_run, clean_run, model):
    _, table = full_run
    rows, clean = _by_id(table), _by_id(clean_run)
    for gid in GOOD:
        assert rows[gid]["status"] == "ok", rows[gid]["status"]
        assert bool(rows[gid]["converged"])
        for k in model.keys + ["chi2", "n_iter"]:
            np.testing.assert_allclose(rows[gid][k], clean[gid][k], rtol=1e-6, err_msg=f"{gid} {k}")


def test_image_blocks(full_run, catalog, model):
    out, table = full_run
    rows = _by_id(table)
    assert sorted(p.stem for p in (out / "blocks").glob("*.fits")) == sorted(GOOD)
    seg = _segmentation((128, 128))
    for gid in GOOD:
        with fits.open(out / "blocks" / f"{gid}.fits") as hdul:
            names = [h.name for h in hdul[1:]]
            assert names == ["DATA", "MODEL", "RESIDUAL", "MASK", "SIGMA", "SERSIC"]
            data, mod, res = (hdul[n].data.astype(np.float64) for n in ("DATA", "MODEL", "RESIDUAL"))
            np.testing.assert_allclose(res, data - mod, atol=1e-5)
            np.testing.assert_allclose(hdul["SERSIC"].data, mod, rtol=1e-4, atol=1e-6)  # one component
            hdr = hdul["MODEL"].header
            assert hdr["STATUS"] == "ok" and hdr["ID"] == gid
            for k in model.free_keys + ["chi2"]:
                assert np.isclose(hdr[k.upper()], rows[gid][k], rtol=1e-6), k
            expect_mask = (~np.isin(seg, [0, SEG_GALAXY])) if gid == "g2" else np.zeros((128, 128), bool)
            np.testing.assert_array_equal(hdul["MASK"].data.astype(bool), expect_mask)
            # the model is a real fit: residuals are noise-like over the galaxy
            sigma = hdul["SIGMA"].data
            use = ~expect_mask
            assert 0.8 < np.mean((res / sigma)[use] ** 2) < 1.2


# --------------------------------------------------------------------------- malformed
def _forbid_fitting(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a malformed catalog reached the fitter")
    monkeypatch.setattr(map_module, "_compiled", boom)   # every MAP fit goes through it


@pytest.mark.parametrize("kind, word", [
    ("missing_column", "psf"),
    ("duplicate_id", "duplicate id"),
    ("unknown_param", "sersic_foo"),
    ("non_numeric_zp", "zp"),
])
def test_malformed_catalog_refused_before_fitting(catalog, model, monkeypatch, tmp_path, kind, word):
    folder, rows = catalog
    rows = [dict(r) for r in rows]
    path = folder / f"malformed_{kind}.csv"
    if kind == "missing_column":
        t = Table.read(write_csv(path, rows), format="ascii.csv")
        t.remove_column("psf")
        t.write(path, format="ascii.csv", overwrite=True)
    elif kind == "duplicate_id":
        rows[4]["id"] = rows[0]["id"]
        write_csv(path, rows)
    elif kind == "unknown_param":
        t = Table.read(write_csv(path, rows), format="ascii.csv")
        t["sersic_foo"] = 1.0
        t.write(path, format="ascii.csv", overwrite=True)
    else:
        rows[2]["zp"] = "abc"
        write_csv(path, rows)
    _forbid_fitting(monkeypatch)
    with pytest.raises(CatalogError, match=word):
        fit_catalog(path, model, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "results.fits").exists()


# --------------------------------------------------------------------------- formats
def _row_tuple(r):
    return (r.id, r.image, r.sigma, r.psf, r.mask, r.mask_keep, r.zp, tuple(sorted(r.init.items())))


@pytest.mark.parametrize("fmt", ["ecsv", "fits"])
def test_ecsv_and_fits_catalogs(catalog, model, fmt):
    folder, rows = catalog
    csv_rows = read_catalog(write_csv(folder / "fmt.csv", rows), model=model)
    t = Table.read(folder / "fmt.csv", format="ascii.csv")
    path = folder / f"catalog.{fmt}"
    t.write(path, overwrite=True)
    other = read_catalog(path, model=model)
    assert [_row_tuple(r) for r in other] == [_row_tuple(r) for r in csv_rows]


def test_fits_catalog_fits_like_csv(catalog, model, full_run):
    folder, rows = catalog
    t = Table.read(write_csv(folder / "fmt2.csv", rows), format="ascii.csv")
    t.write(folder / "catalog2.fits", overwrite=True)
    table = fit_catalog(folder / "catalog2.fits", model, folder / "out_fits", progress=False, blocks=False)
    _, ref = full_run
    assert list(table["id"]) == ORDER
    assert list(table["status"]) == list(ref["status"])
    for gid in GOOD:
        for k in model.keys:
            np.testing.assert_allclose(_by_id(table)[gid][k], _by_id(ref)[gid][k], rtol=1e-6)


def test_mask_keep_semantics(catalog, model):
    folder, rows = catalog
    g2 = next(r for r in rows if r["id"] == "g2")
    variants = [dict(g2, id="keep", mask_keep=SEG_GALAXY), dict(g2, id="nokeep", mask_keep=None),
                dict(g2, id="keep_neighbour", mask_keep=SEG_NEIGHBOUR)]
    loaded = {r.id: r.load() for r in read_catalog(write_csv(folder / "keep.csv", variants), model=model)}
    seg = _segmentation((128, 128))
    np.testing.assert_array_equal(loaded["keep"].weight, np.isin(seg, [0, SEG_GALAXY]))
    np.testing.assert_array_equal(loaded["nokeep"].weight, seg == 0)
    np.testing.assert_array_equal(loaded["keep_neighbour"].weight, np.isin(seg, [0, SEG_NEIGHBOUR]))
    # masked pixels carry no information into the fit
    assert np.all(loaded["keep"].image[seg == SEG_NEIGHBOUR] == 0)


# --------------------------------------------------------------------------- streaming
TRICKY_CSV = ('\ufeffid,image,sigma,psf,zp,mask_keep,hdu,sersic_re,notes\r\n'
              'a1,"dir, with comma/i.fits",s.fits,p.fits,22.0,3,1,4.5,"two\nlines"\r\n'
              '\r\n'
              '  b2 , i2.fits ,s2.fits,p2.fits,,,SCI,nan,\r\n'
              'c3,i3.fits,s3.fits,p3.fits,21.5,4.0,,1e1,"say ""hi"""\r\n')


def test_streamed_csv_reads_like_astropy(tmp_path, model):
    """Quoted commas and newlines, CRLF, a BOM, blank lines, padding, empty and nan cells."""
    path = tmp_path / "tricky.csv"
    path.write_bytes(TRICKY_CSV.encode("utf-8"))
    rows = read_catalog(path, model=model)
    t = Table.read(path, format="ascii.csv", encoding="utf-8-sig")
    assert [r.id for r in rows] == [str(v).strip() for v in t["id"]] == ["a1", "b2", "c3"]
    assert [r.image for r in rows] == [str(v).strip() for v in t["image"]]
    assert rows[0].image == "dir, with comma/i.fits" and rows[0].index == 0 and rows[2].index == 2
    assert [r.zp for r in rows] == [22.0, 22.5, 21.5] and [r.mask_keep for r in rows] == [3, None, 4]
    assert [r.hdu for r in rows] == [1, "SCI", None]
    assert [r.init for r in rows] == [{"sersic_re": 4.5}, {}, {"sersic_re": 10.0}]
    for fmt in ("ecsv", "fits"):  # the same rows from the other formats
        t.write(tmp_path / f"tricky.{fmt}", overwrite=True)
        assert [_row_tuple(r) for r in read_catalog(tmp_path / f"tricky.{fmt}", model=model)] == \
            [_row_tuple(r) for r in rows]


@pytest.mark.parametrize("fmt", ["csv", "ecsv", "fits"])
def test_shards_are_parsed_on_demand_as_slices(tmp_path, model, fmt):
    from galbayes.catalog import open_catalog

    n = 23
    t = Table({"id": [f"x{i}" for i in range(n)], "image": ["i.fits"] * n, "sigma": ["s.fits"] * n,
               "psf": ["p.fits"] * n, "sersic_n": np.linspace(1, 4, n), "notes": ["a, b"] * n})
    path = tmp_path / f"c.{fmt}"
    t.write(path, format="ascii.csv" if fmt == "csv" else None, overwrite=True)
    every = read_catalog(path, model=model)
    cat = open_catalog(path, model=model)
    assert cat.scan(5) == n and cat.n_shards() == 5
    for k in (4, 0, 2, 3, 1):  # any order
        assert [_row_tuple(r) for r in cat.shard(k)] == [_row_tuple(r) for r in every[5 * k:5 * k + 5]]
        assert [r.index for r in cat.shard(k)] == list(range(5 * k, min(n, 5 * k + 5)))
    with open(path, "ab") as fh:  # the file changes under a run: refused, never read inconsistently
        fh.write(b"\n")
    with pytest.raises(CatalogError, match="changed while the run was using it"):
        cat.shard(1)


def test_duplicate_ids_found_by_hash_far_apart(tmp_path):
    path = tmp_path / "dup.csv"
    with open(path, "w") as fh:
        fh.write("id,image,sigma,psf\n")
        for i in range(70000):  # more than one hash chunk
            fh.write(f"g{i},i.fits,s.fits,p.fits\n")
        fh.write("g12345,i.fits,s.fits,p.fits\n")
    with pytest.raises(CatalogError, match=r"duplicate id 'g12345' in rows 12346 and 70001"):
        read_catalog(path)


def test_catalog_memory_is_flat_in_its_length(tmp_path, model):
    """Scanning and iterating every shard keeps ~8 bytes a row (id hashes), not the table
    (the table reader it replaces held ~1-2.5 kB a row)."""
    import tracemalloc

    from galbayes.catalog import open_catalog

    def peak(n):
        path = tmp_path / f"m{n}.csv"
        with open(path, "w") as fh:
            fh.write("id,image,sigma,psf,sersic_re,ra\n")
            for i in range(n):
                fh.write(f"gal{i:07d},img{i % 4}.fits,sig{i % 4}.fits,psf.fits,{2 + i % 7},{i * 1e-4}\n")
        tracemalloc.start()
        cat = open_catalog(path, model=model)
        cat.scan(512)
        count = sum(len(cat.shard(k)) for k in range(cat.n_shards()))
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert count == n
        return p

    small, large = peak(3_000), peak(30_000)
    per_row = (large - small) / 27_000
    assert per_row < 40, f"{per_row:.0f} bytes per extra row (peaks {small} and {large} bytes)"
