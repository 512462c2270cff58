"""Durable, sharded catalog runs: local (one or several devices) or on a Dask cluster.

A catalog of N rows is cut into *shards* of ``shard_size`` consecutive rows (default
``8 × batch_size``). Each shard is loaded, fitted (in batches, grouped by image/PSF shape,
exactly as :func:`galbayes.pipeline.fit_catalog` always did) and written atomically
(temporary file, fsync, rename) to ``out_dir/shards/shard_00012.fits``: one result row per
catalog row of the shard, plus the image blocks ``out_dir/blocks/<id>.fits``. After every
shard the manifest ``out_dir/manifest.json`` is rewritten atomically with the run's
fingerprint and the finished shards (file, rows, SHA-256). When all shards are done,
``results.fits`` and ``results.csv`` are assembled from the shard files in input order,
streaming (one shard in memory at a time).

Durability
    ``resume=True`` skips the shards the manifest lists as finished (after checking their
    files' SHA-256) and fits the rest; since a shard's batches depend only on the shard's
    rows and the settings, a resumed run writes the same bytes as an uninterrupted one and
    never duplicates or drops a row. Resuming is refused (:class:`ResumeError`, naming
    what changed) if the catalog file's contents, the model (recipe), the fit options
    (including ``batch_size`` and ``shard_size``) or the galbayes/JAX/numpyro versions
    differ from the run recorded in the manifest. Without ``resume`` an existing run in
    ``out_dir`` is discarded and started afresh.

Memory
    Only the shard being fitted and the prefetched next one hold images; results go to
    disk shard by shard. The validated catalog rows are kept as compressed pickles per shard
    (tens of bytes a row); :func:`galbayes.catalog.read_catalog`, which validates the whole
    catalog before any fitting, briefly needs ~1–2.5 kB a row while it reads the table.

Bad input
    Every catalog row gets exactly one result row whose ``status`` says what happened:
    unreadable/missing FITS, NaN/inf pixels, σ ≤ 0, all pixels masked, a bad PSF... are
    caught per galaxy when the shard is loaded; a non-finite fit is marked by
    :func:`galbayes.pipeline._result_row`; if fitting a whole batch raises, its galaxies are
    fitted one by one so a single bad galaxy cannot sink the batch, and those that still
    fail get ``status = "fit failed: ..."``. Malformed catalogs and recipes stop before any
    fitting (:class:`~galbayes.catalog.CatalogError`, :class:`~galbayes.errors.ModelError`).

Devices and machines
    Every batch is split over all local JAX devices (:mod:`galbayes.devices`). With
    ``dask=`` (a scheduler address, ``"local:N"`` for a local cluster of N worker processes,
    or a ``distributed.Client``) each shard is one Dask task that fits the shard and writes
    its file on the worker; the driver updates the manifest as tasks finish. Failed tasks
    are retried (``dask_retries``) and tasks of a worker that died are rescheduled by Dask;
    whatever still fails can be picked up with ``resume=True``. ``out_dir`` and the
    catalog's FITS files must be on a file system every worker sees.

Determinism
    Same catalog, model, options and seed on the same machine → bit-identical
    ``results.fits``/``results.csv``, whichever engine and however often interrupted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import os
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .catalog import CatalogError, read_catalog
from .devices import use_devices
from .inference.map import MapOptions
from .results import _fsync_dir, atomic_write, fits_text, make_table

__all__ = ["run_catalog", "ResumeError", "run_fingerprint", "describe_model", "shard_path",
           "read_manifest", "MANIFEST_NAME", "SHARD_DIR"]

MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
_FORMAT = 1
_STR_COLUMNS = ("id", "status")


class ResumeError(CatalogError):
    """A run that cannot go on in ``out_dir``: its inputs changed since the recorded run
    (catalog, recipe, options or software), its manifest is unreadable, or another run is
    using the folder. Raised before any fitting."""


# ----------------------------------------------------------------------------- fingerprint
def _canon(obj, depth: int = 0):
    """A JSON-able, process-independent description of ``obj`` (no memory addresses)."""
    if depth > 12:
        return "..."
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, (np.generic,)):
        return _canon(obj.item(), depth + 1)
    if isinstance(obj, np.ndarray) or type(obj).__module__.startswith("jax"):
        try:
            arr = np.asarray(obj)
            return {"array": str(arr.dtype), "shape": list(arr.shape),
                    "sha256": hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()}
        except Exception:  # noqa: BLE001  (a jax object that is not an array)
            pass
    if isinstance(obj, (list, tuple)):
        return [_canon(v, depth + 1) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _canon(v, depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if callable(obj) and hasattr(obj, "__code__"):
        try:
            src = inspect.getsource(obj)
        except (OSError, TypeError):
            src = obj.__code__.co_code.hex()
        return {"function": f"{obj.__module__}.{obj.__qualname__}",
                "source_sha256": hashlib.sha256(src.encode()).hexdigest()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"type": type(obj).__qualname__,
                "fields": {f.name: _canon(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj)}}
    if hasattr(obj, "__dict__"):
        state = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
        return {"type": f"{type(obj).__module__}.{type(obj).__qualname__}", "state": _canon(state, depth + 1)}
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


def describe_model(model) -> dict:
    """Everything about a :class:`~galbayes.model.Model` that affects a fit, JSON-able.

    Components (name, profile and its parameter declarations and source code, PSF
    convolution), every parameter entry (initial value, bounds, fixed, log, prior, sharing),
    likelihood, size unit and pixel-integration settings. Comments and formatting of the
    recipe file do not matter.
    """
    comps = []
    for c in model.components:
        prof = model.profiles[c.name]
        comps.append({"name": c.name, "convolve": c.convolve, "profile": {
            "name": prof.name, "kind": prof.kind, "convolve": prof.convolve,
            "params": _canon(list(prof.params)), "fn": _canon(prof.fn)}})
    entries = [{"key": e.key, "spec": _canon(e.spec), "log": e.log, "static_zero": e.static_zero,
                "param": {f: _canon(getattr(e.param, f)) for f in ("init", "bounds", "fixed", "log", "prior")}}
               for e in model.entries]
    slots = {f"{c}.{p}": i for (c, p), i in sorted(model.slots.items())}
    return {"likelihood": model.likelihood, "size_unit": model.size_unit,
            "oversample": [list(o) for o in model.oversample], "components": comps,
            "entries": entries, "slots": slots}


def _describe_options(options: MapOptions, *, batch_size, shard_size, blocks, errors) -> dict:
    d = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    d.update(batch_size=int(batch_size), shard_size=int(shard_size), blocks=bool(blocks))
    if errors is not None:
        d["errors"] = errors if isinstance(errors, (bool, int, float, str)) else _canon(errors)
    return d


def _software() -> dict:
    import jax
    import jaxlib
    import numpyro

    from . import __version__

    return {"galbayes": __version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "numpyro": numpyro.__version__}


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_fingerprint(catalog, model, options: MapOptions, *, batch_size: int, shard_size: int,
                    blocks: bool = True, errors=None) -> dict:
    """The run's identity: SHA-256 of the catalog file's bytes, of the model description,
    of the options (fit settings, batch and shard size) and of the software versions.

    Returns ``{"hashes": {part: sha256}, "described": {part: readable description}}``.
    """
    described = {
        "catalog": {"path": str(catalog), "bytes": os.path.getsize(catalog)},
        "recipe": {"source": getattr(model, "source", None) or "(built in Python)",
                   "model": describe_model(model)},
        "options": _describe_options(options, batch_size=batch_size, shard_size=shard_size,
                                     blocks=blocks, errors=errors),
        "software": _software(),
    }
    hashes = {"catalog": _file_sha256(catalog), "recipe": _sha256_json(described["recipe"]["model"]),
              "options": _sha256_json(described["options"]), "software": _sha256_json(described["software"])}
    return {"hashes": hashes, "described": described}


def _what_changed(old: dict, new: dict) -> list:
    """Readable differences between the recorded fingerprint and this run's."""
    msgs = []
    oh, nh = old.get("hashes", {}), new["hashes"]
    od, nd = old.get("described", {}), new["described"]
    if oh.get("catalog") != nh["catalog"]:
        was, now = od.get("catalog", {}), nd["catalog"]
        msgs.append(f"the catalog file's contents changed ({was.get('path')}, {was.get('bytes')} bytes, "
                    f"sha256 {str(oh.get('catalog'))[:12]}… → {now['path']}, {now['bytes']} bytes, "
                    f"sha256 {nh['catalog'][:12]}…)")
    if oh.get("recipe") != nh["recipe"]:
        was, now = od.get("recipe", {}), nd["recipe"]
        detail = _first_difference(was.get("model"), now["model"])
        msgs.append(f"the recipe/model changed (was {was.get('source')}, now {now['source']}"
                    + (f"; first difference: {detail}" if detail else "") + ")")
    if oh.get("options") != nh["options"]:
        was, now = od.get("options", {}), nd["options"]
        diffs = [f"{k} {was.get(k)!r} → {now.get(k)!r}" for k in sorted(set(was) | set(now))
                 if was.get(k) != now.get(k)]
        msgs.append("the fit options changed (" + (", ".join(diffs) or "details unavailable") + ")")
    if oh.get("software") != nh["software"]:
        was, now = od.get("software", {}), nd["software"]
        diffs = [f"{k} {was.get(k)} → {now.get(k)}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
        msgs.append("the software changed (" + ", ".join(diffs) + "); results would not be "
                    "identical to an uninterrupted run")
    return msgs


def _first_difference(a, b, path="model"):
    if type(a) is not type(b):
        return f"{path}: {_short(a)} → {_short(b)}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}")
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} → {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                label = x.get("name") or x.get("key") if isinstance(x, dict) else None
                return _first_difference(x, y, f"{path}[{label or i}]")
        return None
    return None if a == b else f"{path}: {_short(a)} → {_short(b)}"


def _short(v, n=60):
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[: n - 1] + "…"


# ----------------------------------------------------------------------------- files
def shard_path(out_dir, k: int) -> Path:
    """``out_dir/shards/shard_00012.fits``."""
    return Path(out_dir) / SHARD_DIR / f"shard_{k:05d}.fits"


def _write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True)
    atomic_write(path, lambda p: p.write_text(text))


def read_manifest(out_dir) -> dict | None:
    """The run manifest of ``out_dir`` (None if there is none)."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ResumeError(f"{path}: cannot read the run manifest ({exc}); delete it (and "
                          f"{Path(out_dir) / SHARD_DIR}) or run without resume to start afresh") from None


def _write_shard(table, path: Path, meta: dict) -> str:
    """Write one shard's result table atomically; returns the file's SHA-256.

    Text columns are stored as UTF-8 bytes (so non-ASCII statuses survive exactly)."""
    t = table.copy(copy_data=False)
    for c in _STR_COLUMNS:
        t.replace_column(c, np.char.encode(np.asarray(table[c], dtype=str), "utf-8") if len(t) else np.zeros(0, "S1"))
    t.meta.clear()
    t.meta.update(meta)
    digest = {}

    def write(tmp):
        t.write(tmp, format="fits", overwrite=True)
        digest["sha"] = _file_sha256(tmp)

    atomic_write(path, write)
    return digest["sha"]


def _read_shard(path: Path, run_id: str, k: int, n_rows: int) -> dict:
    """A shard file's columns as numpy arrays (text decoded); checks it belongs to the run."""
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        hdu = hdul[1]
        hdr = hdu.header
        if hdr.get("GBRUN") != run_id or hdr.get("GBSHARD") != k or hdr.get("NAXIS2") != n_rows:
            raise ResumeError(f"{path}: not shard {k} ({n_rows} rows) of this run")
        data = hdu.data
        cols = {}
        for name in hdu.columns.names:
            a = np.asarray(data[name]) if n_rows else np.zeros(0)
            if name in _STR_COLUMNS:
                a = np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in a.tolist()],
                             dtype=str) if n_rows else np.zeros(0, str)
            elif a.dtype.kind == "f":
                a = a.astype(np.float64)
            elif a.dtype.kind in "iu":
                a = a.astype(np.int64)
            cols[name] = a
    return cols


def _csv_rows(table, header: bool) -> str:
    buf = io.StringIO()
    table.write(buf, format="ascii.csv")
    text = buf.getvalue()
    if not header:
        text = text.split("\n", 1)[1] if "\n" in text else ""
    return text


def _assemble(out_dir: Path, model, run_id: str, shard_rows: list, errors, return_table: bool):
    """Stream the shard files, in order, into results.fits and results.csv."""
    from astropy.io import fits
    from astropy.table import Table

    errors_kw = {} if errors is None else {"errors": bool(errors)}
    template = make_table(model, [{"id": "", "status": ""}], **errors_kw)[:0]  # column types
    names = list(template.colnames)
    total = sum(n for _, n in shard_rows)

    def shards():
        for k, n in shard_rows:
            cols = _read_shard(shard_path(out_dir, k), run_id, k, n)
            missing = [c for c in names if c not in cols]
            if missing:
                raise ResumeError(f"{shard_path(out_dir, k)}: lacks column(s) {missing}")
            yield cols

    # pass 1: widths of the FITS text columns
    width = {c: 1 for c in _STR_COLUMNS}
    for cols in shards():
        for c in _STR_COLUMNS:
            if len(cols[c]):
                width[c] = max(width[c], max(len(fits_text(s)) for s in cols[c]))
    # the FITS header of the whole table, from an empty table with the final column types
    head = Table()
    rec = []
    for c in names:
        kind = template[c].dtype.kind
        if c in _STR_COLUMNS:
            head[c] = np.zeros(0, f"S{width[c]}")
            rec.append((c, f"S{width[c]}"))
        elif kind == "b":
            head[c] = np.zeros(0, bool)
            rec.append((c, "u1"))
        elif kind in "iu":
            head[c] = np.zeros(0, np.int64)
            rec.append((c, ">i8"))
        else:
            head[c] = np.zeros(0, np.float64)
            rec.append((c, ">f8"))
        head[c].unit = template[c].unit
    rec = np.dtype(rec)
    hdu = fits.table_to_hdu(head, character_as_bytes=True)
    hdr = hdu.header
    if hdr["NAXIS1"] != rec.itemsize:  # pragma: no cover  (guards the hand-made record layout)
        raise RuntimeError(f"FITS row size {hdr['NAXIS1']} != {rec.itemsize}")
    hdr["NAXIS2"] = total
    hdr["GBRUN"] = (run_id, "galbayes run fingerprint")
    hdr["GBNSHARD"] = (len(shard_rows), "number of shards")
    primary = fits.PrimaryHDU().header
    primary["EXTEND"] = True

    kept = {c: [] for c in names} if return_table else None

    def write_both(fits_tmp: Path, csv_tmp: Path):
        with open(fits_tmp, "wb") as ff, open(csv_tmp, "w", encoding="utf-8", newline="") as fc:
            ff.write(primary.tostring().encode("ascii"))
            ff.write(hdr.tostring().encode("ascii"))
            fc.write(_csv_rows(template, header=True))
            for cols in shards():
                n = len(cols["id"])
                r = np.zeros(n, rec)
                for c in names:
                    if c in _STR_COLUMNS:
                        r[c] = [fits_text(s) for s in cols[c]]
                    elif template[c].dtype.kind == "b":
                        r[c] = np.where(cols[c].astype(bool), ord("T"), ord("F"))
                    else:
                        r[c] = cols[c]
                ff.write(r.tobytes())
                fc.write(_csv_rows(Table({c: cols[c] for c in names}, names=names), header=False))
                if kept is not None:
                    for c in names:
                        kept[c].append(cols[c])
            size = rec.itemsize * total
            ff.write(b"\0" * ((-size) % 2880))
            for fh in (ff, fc):
                fh.flush()
                os.fsync(fh.fileno())

    tmp_f = out_dir / f".results.fits.tmp-{os.getpid()}"
    tmp_c = out_dir / f".results.csv.tmp-{os.getpid()}"
    try:
        write_both(tmp_f, tmp_c)
        os.replace(tmp_f, out_dir / "results.fits")
        os.replace(tmp_c, out_dir / "results.csv")
    finally:
        for t in (tmp_f, tmp_c):
            if t.exists():
                t.unlink()
    _fsync_dir(out_dir)
    if kept is None:
        return None
    rows = {c: (np.concatenate(v) if v else template[c].data[:0]) for c, v in kept.items()}
    table = Table(rows, names=names)
    for c in names:
        table[c].unit = template[c].unit
    return table


# ----------------------------------------------------------------------------- one shard
class _ShardRows:
    """The catalog's rows, cut into shards and kept as compressed pickles (tens of bytes a row
    instead of ~900 for the row objects); ``store[k]`` unpacks shard ``k``."""

    def __init__(self, rows: list, shard_size: int):
        import pickle
        import zlib

        self.n_rows = len(rows)
        self.shard_size = shard_size
        self._blobs = [zlib.compress(pickle.dumps(rows[i:i + shard_size], protocol=pickle.HIGHEST_PROTOCOL), 1)
                       for i in range(0, len(rows), shard_size)]

    def __len__(self):
        return len(self._blobs)

    def __getitem__(self, k: int) -> list:
        import pickle
        import zlib

        return pickle.loads(zlib.decompress(self._blobs[k]))

    def size(self, k: int) -> int:
        return min(self.shard_size, self.n_rows - k * self.shard_size)


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to fit shards of a run (picklable)."""

    model: object
    model_key: str
    options: MapOptions
    batch_size: int
    blocks: bool
    errors: object
    out_dir: str
    run_id: str
    devices: object = None


_MODELS: dict = {}


def _worker_model(job: ShardJob):
    """One Model object per model description in a worker process, so each process compiles
    a model's fit program once (compiled programs are cached per Model object)."""
    return _MODELS.setdefault(job.model_key, job.model)


def _load_rows(model, rows) -> list:
    """``[(row, obs, packed, error)]``; any failure to read or pack a galaxy is its status."""
    from .pipeline import _load_chunk

    out = []
    for row in rows:
        try:
            out.extend(_load_chunk(model, [row]))
        except Exception as exc:  # noqa: BLE001  (any unreadable input is one galaxy's problem)
            out.append((row, None, None, f"error: galaxy {row.id}: cannot load: {type(exc).__name__}: {exc}"))
    return out


def _fail_message(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return "fit failed: " + (msg if len(msg) <= 300 else msg[:299] + "…")


def _batches(packed: list, batch_size: int):
    """The batches :func:`galbayes.pipeline._fit_packed` forms: grouped by (image, PSF)
    shape in order of first appearance, consecutive runs of ``batch_size``."""
    groups: dict = {}
    for gid, gal in packed:
        groups.setdefault((gal.image.shape, gal.psf.shape), []).append((gid, gal))
    for items in groups.values():
        for start in range(0, len(items), batch_size):
            yield items[start:start + batch_size]


def _errors_kw(fn, job: ShardJob) -> dict:
    """``{"errors": job.errors}`` if ``fn`` takes an ``errors`` keyword and one was asked for."""
    if job.errors is None:
        return {}
    try:
        takes = "errors" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes = False
    return {"errors": job.errors} if takes else {}


def _fit_batch(model, items, job: ShardJob):
    """Fit one batch; if that raises, fit its galaxies one by one. Returns (fitted, failed)."""
    from .pipeline import _fit_packed

    try:
        return list(_fit_packed(model, items, job.options, job.batch_size, **_errors_kw(_fit_packed, job))), {}
    except Exception as exc:  # noqa: BLE001
        if len(items) == 1:
            return [], {items[0][0]: _fail_message(exc)}
        warnings.warn(f"fitting a batch of {len(items)} galaxies raised {type(exc).__name__}: {exc}; "
                      "fitting them one by one", RuntimeWarning, stacklevel=2)
    fitted, failed = [], {}
    for item in items:
        try:
            fitted.extend(_fit_packed(model, [item], job.options, job.batch_size, **_errors_kw(_fit_packed, job)))
        except Exception as exc:  # noqa: BLE001
            failed[item[0]] = _fail_message(exc)
    return fitted, failed


def _fit_shard(model, job: ShardJob, rows: list, loaded: list):
    """Result rows of one shard (in row order) as a table; writes the image blocks."""
    from .pipeline import _result_row, _write_blocks

    out_dir = Path(job.out_dir)
    results: dict = {}
    obs_by_id, packed = {}, []
    for row, obs, gal, err in loaded:
        if err is not None:
            results[row.index] = {"id": row.id, "status": err}
        else:
            obs_by_id[row.id] = (row, obs)
            packed.append((row.id, gal))
    for items in _batches(packed, job.batch_size):
        fitted, failed = _fit_batch(model, items, job)
        for gid, msg in failed.items():
            results[obs_by_id[gid][0].index] = {"id": gid, "status": msg}
        for gid, gal, _, j, res in fitted:
            results[obs_by_id[gid][0].index] = _result_row(model, gid, gal, res, j, **_errors_kw(_result_row, job))
        if job.blocks and fitted:
            try:
                _write_blocks(model, fitted, results, obs_by_id, out_dir)
            except Exception as exc:  # noqa: BLE001  (a block is a by-product; keep the fit)
                warnings.warn(f"image blocks of {[f[0] for f in fitted]} not written: "
                              f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
    missing = [r.id for r in rows if r.index not in results]
    if missing:  # pragma: no cover  (every path above gives each galaxy a row)
        raise RuntimeError(f"no result for galaxies {missing[:5]}")
    errors_kw = {} if job.errors is None else {"errors": bool(job.errors)}
    return make_table(model, [results[r.index] for r in rows], **errors_kw)


def _finish_shard(model, job: ShardJob, k: int, rows: list, loaded: list) -> dict:
    table = _fit_shard(model, job, rows, loaded)
    meta = {"GBRUN": job.run_id, "GBSHARD": k, "GBROW0": rows[0].index, "GBNROWS": len(rows)}
    sha = _write_shard(table, shard_path(job.out_dir, k), meta)
    n_ok = int(sum(1 for s in table["status"] if s == "ok"))
    return {"shard": k, "file": f"{SHARD_DIR}/{shard_path(job.out_dir, k).name}",
            "rows": [rows[0].index, rows[-1].index + 1], "sha256": sha, "n_ok": n_ok}


def run_shard(job: ShardJob, k: int, rows: list) -> dict:
    """Load, fit and write shard ``k`` (the Dask task; also usable by hand). Returns its
    manifest entry."""
    model = _worker_model(job)
    with use_devices(job.devices):
        return _finish_shard(model, job, k, rows, _load_rows(model, rows))


# ----------------------------------------------------------------------------- engines
def _run_local(job: ShardJob, model, todo: list, shard_rows, record, prefetch: bool):
    def load(k):
        rows = shard_rows(k)
        return rows, _load_rows(model, rows)

    if not todo:
        return
    with use_devices(job.devices), ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(load, todo[0]) if prefetch else None
        for i, k in enumerate(todo):
            if prefetch:
                rows, loaded = future.result()
                if i + 1 < len(todo):  # the next shard's images load while this one is fitted
                    future = pool.submit(load, todo[i + 1])
            else:
                rows, loaded = load(k)
            record(_finish_shard(model, job, k, rows, loaded))
            del rows, loaded


def _dask_client(dask):
    try:
        from distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover
        raise ImportError("the Dask engine needs dask and distributed: pip install 'galbayes[dask]'") from None
    if isinstance(dask, Client):
        return dask, []
    spec = str(dask)
    if spec == "local" or spec.startswith("local:"):
        n = int(spec.split(":", 1)[1]) if ":" in spec else (os.cpu_count() or 1)
        if n < 1:
            raise ValueError(f"--dask {spec!r}: need at least one worker")
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        return client, [client.close, cluster.close]
    client = Client(spec)
    return client, [client.close]


def _run_dask(job: ShardJob, todo: list, shard_rows, record, dask, retries: int):
    """Shards as Dask tasks, a bounded number in flight (the driver never holds every
    shard's rows at once); the manifest is updated as each task finishes."""
    from distributed import as_completed

    client, closers = _dask_client(dask)
    try:
        stamp = f"{os.getpid()}-{time.time_ns()}"
        pending = list(reversed(todo))
        futures: dict = {}

        def window() -> int:
            try:
                n_workers = len(client.scheduler_info().get("workers", {}))
            except Exception:  # noqa: BLE001
                n_workers = 0
            return max(16, 4 * n_workers)

        def submit(queue):
            limit = window()
            while pending and len(futures) < limit:
                k = pending.pop()
                fut = client.submit(run_shard, job, k, shard_rows(k), pure=False, retries=retries,
                                    key=f"galbayes-shard-{k:05d}-{job.run_id}-{stamp}")
                futures[fut] = k
                if queue is not None:
                    queue.add(fut)

        submit(None)
        queue = as_completed(list(futures))
        failed = []
        for fut in queue:
            k = futures.pop(fut)
            try:
                info = fut.result()
            except Exception as exc:  # noqa: BLE001  (KilledWorker, worker-side errors)
                failed.append((k, exc))
            else:
                record(info)
            fut.release()
            submit(queue)
        if failed:
            k, exc = failed[0]
            raise RuntimeError(
                f"{len(failed)} shard(s) failed on the Dask workers (after {retries} retries; first: shard "
                f"{k}: {type(exc).__name__}: {exc}); the finished shards are recorded in "
                f"{Path(job.out_dir) / MANIFEST_NAME}: run again with resume=True (--resume) to fit only "
                "the missing ones")
    finally:
        for close in closers:
            try:
                close()
            except Exception:  # noqa: BLE001
                pass


# ----------------------------------------------------------------------------- driver
class _Lock:
    """An exclusive lock on ``out_dir`` (released by the OS if the process dies)."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ".galbayes.lock"
        self.fh = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover  (not POSIX: no locking)
            return self
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            self.fh = None
            raise ResumeError(f"{self.path.parent}: another galbayes run is writing into this folder "
                              f"(lock {self.path}); wait for it to end or choose another output folder") from None
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            self.fh.close()
        return False


def _clear_run(out_dir: Path):
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    shard_dir = out_dir / SHARD_DIR
    if shard_dir.is_dir():
        for p in shard_dir.iterdir():
            if re.fullmatch(r"\.?shard_\d+\.fits(\.tmp-.*)?", p.name):
                p.unlink()


def run_catalog(catalog, model, out_dir, *, options: MapOptions | None = None, batch_size: int = 64,
                shard_size: int | None = None, blocks: bool = True, progress: bool = True,
                resume: bool = False, dask=None, dask_retries: int = 3, prefetch: bool = True,
                devices=None, errors=None, return_table: bool = True):
    """Fit every galaxy of a catalog, durably, shard by shard (see the module docstring).

    Parameters
    ----------
    catalog : str or Path
        CSV/ECSV/FITS catalog (:mod:`galbayes.catalog`).
    model : Model
    out_dir : str or Path
        Gets ``results.fits``, ``results.csv``, ``manifest.json``, ``shards/`` and
        ``blocks/<id>.fits``.
    options : MapOptions, optional
    batch_size : int
        Galaxies per jitted batch.
    shard_size : int, optional
        Consecutive catalog rows per shard (default ``8 × batch_size``).
    blocks : bool
        Write the image blocks.
    progress : bool
        Show a progress bar.
    resume : bool
        Continue the run recorded in ``out_dir`` (refused with :class:`ResumeError` if the
        catalog, model, options or software changed); without a recorded run, start afresh.
    dask : str or distributed.Client, optional
        Fit shards as Dask tasks: a scheduler address (``"tcp://host:8786"``), ``"local:N"``
        (a local cluster of N worker processes) or a client.
    dask_retries : int
        Retries of a failed shard task.
    prefetch : bool
        Load the next shard's images on a background thread while this one is fitted
        (local engine).
    devices : None, int or sequence of jax.Device
        Devices to split each batch over (default: all; see :func:`galbayes.devices.use_devices`).
    errors : optional
        Passed to :func:`galbayes.results.make_table` (uncertainty columns) when not None.
    return_table : bool
        Return the results table (read back from the shard files).

    Returns
    -------
    astropy.table.Table or None
    """
    options = options or MapOptions()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shard_size = int(shard_size or 8 * batch_size)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    catalog = Path(catalog).resolve()
    out_dir = Path(out_dir).resolve()
    rows = read_catalog(catalog, model=model)  # malformed catalogs stop here, before any fit
    store = _ShardRows(rows, shard_size)
    del rows  # memory: only the compressed shards of rows stay
    fp = run_fingerprint(catalog, model, options, batch_size=batch_size, shard_size=shard_size,
                         blocks=blocks, errors=errors)
    run_id = _sha256_json(fp["hashes"])[:16]
    n_rows = store.n_rows
    n_shards = len(store)
    shard_rows = store.__getitem__

    out_dir.mkdir(parents=True, exist_ok=True)
    with _Lock(out_dir):
        old = read_manifest(out_dir) if resume else None
        done: dict = {}
        if old is not None:
            changes = _what_changed(old.get("fingerprint", {}), fp)
            if changes:
                raise ResumeError(f"cannot resume the run in {out_dir}: " + "; ".join(changes)
                                  + ". To start afresh run without --resume (resume=False), or use another output folder.")
            for key, info in old.get("shards", {}).items():
                k = int(key)
                p = out_dir / info.get("file", "")
                if 0 <= k < n_shards and p.is_file() and _file_sha256(p) == info.get("sha256"):
                    done[k] = info
                else:
                    warnings.warn(f"shard {k} of the recorded run is missing or changed on disk; fitting it again",
                                  RuntimeWarning, stacklevel=2)
        else:
            _clear_run(out_dir)
        manifest = {"galbayes_run": _FORMAT, "run_id": run_id, "fingerprint": fp, "n_rows": n_rows,
                    "shard_size": shard_size, "n_shards": n_shards, "complete": False,
                    "shards": {str(k): done[k] for k in sorted(done)}}
        manifest_path = out_dir / MANIFEST_NAME
        _write_json(manifest_path, manifest)

        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=n_rows, initial=sum(store.size(k) for k in done), unit="gal", desc="fitting")

        def record(info):
            manifest["shards"][str(info["shard"])] = info
            _write_json(manifest_path, manifest)
            if bar is not None:
                bar.update(info["rows"][1] - info["rows"][0])

        todo = [k for k in range(n_shards) if k not in done]
        job = ShardJob(model=model, model_key=fp["hashes"]["recipe"], options=options, batch_size=batch_size,
                       blocks=blocks, errors=errors, out_dir=str(out_dir), run_id=run_id, devices=devices)
        try:
            if dask is None:
                _run_local(job, model, todo, shard_rows, record, prefetch)
            else:
                _run_dask(job, todo, shard_rows, record, dask, dask_retries)
        finally:
            if bar is not None:
                bar.close()
        table = _assemble(out_dir, model, run_id, [(k, store.size(k)) for k in range(n_shards)],
                          errors, return_table)
        manifest["complete"] = True
        _write_json(manifest_path, manifest)
    return table
