"""Results: the per-galaxy table (FITS + CSV) and the FITS image block of each galaxy."""
from __future__ import annotations

import errno
import os
import re
import time
from pathlib import Path

import numpy as np

__all__ = ["results_columns", "make_table", "write_table", "write_block", "safe_name"]


def safe_name(galaxy_id: str) -> str:
    """A file-name-safe version of a galaxy id (``/`` and spaces replaced)."""
    return re.sub(r"[^A-Za-z0-9._+\-]", "_", str(galaxy_id))


def results_columns(model, *, errors: bool = False) -> list:
    cols = ["id"] + list(model.keys)
    if errors:
        cols += [k + "_err" for k in model.keys]
    return cols + ["chi2", "chi2_red", "loglike", "n_iter", "converged", "status", "psf_type"]


def make_table(model, rows: list, *, errors: bool = False):
    """An astropy Table from per-galaxy dicts (missing values → NaN), in the given order."""
    from astropy.table import Table

    cols = results_columns(model, errors=errors)
    data = {}
    for c in cols:
        vals = [r.get(c) for r in rows]
        if c in ("id", "status", "psf_type"):
            data[c] = np.array([str(v if v is not None else "") for v in vals])
        elif c == "converged":
            data[c] = np.array([bool(v) if v is not None else False for v in vals])
        elif c == "n_iter":
            data[c] = np.array([int(v) if v is not None else -1 for v in vals], dtype=np.int64)
        else:
            data[c] = np.array([float(v) if v is not None else np.nan for v in vals], dtype=np.float64)
    table = Table(data, names=cols)
    for k in model.keys:
        e = model.entries[model.keys.index(k)]
        unit = {"pix": model.size_unit, "deg": "deg", "mag": "mag"}.get(e.spec.unit)
        if unit:
            table[k].unit = "arcsec" if unit == "arcsec" else ("pix" if unit == "pix" else unit)
    return table


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _looks_full(exc: OSError, folder: Path) -> bool:
    """An errno-less OSError that is a full disk: astropy reports ENOSPC as "Not enough
    space on disk", numpy's ``tofile`` as "N requested and M written"; or the file system
    has (almost) no room left."""
    text = str(exc)
    if "space" in text.lower() or re.search(r"\d+ requested and \d+ written", text):
        return True
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def atomic_write(path, write) -> None:
    """``write(tmp_path)``, fsync, rename over ``path``, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())  # a full disk may only show here (delayed allocation)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno is None and _looks_full(exc, path.parent):  # astropy/numpy drop the errno
            raise OSError(errno.ENOSPC, f"No space left on device ({exc})", str(path)) from exc
        if exc.filename is None and exc.errno is not None:  # name the file (fsync errors carry none)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


_TRANSLIT = {"σ": "sigma", "≤": "<=", "≥": ">=", "χ": "chi", "²": "2", "×": "x", "±": "+/-",
             "–": "-", "—": "-", "…": "...", "°": "deg", "→": "->", "≠": "!=", "⊛": "*"}


def fits_text(s: str) -> bytes:
    """ASCII for FITS character columns (FITS allows ASCII only): common symbols spelled out,
    anything else as a ``\\uXXXX`` escape. ``results.csv`` keeps the original UTF-8 text."""
    if s.isascii():
        return s.encode()
    for a, b in _TRANSLIT.items():
        s = s.replace(a, b)
    return s.encode("ascii", "backslashreplace")


def _fits_safe(table):
    """A copy of ``table`` whose text columns are ASCII (see :func:`fits_text`)."""
    out = table.copy(copy_data=True)
    for name in out.colnames:
        if out[name].dtype.kind == "U":
            out[name] = np.array([fits_text(str(v)) for v in out[name]])
    return out


def write_table(table, out_dir) -> None:
    """Write ``results.fits`` and ``results.csv`` into ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = _fits_safe(table)
    atomic_write(out_dir / "results.fits", lambda p: safe.write(p, format="fits", overwrite=True))
    atomic_write(out_dir / "results.csv", lambda p: table.write(p, format="ascii.csv", overwrite=True))


def write_block(path, *, data, model_image, sigma, weight, components: dict, header_values: dict) -> None:
    """One galaxy's image block: DATA, MODEL, RESIDUAL, MASK, SIGMA and one HDU per component."""
    from astropy.io import fits

    hdr = fits.Header()
    for k, v in header_values.items():
        if v is None:
            continue
        key = k.upper()
        if isinstance(v, (bool, np.bool_)):
            v = bool(v)
        elif isinstance(v, (int, np.integer)):
            v = int(v)
        elif isinstance(v, (float, np.floating)):
            v = float(v) if np.isfinite(v) else "nan"
        else:
            v = fits_text(str(v)).decode()[:68]
        if len(key) > 8:
            hdr[f"HIERARCH {key}"] = v
        else:
            hdr[key] = v
    hdus = [fits.PrimaryHDU(header=hdr)]
    def add(name, arr):
        hdus.append(fits.ImageHDU(np.asarray(arr, np.float32), header=hdr.copy(), name=name))
    add("DATA", data)
    add("MODEL", model_image)
    add("RESIDUAL", np.asarray(data) - np.asarray(model_image))
    hdus.append(fits.ImageHDU((np.asarray(weight) == 0).astype(np.uint8), name="MASK"))
    add("SIGMA", sigma)
    for name, img in components.items():
        add(name.upper(), img)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fits.HDUList(hdus).writeto(p, overwrite=True))
