"""Bundled example data: three real SDSS g-band galaxies from the GALMOSS paper.

128×128 cutouts in nanomaggies (zp 22.5), 0.396″/pixel, with σ maps, 41×41 PSFs and
segmentation masks (provenance: ``data/PROVENANCE.md``). Starting values are the paper's
(App. A, B), converted to 0-based pixel centres (GALMOSS value − 0.5) and pixels.
"""
from __future__ import annotations

from pathlib import Path

from ..data import Observation

__all__ = ["DATA_DIR", "EXAMPLES", "example_paths", "load_example", "write_demo_catalog"]

DATA_DIR = Path(__file__).resolve().parent / "data"
PIXEL_SCALE = 0.396

#: name → (recipe, mask value kept, initial values or {})
EXAMPLES = {
    "J162123.19+322056.4": ("sersic", 2, {
        "sersic_xc": 65.43 - 0.5, "sersic_yc": 64.95 - 0.5, "sersic_q": 0.64,
        "sersic_re": 7.58 / PIXEL_SCALE, "sersic_n": 1.53, "sersic_mag": 17.68}),
    "J100247.00+042559.8": ("bulge_disk", 1, {
        "bulge_xc": 65.97 - 0.5, "bulge_yc": 65.30 - 0.5, "bulge_q": 0.75, "disk_q": 0.75,
        "bulge_re": 0.5 * 4.09 / PIXEL_SCALE, "disk_rs": 4.09 / PIXEL_SCALE / 1.678,
        "bulge_n": 4.0, "bulge_mag": 17.97 + 0.75, "disk_mag": 17.97 + 0.75}),
    "J092800.99+014011.9": ("sersic", 1, {}),
}


def example_paths(name: str) -> dict:
    """FITS paths of one bundled galaxy: ``image``, ``sigma``, ``psf``, ``mask``."""
    if name not in EXAMPLES:
        raise KeyError(f"unknown example {name!r}; available: {sorted(EXAMPLES)}")
    return {k: DATA_DIR / f"{name}_{k}.fits" for k in ("image", "sigma", "psf", "mask")}


def load_example(name: str) -> Observation:
    """One bundled galaxy as a validated :class:`~galbayes.data.Observation`."""
    return Observation.from_fits(**example_paths(name), mask_keep=EXAMPLES[name][1], id=name,
                                 zp=22.5, pixel_scale=PIXEL_SCALE)


def write_demo_catalog(path, names=None) -> Path:
    """Write a CSV catalog of bundled galaxies (absolute paths), with their initial values."""
    from astropy.table import Table

    names = list(names or EXAMPLES)
    cols = sorted({k for n in names for k in EXAMPLES[n][2]})
    rows = []
    for n in names:
        p = example_paths(n)
        rows.append([n, str(p["image"]), str(p["sigma"]), str(p["psf"]), str(p["mask"]),
                     EXAMPLES[n][1], 22.5, PIXEL_SCALE] + [EXAMPLES[n][2].get(c, float("nan")) for c in cols])
    t = Table(rows=rows, names=["id", "image", "sigma", "psf", "mask", "mask_keep", "zp", "pixel_scale"] + cols)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t.write(path, format="ascii.csv", overwrite=True)
    return path
