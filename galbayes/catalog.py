"""Catalogs: a table (CSV, ECSV or FITS) with one row per galaxy → validated rows → Observations.

Columns: ``id``, ``image``, ``psf`` (required; FITS paths relative to the catalog's folder),
the noise as one of ``sigma``, ``variance``, ``ivar``, ``weight`` (= ivar) or ``rms`` (= σ)
(several columns may exist, a row fills at most one; none: σ estimated from the image, with
``gain`` or the image header's ``GAIN``, see :mod:`galbayes.data`), optional ``mask``,
``mask_keep`` (segmentation value to keep), ``mask_bits`` (bit planes to reject: an integer
bitmask or ``"0,2,5"`` bit numbers or ``"BAD,SAT"`` plane names), ``gain``, ``zp``,
``pixel_scale``, ``hdu``, per-galaxy initial values ``<component>_<param>`` (e.g.
``sersic_re``, ``bulge_n``) and per-galaxy bounds ``<component>_<param>_lo`` /
``<component>_<param>_hi`` (in the model's units, like the initial values; they replace the
model's bounds of that parameter for that galaxy, and so its uniform prior; either may be
given alone; ``galbayes prepare --data-bounds`` writes them). Any path may name its HDU:
``calexp.fits[VARIANCE]``, ``file.fits[2]``, ``file.fits[SCI,2]``.

Other columns (``ra``, ``dec``, ``z``, ``notes``, ...) are carried along unread, except those
that *look like* an initial value but name none of the model's parameters: a column is
*parameter-like* if it starts with a component name and ``_`` (``sersic_ree``) or is a close
:mod:`difflib` match (ratio ≥ 0.8) of a parameter name (``sersc_re``, ``Sersic_re``); with a
model, such a column is a :class:`CatalogError` naming it and its closest parameter. A near
miss (ratio ≥ 0.9) of a standard column name (``mask_kep``, ``pixelscale``) is refused the
same way, since it would otherwise be silently ignored.

Streaming
    :func:`open_catalog` reads only the header; rows are parsed on demand and never held
    all at once: CSV/ECSV record by record from a byte offset, FITS tables in row ranges of
    a memory map that is closed after each range. :meth:`Catalog.scan` validates every row
    once (and checks ids are unique with an 8-byte hash per row: the only memory that grows
    with the catalog) and records where each shard starts, so :meth:`Catalog.shard` turns
    one shard's rows into :class:`CatalogRow` objects when they are needed. Text cells are
    taken verbatim (an id ``007`` stays ``007``); empty cells and ``nan`` are "not given".
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import Observation
from .errors import CatalogError  # defined there, importable from here as before


__all__ = ["CatalogError", "CatalogRow", "Catalog", "open_catalog", "read_catalog", "REQUIRED_COLUMNS",
           "OPTIONAL_COLUMNS", "parameter_like"]

REQUIRED_COLUMNS = ("id", "image", "psf")
NOISE_COLUMNS = ("sigma", "variance", "ivar", "weight", "rms")
OPTIONAL_COLUMNS = NOISE_COLUMNS + ("mask", "mask_keep", "mask_bits", "gain", "zp", "pixel_scale", "hdu")
OPTIONAL_COLUMNS += ("psf_type",)   # "effective" (default) or "optical", see galbayes.psf
PARAM_CUTOFF = 0.8      # difflib ratio above which a column is taken for a misspelt parameter
STANDARD_CUTOFF = 0.9   # ... for a misspelt standard column
_FITS_CHUNK = 8192      # FITS rows per memory-mapped range


@dataclass
class CatalogRow:
    """One galaxy's entry: paths and settings, its initial values and its bounds."""

    index: int
    id: str
    image: str
    sigma: str | None
    psf: str
    mask: str | None = None
    mask_keep: int | None = None
    zp: float = 22.5
    pixel_scale: float | None = None
    hdu: object = None
    init: dict | None = None
    base: Path = Path(".")
    variance: str | None = None
    ivar: str | None = None
    weight: str | None = None
    rms: str | None = None
    mask_bits: object = None
    gain: float | None = None
    psf_type: str | None = None
    bounds: dict | None = None    # key -> (lo or None, hi or None), from <key>_lo / <key>_hi

    def path(self, p):
        """``p`` resolved against the catalog's folder (None for an empty path); a trailing
        ``[EXT]`` is kept (see :func:`galbayes.data.split_extension`)."""
        if not p:
            return None
        return p if Path(p).is_absolute() else self.base / p

    def files(self) -> list:
        """The FITS files this row reads (image, noise, PSF, mask), as paths (without ``[EXT]``)."""
        from .data import split_extension

        out = []
        for p in (self.image, self.sigma, self.variance, self.ivar, self.weight, self.rms, self.psf, self.mask):
            if p:
                f = Path(split_extension(self.path(p))[0])
                if f not in out:
                    out.append(f)
        return out

    def load(self) -> Observation:
        """Read and validate the FITS files (raises :class:`~galbayes.errors.InputError`)."""
        path = self.path
        noise = {k: path(getattr(self, k)) for k in ("sigma", "variance", "ivar", "weight", "rms")
                 if getattr(self, k)}
        return Observation.from_fits(
            image=path(self.image), psf=path(self.psf), **noise,
            mask=None if self.mask is None else path(self.mask), mask_keep=self.mask_keep,
            mask_bits=self.mask_bits, gain=self.gain,
            id=self.id, zp=self.zp, pixel_scale=self.pixel_scale, hdu=self.hdu, psf_type=self.psf_type)


def _norm(v):
    """A cell as None (empty, masked, NaN) or a plain Python value."""
    if v is None or np.ma.is_masked(v):
        return None
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str):
        v = v.strip()
        return v or None
    if isinstance(v, (float, np.floating)) and math.isnan(v):
        return None
    return v.item() if hasattr(v, "item") else v


def bound_column(column: str):
    """``("sersic_re", 0)`` for ``sersic_re_lo``, ``(..., 1)`` for ``..._hi``, else ``(None, None)``."""
    for side, suffix in enumerate(("_lo", "_hi")):
        if column.endswith(suffix) and len(column) > len(suffix):
            return column[: -len(suffix)], side
    return None, None


def parameter_like(column: str, model) -> str | None:
    """If ``column`` looks like an initial value but is none of ``model``'s parameters, the
    closest parameter name (or ``"?"`` without a close one); else None. See the module doc."""
    keys = list(model.keys)
    if column in keys:
        return None
    close = difflib.get_close_matches(column, keys, n=1, cutoff=PARAM_CUTOFF)
    prefixed = any(column.startswith(c.name + "_") for c in model.components)
    if not (close or prefixed):
        return None
    if not close:
        close = difflib.get_close_matches(column, keys, n=1, cutoff=0.0)
    return close[0] if close else "?"


class Catalog:
    """A catalog file opened for streaming (see the module docstring).

    ``Catalog(path, model=model)`` checks the columns; :meth:`scan` validates all rows;
    iterating yields :class:`CatalogRow` in input order; :meth:`shard` gives one shard's
    rows after ``scan(shard_size)``.
    """

    _FORMATS = {".csv": "csv", ".ecsv": "ecsv", ".fits": "fits", ".fit": "fits"}

    def __init__(self, path, *, model=None):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        self.format = self._FORMATS.get(suffix)
        if self.format is None:
            raise CatalogError(f"{self.path}: unknown catalog format {suffix!r} (use .csv, .ecsv or .fits)")
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise CatalogError(f"{self.path}: catalog file not found") from None
        if not self.path.is_file():
            raise CatalogError(f"{self.path}: not a file")
        self._stat = (st.st_size, st.st_mtime_ns)
        self.base = self.path.parent
        self.model = model
        self.n_rows = None
        self.shard_size = None
        self._starts = None
        try:
            self.columns = self._read_header()
        except CatalogError:
            raise
        except Exception as exc:  # noqa: BLE001  (many parsers, many exception types)
            raise CatalogError(f"{self.path}: cannot read the catalog: {exc}") from None
        self._check_columns()

    # ------------------------------------------------------------------ header
    def _read_header(self) -> list:
        if self.format == "fits":
            return self._fits_header()
        with open(self.path, "rb") as fh:
            offset, delimiter = 0, ","
            if self.format == "ecsv":
                head = []
                while True:
                    line = fh.readline()
                    if not line.startswith(b"#"):
                        break
                    head.append(line.decode("utf-8"))
                    offset += len(line)
                if not head or not head[0].startswith("# %ECSV"):
                    raise CatalogError(f"{self.path}: not an ECSV file (no '# %ECSV' first line)")
                m = re.search(r"^#\s*delimiter:\s*'?(.)'?\s*$", "".join(head), re.M)
                delimiter = m.group(1) if m else " "
            self._delimiter = delimiter
            fh.seek(offset)
            start = fh.read(3)
            if offset == 0 and start == b"\xef\xbb\xbf":
                offset = 3
        for pos, rec in self._text_records(offset):
            names = [c.strip() for c in rec]
            self._header_end = pos
            return names
        raise CatalogError(f"{self.path}: empty catalog file (no header line)")

    def _text_records(self, offset: int):
        """``(byte offset after the record, fields)`` of the CSV/ECSV records from ``offset``
        (blank lines skipped); records may span lines (quoted newlines)."""
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            pos = [offset]

            def lines():
                for raw in iter(fh.readline, b""):
                    pos[0] += len(raw)
                    try:
                        yield raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise CatalogError(f"{self.path}: byte {pos[0] - len(raw)}: not UTF-8 text ({exc})") from None

            reader = csv.reader(lines(), delimiter=self._delimiter, skipinitialspace=self._delimiter == " ")
            try:
                for rec in reader:
                    if not rec or all(not f.strip() for f in rec) and len(rec) <= 1:
                        continue
                    yield pos[0], rec
            except csv.Error as exc:
                raise CatalogError(f"{self.path}: cannot read the catalog near byte {pos[0]}: {exc}") from None

    def _fits_header(self) -> list:
        from astropy.io import fits

        try:
            with fits.open(self.path, memmap=True) as hdul:
                for i, h in enumerate(hdul):
                    if isinstance(h, (fits.BinTableHDU, fits.TableHDU)):
                        self._ext = i
                        self._fits_rows = int(h.header["NAXIS2"])
                        self._nulls = {c.name: c.null for c in h.columns if c.null is not None}
                        self._scale = {c.name: (float(c.bscale if c.bscale is not None else 1),
                                                float(c.bzero if c.bzero is not None else 0))
                                       for c in h.columns if c.bscale not in (None, 1) or c.bzero not in (None, 0)}
                        self._logical = {c.name for c in h.columns if str(c.format).endswith("L")}
                        return list(h.columns.names)
        except OSError as exc:
            raise CatalogError(f"{self.path}: cannot read the catalog: {exc}") from None
        raise CatalogError(f"{self.path}: no table HDU in this FITS file")

    def _check_columns(self):
        cols = self.columns
        missing = [c for c in REQUIRED_COLUMNS if c not in cols]
        if missing:
            raise CatalogError(f"{self.path}: missing required column(s) {missing}; it has {cols}")
        seen = set()
        for c in cols:
            if c in seen:
                raise CatalogError(f"{self.path}: column {c!r} appears twice")
            seen.add(c)
        standard = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
        self.init_cols = []
        self.bound_cols = {}      # column -> (parameter key, 0 for lo / 1 for hi)
        for c in cols:
            if c in standard:
                continue
            near = difflib.get_close_matches(c, standard, n=1, cutoff=STANDARD_CUTOFF)
            if near:
                raise CatalogError(f"{self.path}: column {c!r} is not a catalog column; did you mean {near[0]!r}? "
                                   f"(standard columns: {list(standard)})")
            if self.model is None:
                continue
            if c in self.model.keys:
                self.init_cols.append(c)
                continue
            key, side = bound_column(c)
            if key in self.model.keys:
                if key not in self.model.free_keys:
                    raise CatalogError(f"{self.path}: column {c!r} bounds {key!r}, which the model fixes")
                self.bound_cols[c] = (key, side)
                continue
            close = parameter_like(c if key is None else key, self.model)
            if key is not None and close not in (None, "?"):
                close += c[len(key):]                     # sersic_ree_lo -> did you mean sersic_re_lo?
            if close is not None:
                hint = f"did you mean {close!r}? " if close != "?" else ""
                raise CatalogError(f"{self.path}: column {c!r} names no parameter of the model ({hint}parameters: "
                                   f"{list(self.model.keys)}); a column starting with a component name and '_' "
                                   "or spelt like a parameter is taken for an initial value")

    # ------------------------------------------------------------------ rows
    def _positions(self):
        return {c: i for i, c in enumerate(self.columns)}

    def _raw(self, start_row: int = 0, offset: int | None = None, stop_row: int | None = None):
        """``(row index, byte offset after it or None, cells)`` from ``start_row``."""
        if self.format == "fits":
            yield from self._fits_raw(start_row, stop_row)
            return
        i = start_row
        for pos, rec in self._text_records(self._header_end if offset is None else offset):
            if stop_row is not None and i >= stop_row:
                return
            yield i, pos, rec
            i += 1

    def _fits_raw(self, start_row: int, stop_row: int | None):
        from astropy.io import fits

        n = self._fits_rows if stop_row is None else min(stop_row, self._fits_rows)
        i = start_row
        while i < n:
            stop = min(n, i + _FITS_CHUNK)
            with fits.open(self.path, memmap=True) as hdul:
                # the raw records of rows i..stop (astropy's column conversion would convert
                # whole columns of the file at each access)
                raw = np.asarray(hdul[self._ext].data)[i:stop]
                cols = []
                for c in self.columns:
                    a = raw[c]
                    null = self._nulls.get(c)
                    if a.dtype.kind == "S":
                        vals = [v.decode("utf-8", "replace").rstrip() for v in a.tolist()]
                    elif c in self._logical:
                        vals = [None if v == 0 else v == ord("T") for v in a.tolist()]
                    else:
                        vals = a.tolist()
                        if null is not None:
                            vals = [None if v == null else v for v in vals]
                        if c in self._scale:
                            sc, z = self._scale[c]
                            vals = [None if v is None else v * sc + z for v in vals]
                    cols.append(vals)
                del raw
            for j in range(stop - i):
                yield i + j, None, [col[j] for col in cols]
            i = stop

    def _make_row(self, i: int, cells, pos) -> CatalogRow:
        line = i + 1
        where = self._positions_cache

        def get(c):
            j = where.get(c)
            if j is None or j >= len(cells):
                return None
            return _norm(cells[j])

        rid = get("id")
        if rid is None:
            raise CatalogError(f"{self.path}: row {line}: empty id")
        rid = str(rid)

        def number(c, conv, v):
            try:
                x = conv(v)
            except (TypeError, ValueError):
                raise CatalogError(f"{self.path}: row {line} (id {rid}): column {c!r} is not a number: {v!r}") from None
            return None if isinstance(x, float) and math.isnan(x) else x

        if self.format != "fits" and len(cells) > len(self.columns):
            raise CatalogError(f"{self.path}: row {line} (id {rid}): {len(cells)} fields, the header has "
                               f"{len(self.columns)}")
        kw = {}
        for c in ("image", "psf", "mask") + NOISE_COLUMNS:
            v = get(c)
            kw[c] = None if v is None else str(v)
        given = [c for c in NOISE_COLUMNS if kw[c] is not None]
        if len(given) > 1:
            raise CatalogError(f"{self.path}: row {line} (id {rid}): give one noise map, got {given}")
        v = get("mask_bits")
        if v is not None:
            if isinstance(v, float):
                v = number("mask_bits", _as_int, v)
            kw["mask_bits"] = v
        for c, conv in (("mask_keep", _as_int), ("zp", float), ("pixel_scale", float), ("gain", float)):
            v = get(c)
            if v is not None:
                x = number(c, conv, v)
                if x is not None:
                    kw[c] = x
        v = get("hdu")
        if v is not None:
            kw["hdu"] = int(v) if isinstance(v, int) or (isinstance(v, str) and v.isdigit()) else v
        v = get("psf_type")   # checked when the row is loaded (an InputError naming the galaxy)
        if v is not None:
            kw["psf_type"] = str(v).strip()
        init = {}
        for c in self.init_cols:
            v = get(c)
            if v is not None:
                x = number(c, float, v)
                if x is not None:
                    init[c] = x
        bounds = {}
        for c, (key, side) in self.bound_cols.items():
            v = get(c)
            if v is not None:
                x = number(c, float, v)
                if x is not None:
                    pair = bounds.setdefault(key, [None, None])
                    pair[side] = x
        if bounds:
            kw["bounds"] = {k: tuple(b) for k, b in bounds.items()}
        for c in ("image", "psf"):
            if kw.get(c) is None:
                kw[c] = ""  # reported per galaxy as a missing file, the run goes on
        if kw.get("mask") is None:
            kw.pop("mask")
        return CatalogRow(index=i, id=rid, init=init, base=self.base, **kw)

    def iter_rows(self, start: int = 0, stop: int | None = None, offset: int | None = None):
        """:class:`CatalogRow` objects of rows ``start..stop`` (validated, no duplicate check)."""
        self._positions_cache = self._positions()
        if self.format != "fits" and offset is None and start:
            raise ValueError("text catalogs are read from an offset: use shard()")
        for i, pos, cells in self._raw(start, offset, stop):
            yield self._make_row(i, cells, pos)

    def __iter__(self):
        return self.iter_rows()

    def scan(self, shard_size: int | None = None) -> int:
        """Validate every row (numbers, empty and duplicate ids) and index the shards of
        ``shard_size`` rows; returns the number of rows. Raises :class:`CatalogError`."""
        from array import array

        self._positions_cache = self._positions()
        starts, hashes = [], array("q")
        n = 0
        prev_pos = None if self.format == "fits" else self._header_end
        for i, pos, cells in self._raw(0):
            if shard_size and i % shard_size == 0:
                starts.append(prev_pos)
            row = self._make_row(i, cells, pos)
            hashes.append(_id_hash(row.id))
            prev_pos = pos
            n = i + 1
        h = np.sort(np.frombuffer(hashes, np.int64))
        del hashes
        if len(h) > 1:
            dup = h[1:][h[1:] == h[:-1]]
            if len(dup):
                self._find_duplicate(set(dup.tolist()))
        del h
        self.n_rows, self.shard_size = n, shard_size
        self._starts = starts if shard_size else None
        return n

    def _find_duplicate(self, suspects: set):
        seen = {}
        for row in self.iter_rows():
            if _id_hash(row.id) in suspects:
                if row.id in seen:
                    raise CatalogError(f"{self.path}: duplicate id {row.id!r} in rows {seen[row.id]} and {row.index + 1}")
                seen[row.id] = row.index + 1

    def n_shards(self) -> int:
        return len(self._starts)

    def shard_len(self, k: int) -> int:
        return min(self.shard_size, self.n_rows - k * self.shard_size)

    def check_unchanged(self):
        """Raise :class:`CatalogError` if the file changed since it was opened."""
        try:
            st = self.path.stat()
            now = (st.st_size, st.st_mtime_ns)
        except OSError as exc:
            now = str(exc)
        if now != self._stat:
            raise CatalogError(f"{self.path}: the catalog file changed while the run was using it "
                               f"(size, mtime {self._stat} → {now}); run again (with --resume to keep "
                               "the finished shards, if it was not the catalog's contents that changed)")

    def shard(self, k: int) -> list:
        """The :class:`CatalogRow` objects of shard ``k`` (after :meth:`scan` with a shard size)."""
        if self._starts is None:
            raise RuntimeError("call scan(shard_size) first")
        self.check_unchanged()
        start = k * self.shard_size
        return list(self.iter_rows(start, start + self.shard_len(k), offset=self._starts[k]))

    def __getstate__(self):  # picklable without the per-iteration cache
        d = dict(self.__dict__)
        d.pop("_positions_cache", None)
        return d


def _as_int(v) -> int:
    if isinstance(v, float):
        if not v.is_integer():
            raise ValueError(v)
        return int(v)
    try:
        return int(v)
    except (TypeError, ValueError):
        f = float(v)
        if not f.is_integer():
            raise
        return int(f)


def _id_hash(gid: str) -> int:
    return int.from_bytes(hashlib.blake2b(gid.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little", signed=True)


def open_catalog(path, *, model=None) -> Catalog:
    """Open a catalog for streaming; checks its columns (see :class:`Catalog`)."""
    return Catalog(path, model=model)


def read_catalog(path, *, model=None) -> list:
    """Read and validate a whole catalog; returns a list of :class:`CatalogRow` in input order.

    (Holds every row: for large catalogs use :func:`open_catalog` and iterate.)

    Raises
    ------
    CatalogError
        A missing required column, duplicate or empty ids, an initial-value column for a
        component parameter the model does not have (or a misspelt parameter or standard
        column), or a non-numeric value in a numeric column (the message names the column
        and the 1-based data row).
    """
    cat = open_catalog(path, model=model)
    cat.scan()
    return list(cat)
