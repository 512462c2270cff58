"""Catalogs: a table (CSV, ECSV or FITS) with one row per galaxy → validated rows → Observations.

Columns: ``id``, ``image``, ``sigma``, ``psf`` (required; FITS paths relative to the
catalog's folder), optional ``mask``, ``mask_keep``, ``zp``, ``pixel_scale``, ``hdu``, and
per-galaxy initial values ``<component>_<param>`` (e.g. ``sersic_re``, ``bulge_n``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import Observation


__all__ = ["CatalogError", "CatalogRow", "read_catalog", "REQUIRED_COLUMNS", "OPTIONAL_COLUMNS"]

REQUIRED_COLUMNS = ("id", "image", "sigma", "psf")
OPTIONAL_COLUMNS = ("mask", "mask_keep", "zp", "pixel_scale", "hdu")


class CatalogError(ValueError):
    """A malformed catalog: raised before any fitting, naming the column or row."""


@dataclass
class CatalogRow:
    """One galaxy's entry: paths and settings, and its initial values."""

    index: int
    id: str
    image: str
    sigma: str
    psf: str
    mask: str | None = None
    mask_keep: int | None = None
    zp: float = 22.5
    pixel_scale: float | None = None
    hdu: object = None
    init: dict | None = None
    base: Path = Path(".")

    def load(self) -> Observation:
        """Read and validate the FITS files (raises :class:`~galbayes.errors.InputError`)."""
        def path(p):
            if not p:
                return None
            return p if Path(p).is_absolute() else self.base / p
        return Observation.from_fits(
            image=path(self.image), sigma=path(self.sigma), psf=path(self.psf),
            mask=None if self.mask is None else path(self.mask), mask_keep=self.mask_keep,
            id=self.id, zp=self.zp, pixel_scale=self.pixel_scale, hdu=self.hdu)


def _read_table(path: Path):
    from astropy.table import Table

    suffix = path.suffix.lower()
    fmt = {".csv": "ascii.csv", ".ecsv": "ascii.ecsv", ".fits": "fits", ".fit": "fits"}.get(suffix)
    if fmt is None:
        raise CatalogError(f"{path}: unknown catalog format {suffix!r} (use .csv, .ecsv or .fits)")
    try:
        return Table.read(path, format=fmt)
    except FileNotFoundError:
        raise CatalogError(f"{path}: catalog file not found") from None
    except Exception as exc:  # astropy raises many types for malformed tables
        raise CatalogError(f"{path}: cannot read the catalog: {exc}") from None


def _cell(col, i):
    v = col[i]
    if np.ma.is_masked(v):
        return None
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str):
        v = v.strip()
        return v or None
    if isinstance(v, (float, np.floating)) and math.isnan(v):
        return None
    return v.item() if hasattr(v, "item") else v


def read_catalog(path, *, model=None) -> list:
    """Read and validate a catalog; returns a list of :class:`CatalogRow` in input order.

    Raises
    ------
    CatalogError
        A missing required column, duplicate or empty ids, an initial-value column for a
        component parameter the model does not have, or a non-numeric value in a numeric
        column (the message names the column and the 1-based data row).
    """
    path = Path(path)
    table = _read_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.colnames]
    if missing:
        raise CatalogError(f"{path}: missing required column(s) {missing}; it has {table.colnames}")
    init_cols = []
    if model is not None:
        comp_names = [c.name for c in model.components]
        for c in table.colnames:
            if c in REQUIRED_COLUMNS or c in OPTIONAL_COLUMNS:
                continue
            if c in model.keys:
                init_cols.append(c)
            elif any(c.startswith(n + "_") for n in comp_names):
                raise CatalogError(f"{path}: column {c!r} names no parameter of the model "
                                   f"(parameters: {model.keys})")
    rows, seen = [], {}
    for i in range(len(table)):
        line = i + 1
        rid = _cell(table["id"], i)
        if rid is None:
            raise CatalogError(f"{path}: row {line}: empty id")
        rid = str(rid)
        if rid in seen:
            raise CatalogError(f"{path}: duplicate id {rid!r} in rows {seen[rid]} and {line}")
        seen[rid] = line
        kw = {}
        for c in ("image", "sigma", "psf", "mask"):
            if c in table.colnames:
                v = _cell(table[c], i)
                kw[c] = None if v is None else str(v)
        for c, conv in (("mask_keep", int), ("zp", float), ("pixel_scale", float)):
            if c in table.colnames:
                v = _cell(table[c], i)
                if v is not None:
                    try:
                        kw[c] = conv(v)
                    except (TypeError, ValueError):
                        raise CatalogError(f"{path}: row {line} (id {rid}): column {c!r} is not a number: {v!r}") from None
        if "hdu" in table.colnames:
            v = _cell(table["hdu"], i)
            kw["hdu"] = int(v) if isinstance(v, (int, np.integer)) or (isinstance(v, str) and v.isdigit()) else v
        init = {}
        for c in init_cols:
            v = _cell(table[c], i)
            if v is None:
                continue
            try:
                init[c] = float(v)
            except (TypeError, ValueError):
                raise CatalogError(f"{path}: row {line} (id {rid}): column {c!r} is not a number: {v!r}") from None
        for c in ("image", "sigma", "psf"):
            if kw.get(c) is None:
                kw[c] = ""  # reported per galaxy as a missing file, the run goes on
        rows.append(CatalogRow(index=i, id=rid, init=init, base=path.parent, **kw))
    return rows
