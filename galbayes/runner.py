"""Durable, sharded catalog runs: local (one or several devices) or on a Dask cluster.

A catalog of N rows is cut into *shards* of ``shard_size`` consecutive rows (default
``8 × batch_size``, at least 256 in a local run: :func:`default_shard_size`). Each shard is
loaded, fitted (in batches, grouped by image/PSF shape, exactly as
:func:`galbayes.pipeline.fit_catalog` always did) and written atomically (temporary file,
fsync, rename) to ``out_dir/shards/shard_00012.fits``: one result row per
catalog row of the shard, plus the image blocks ``out_dir/blocks/<id>.fits``. The run's
manifest ``out_dir/manifest.json`` (fingerprint, shard layout) is written atomically when the
run starts and ends; each finished shard is committed by appending one checksummed JSON line
(file, rows, SHA-256 of the shard file, fingerprint of its input files) to the journal
``out_dir/manifest.jsonl``, fsynced: constant work per shard however long the catalog. When
all shards are done, ``results.fits`` and ``results.csv`` are assembled from the shard files
in input order, streaming (one shard in memory at a time), and the final manifest lists
every shard.

Durability
    ``resume=True`` skips the shards the manifest lists as finished (after checking their
    files' SHA-256) and fits the rest; since a shard's batches depend only on the shard's
    rows and the settings, a resumed run writes the same bytes as an uninterrupted one and
    never duplicates or drops a row. Resuming is refused (:class:`ResumeError`, naming
    what changed) if the catalog file's contents, the model (recipe), the fit options
    (including ``batch_size`` and ``shard_size``) or the galbayes/JAX/numpyro versions
    differ from the run recorded in the manifest. Without ``resume`` an existing run in
    ``out_dir`` is discarded and started afresh.

Input files
    Every shard records a fingerprint of the FITS files its rows read (image, σ, PSF,
    mask): one SHA-256 over their (path, size, mtime_ns) and one over their (path, content
    SHA-256), taken before the files are loaded. On resume a finished shard is kept only if
    its files are unchanged: equal size and mtime_ns are taken as unchanged; otherwise the
    contents decide (a file touched but not changed keeps its shard). A shard whose inputs
    changed, appeared or vanished is **refitted** (with a warning naming it), never reused;
    the other shards are kept. (Equal size and mtime_ns with different bytes, e.g. a copy
    made with ``cp -p`` of a same-sized file, is not detected: delete that shard's file to
    force a refit.)

Faults
    A full disk (ENOSPC/EDQUOT) or a read-only folder while writing a shard, a block, the
    journal or the results stops the run with :class:`OutputError`: temporary files are
    removed, the shard being written is not committed, and ``resume=True`` after freeing
    space fits only the missing shards. A folder that cannot be written is refused before
    the catalog is read. SIGINT/SIGTERM stop the run after the shard being fitted is
    committed (:class:`RunInterrupted`; ``galbayes fit`` exits with code
    :data:`EXIT_INTERRUPTED` = 75); a second signal stops at once. A damaged journal line,
    a shard file whose SHA-256 differs from its record, or a shard of another run is refitted
    with a warning; an unreadable manifest is a :class:`ResumeError`. One run at a time may
    use a folder (:class:`_Lock`: ``flock`` plus a holder record pid/host/start time; a
    lock left by a dead process is taken over with a warning).

Memory
    Only the shard being fitted and the prefetched next one hold images; results go to
    disk shard by shard. The catalog is streamed (:class:`galbayes.catalog.Catalog`): it is
    validated once before any fitting, keeping 8 bytes a row (id hashes, for the duplicate
    check) and one offset per shard; each shard's rows are parsed again when it is loaded.

Bad input
    Every catalog row gets exactly one result row whose ``status`` says what happened:
    unreadable/missing FITS, NaN/inf pixels, σ ≤ 0, all pixels masked, a bad PSF... are
    caught per galaxy when the shard is loaded; a non-finite fit is marked by
    :func:`galbayes.fitting._result_row`; if fitting a whole batch raises, its galaxies are
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
import errno
import hashlib
import io
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .catalog import CatalogError, open_catalog
from .devices import use_devices
from .errors import OptionsError, OutputError, ResumeError  # defined there, importable from here as before
from .fitting import _fit_packed, _input_notes, _load_chunk, _result_row, _write_blocks
from .inference.map import MapOptions, check_streams, default_streams
from .model import describe_model
from .results import _fsync_dir, atomic_write, fits_text, make_table
from .status import fit_failed, input_error, is_clean
from .traced import canon

__all__ = ["run_catalog", "ResumeError", "OutputError", "RunInterrupted", "EXIT_INTERRUPTED",
           "run_fingerprint", "describe_model", "shard_path", "read_manifest", "MANIFEST_NAME",
           "JOURNAL_NAME", "SHARD_DIR", "default_shard_size", "MIN_SHARD_ROWS"]

MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = "manifest.jsonl"
SHARD_DIR = "shards"
LOCK_NAME = ".galbayes.lock"
#: The fewest rows of a default shard in a local run (:func:`default_shard_size`): with 64, a
#: catalog of 256 galaxies of 64²–192² fitted 1.17× slower (in-process, warm; benchmarks/README.md).
MIN_SHARD_ROWS = 256
_FORMAT = 2
EXIT_INTERRUPTED = 75  # sysexits EX_TEMPFAIL: stopped on request, finish with --resume
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_STR_COLUMNS = ("id", "status", "psf_type")


class RunInterrupted(Exception):
    """The run was stopped by SIGINT/SIGTERM at a shard boundary; the finished shards are
    committed and ``resume=True`` (``--resume``) completes the run."""

    def __init__(self, signum: int, n_done: int, n_shards: int, out_dir):
        self.signum, self.n_done, self.n_shards, self.out_dir = signum, n_done, n_shards, out_dir
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        super().__init__(f"interrupted by {name}: {n_done} of {n_shards} shards are committed in {out_dir}; "
                         "run the same command again with --resume (resume=True) to finish")


# ----------------------------------------------------------------------------- fingerprint
def _describe_options(options: MapOptions, *, batch_size, shard_size, blocks, errors) -> dict:
    d = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    d.update(batch_size=int(batch_size), shard_size=int(shard_size), blocks=bool(blocks))
    if errors is not None:
        d["errors"] = errors if isinstance(errors, (bool, int, float, str)) else canon(errors)
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
                    blocks: bool = True, errors=None, bound_columns=()) -> dict:
    """The run's identity: SHA-256 of the catalog file's bytes, of the model description,
    of the options (fit settings, batch and shard size) and of the software versions.
    ``bound_columns``: the catalog's per-galaxy bounds columns, recorded (they replace the
    model's bounds, and priors, of those galaxies; their values are in the catalog's hash).

    Returns ``{"hashes": {part: sha256}, "described": {part: readable description}}``.
    """
    described = {
        "catalog": {"path": str(catalog), "bytes": os.path.getsize(catalog),
                    **({"per_galaxy_bounds": sorted(bound_columns)} if bound_columns else {})},
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


def _read_manifest_file(out_dir) -> dict | None:
    path = Path(out_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        man = json.loads(path.read_text())
        if not isinstance(man, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise ResumeError(f"{path}: cannot read the run manifest ({exc}); delete it (and "
                          f"{Path(out_dir) / SHARD_DIR}) or run without resume to start afresh") from None
    return man


def _recorded_shard_size(out_dir) -> int | None:
    """The shard size recorded in ``out_dir``'s manifest (None without a readable one; an
    unreadable manifest is reported later, where a resumed run reads it under the lock)."""
    try:
        man = _read_manifest_file(out_dir)
    except ResumeError:
        return None
    size = (man or {}).get("shard_size")
    return int(size) if isinstance(size, int) and size >= 1 else None


def default_shard_size(batch_size: int, *, dask: bool = False) -> int:
    """Rows per shard when none is given: ``8 × batch_size``, and at least
    :data:`MIN_SHARD_ROWS` in a local run.

    A shard's galaxies are fitted in groups of one stamp-shape bucket each
    (:func:`galbayes.batching.bucket_groups`); in a catalog of mixed stamp sizes a small
    shard gives small groups, whose slots idle while each group's slowest galaxy finishes. A
    Dask run keeps ``8 × batch_size``: there a shard is a task, and more tasks keep more
    workers busy.
    """
    rows = 8 * int(batch_size)
    return rows if dask else max(rows, MIN_SHARD_ROWS)


def read_manifest(out_dir) -> dict | None:
    """The run manifest of ``out_dir`` with the shards committed so far (from the journal)
    under ``"shards"``; None if there is none."""
    man = _read_manifest_file(out_dir)
    if man is None:
        return None
    if not man.get("complete"):
        entries, _ = _read_journal(Path(out_dir), man.get("run_id"))
        man["shards"] = {str(k): v for k, v in sorted(entries.items())}
    return man


def _entry_check(entry: dict) -> str:
    return _sha256_json({k: v for k, v in entry.items() if k != "check"})


def _read_journal(out_dir: Path, run_id) -> tuple:
    """``({shard: entry}, [problems])`` from the journal: later lines win; a line that is
    truncated, not JSON, fails its checksum or belongs to another run is skipped (and
    reported), so its shard counts as not finished."""
    path = out_dir / JOURNAL_NAME
    entries, problems = {}, []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return entries, problems
    except OSError as exc:
        raise ResumeError(f"{path}: cannot read the run journal ({exc})") from None
    lines = data.split(b"\n")
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        if n == len(lines):  # no newline after it: a write that did not finish
            problems.append(f"line {n} is truncated")
            continue
        try:
            entry = json.loads(raw)
            ok = isinstance(entry, dict) and entry.get("check") == _entry_check(entry)
        except ValueError:
            ok = False
        if not ok:
            problems.append(f"line {n} is damaged")
        elif entry.get("run_id") != run_id:
            problems.append(f"line {n} belongs to run {entry.get('run_id')}")
        else:
            entries[int(entry["shard"])] = entry
    return entries, problems


def _append_journal(path: Path, entry: dict) -> None:
    """Commit one shard: append its checksummed line and fsync; on failure the journal is
    cut back to its previous length (best effort) and the error raised."""
    entry = dict(entry)
    entry["check"] = _entry_check(entry)
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            n = os.write(fd, line)
            if n != len(line):
                raise OSError(errno.ENOSPC, f"short write ({n} of {len(line)} bytes)", str(path))
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
            raise
    finally:
        os.close(fd)


def _rewrite_journal(path: Path, entries: dict) -> None:
    lines = []
    for k in sorted(entries):
        e = dict(entries[k])
        e["check"] = _entry_check(e)
        lines.append(json.dumps(e, sort_keys=True) + "\n")
    text = "".join(lines)
    atomic_write(path, lambda p: p.write_text(text))


_HASHES: OrderedDict = OrderedDict()  # (path, size, mtime_ns, inode) -> sha256; bounded LRU
_HASH_LOCK = threading.Lock()


def _stat_key(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ino)


def _content_sha(path: Path, key) -> str:
    with _HASH_LOCK:
        if key in _HASHES:
            _HASHES.move_to_end(key)
            return _HASHES[key]
    try:
        sha = _file_sha256(path)
    except OSError as exc:
        sha = f"unreadable: {exc.errno}"
    with _HASH_LOCK:
        _HASHES[key] = sha
        while len(_HASHES) > 4096:
            _HASHES.popitem(last=False)
    return sha


def _shard_files(rows) -> list:
    seen, out = set(), []
    for r in rows:
        for f in r.files():
            s = str(f)
            if s not in seen:
                seen.add(s)
                out.append(f)
    return out


def _inputs_fingerprint(rows, *, content: bool = True) -> dict:
    """Fingerprint of the FITS files a shard's rows read (see "Input files" above)."""
    stat, cont = [], []
    for f in _shard_files(rows):
        key = _stat_key(f)
        if key is None:
            stat.append([str(f), "missing"])
            cont.append([str(f), "missing"])
        else:
            stat.append([str(f), key[1], key[2]])
            if content:
                cont.append([str(f), _content_sha(f, key)])
    out = {"n_files": len(stat), "stat": _sha256_json(stat)}
    if content:
        out["content"] = _sha256_json(cont)
    return out


def _changed_inputs(rows, recorded: dict, written_ns) -> list | None:
    """None if the files of ``rows`` match the recorded fingerprint, else a list naming
    (up to 3 of) the files newer than the record, missing, or [] if none is identifiable."""
    if not recorded:
        return []
    now = _inputs_fingerprint(rows, content=False)
    if now["stat"] == recorded.get("stat"):
        return None
    if _inputs_fingerprint(rows)["content"] == recorded.get("content"):
        return None  # touched, not changed
    named = []
    for f in _shard_files(rows):
        key = _stat_key(f)
        if key is None or (written_ns and key[2] > written_ns):
            named.append(f"{f}" + (" (missing)" if key is None else ""))
    return named[:3]


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
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(out_dir / "results.fits")) from exc
        raise
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
    streams: int | None = None     # round drivers at once (fit_map); None: the default


_MODELS: dict = {}


def _worker_model(job: ShardJob):
    """One Model object per model description in a worker process, so each process compiles
    a model's fit program once (compiled programs are cached per Model object)."""
    return _MODELS.setdefault(job.model_key, job.model)


def _load_rows(model, rows) -> list:
    """``[(row, obs, packed, error)]``; any failure to read or pack a galaxy is its status."""
    out = []
    for row in rows:
        try:
            out.extend(_load_chunk(model, [row]))
        except Exception as exc:  # noqa: BLE001  (any unreadable input is one galaxy's problem)
            out.append((row, None, None, input_error(f"galaxy {row.id}: cannot load: {type(exc).__name__}: {exc}")))
    return out


def _load_shard(model, rows) -> tuple:
    """``(inputs fingerprint, loaded rows)``: the fingerprint is taken before reading."""
    inputs = _inputs_fingerprint(rows)
    return inputs, _load_rows(model, rows)


def _is_disk_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS


def _fail_message(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return fit_failed(msg if len(msg) <= 300 else msg[:299] + "…")


def _batches(packed: list, batch_size: int):
    """The groups :func:`galbayes.fitting._fit_packed` fits through ``batch_size`` slots
    each: the galaxies of one (image, PSF) shape bucket, in order of first appearance, a
    group smaller than ``batch_size`` joined to a larger bucket
    (:func:`galbayes.batching.bucket_groups`, the rule ``_fit_packed`` applies too)."""
    from .batching import bucket_groups

    for _, items in bucket_groups(packed, min_group=batch_size):
        yield items


def _fit_batch(model, items, job: ShardJob):
    """Fit one batch; if that raises, fit its galaxies one by one. Returns (fitted, failed)."""
    try:
        return list(_fit_packed(model, items, job.options, job.batch_size, errors=job.errors,
                                streams=job.streams)), {}
    except Exception as exc:  # noqa: BLE001
        if len(items) == 1:
            return [], {items[0][0]: _fail_message(exc)}
        warnings.warn(f"fitting a batch of {len(items)} galaxies raised {type(exc).__name__}: {exc}; "
                      "fitting them one by one", RuntimeWarning, stacklevel=2)
    fitted, failed = [], {}
    for item in items:
        try:
            fitted.extend(_fit_packed(model, [item], job.options, job.batch_size, errors=job.errors,
                                      streams=job.streams))
        except Exception as exc:  # noqa: BLE001
            failed[item[0]] = _fail_message(exc)
    return fitted, failed


def _fit_shard(model, job: ShardJob, rows: list, loaded: list, deferred: list | None = None):
    """Result rows of one shard (in row order) as a table; writes the image blocks (or, given
    a list ``deferred``, appends the block writes to it as calls for a writer thread)."""
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
        for f in fitted:
            results[obs_by_id[f.gid][0].index] = _input_notes(_result_row(model, f), obs_by_id[f.gid][1])
        if job.blocks and fitted:
            def write(fitted=fitted):
                try:
                    _write_blocks(model, fitted, results, obs_by_id, out_dir)
                except OSError as exc:
                    if _is_disk_error(exc):  # a full disk or read-only folder stops the run
                        raise
                    warnings.warn(f"image blocks of {[f.gid for f in fitted]} not written: "
                                  f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
                except Exception as exc:  # noqa: BLE001  (a block is a by-product; keep the fit)
                    warnings.warn(f"image blocks of {[f.gid for f in fitted]} not written: "
                                  f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
            if deferred is None:
                write()
            else:
                deferred.append(write)
    missing = [r.id for r in rows if r.index not in results]
    if missing:  # pragma: no cover  (every path above gives each galaxy a row)
        raise RuntimeError(f"no result for galaxies {missing[:5]}")
    errors_kw = {} if job.errors is None else {"errors": bool(job.errors)}
    return make_table(model, [results[r.index] for r in rows], **errors_kw)


def _finish_shard(model, job: ShardJob, k: int, rows: list, loaded: list, inputs: dict | None = None,
                  writer=None):
    """Fit shard ``k`` and write it (blocks, then the shard file); returns its manifest entry,
    or with a ``writer`` (an executor) a future of it: the writes run there while the
    caller fits the next shard."""
    deferred = None if writer is None else []
    table = _fit_shard(model, job, rows, loaded, deferred)

    def commit():
        for write in deferred or ():
            write()
        meta = {"GBRUN": job.run_id, "GBSHARD": k, "GBROW0": rows[0].index, "GBNROWS": len(rows)}
        sha = _write_shard(table, shard_path(job.out_dir, k), meta)
        n_ok = int(sum(1 for s in table["status"] if is_clean(s)))  # exactly "ok": unflagged, no notes
        return {"shard": k, "file": f"{SHARD_DIR}/{shard_path(job.out_dir, k).name}", "run_id": job.run_id,
                "rows": [rows[0].index, rows[-1].index + 1], "sha256": sha, "n_ok": n_ok,
                "inputs": inputs or {}, "written_ns": time.time_ns()}

    return commit() if writer is None else writer.submit(commit)


def run_shard(job: ShardJob, k: int, rows: list) -> dict:
    """Load, fit and write shard ``k`` (the Dask task; also usable by hand). Returns its
    manifest entry."""
    model = _worker_model(job)
    with use_devices(job.devices):
        inputs, loaded = _load_shard(model, rows)
        return _finish_shard(model, job, k, rows, loaded, inputs=inputs)


# ----------------------------------------------------------------------------- engines
def _run_local(job: ShardJob, model, todo: list, shard_rows, record, prefetch: bool, stop=None):
    """Fit the shards ``todo`` in order; after each committed shard, return early if
    ``stop()`` is true (a signal asked the run to stop)."""
    def load(k):
        rows = shard_rows(k)
        return (rows, *_load_shard(model, rows))

    if not todo:
        return
    # One writer thread: a shard's blocks and shard file are written (and then recorded, in
    # order, by this thread) while the next shard is fitted.
    with use_devices(job.devices), ThreadPoolExecutor(max_workers=1) as pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="galbayes-writer") as writer:
        future = pool.submit(load, todo[0]) if prefetch else None
        committing = None
        for i, k in enumerate(todo):
            if stop is not None and stop():
                if future is not None:
                    future.cancel()
                if committing is not None:
                    record(committing.result())
                return
            if prefetch:
                rows, inputs, loaded = future.result()
                if i + 1 < len(todo):  # the next shard's images load while this one is fitted
                    future = pool.submit(load, todo[i + 1])
            else:
                rows, inputs, loaded = load(k)
            done = _finish_shard(model, job, k, rows, loaded, inputs=inputs, writer=writer)
            if committing is not None:
                record(committing.result())
            committing = done
            del rows, loaded
        record(committing.result())


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
            raise OptionsError(f"--dask {spec!r}: need at least one worker")
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        return client, [client.close, cluster.close]
    client = Client(spec)
    return client, [client.close]


def _run_dask(job: ShardJob, todo: list, shard_rows, record, dask, retries: int, stop=None):
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
            if stop is not None and stop():  # shards in flight are not committed
                for f in list(futures):
                    f.cancel()
                return
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
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, ValueError, OverflowError):
        return False
    return True


def _describe_holder(info: dict | None) -> str:
    if not info:
        return "an unknown process (no holder record)"
    return (f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"
            + (f" ({info.get('command')})" if info.get("command") else ""))


class _Lock:
    """An exclusive lock on ``out_dir``: ``flock`` on ``.galbayes.lock`` (released by the OS
    when the process dies), which also holds the holder's record (pid, host, start time) so
    a refusal can name it. A record left behind by a process that is gone (it was killed)
    is reported as stale and taken over. Where ``flock`` is not supported (some network
    file systems) the lock is the exclusive creation of ``.galbayes.lock.pid``; a record of
    a dead pid on this host is then removed, one of another host must be removed by hand."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_NAME
        self.pid_path = out_dir / (LOCK_NAME + ".pid")
        self.fh = None
        self.excl = False

    @staticmethod
    def _record() -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "started_ns": time.time_ns(),
                "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:4]))[:200]}

    @staticmethod
    def _parse(text: str):
        try:
            info = json.loads(text)
            return info if isinstance(info, dict) else None
        except ValueError:
            return None

    def _refuse(self, info, how: str):
        raise ResumeError(f"{self.path.parent}: another galbayes run is writing into this folder: "
                          f"{_describe_holder(info)} (lock {how}); wait for it to end or choose another "
                          "output folder") from None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover  (not POSIX)
            return self._enter_excl()
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.seek(0)
            info = self._parse(fh.read())
            fh.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                self._refuse(info, str(self.path))
            return self._enter_excl()  # flock unsupported here (ENOLCK, EOPNOTSUPP, ...)
        fh.seek(0)
        old = self._parse(fh.read())
        if old:  # the lock is free, yet a holder record remains: that run did not end cleanly
            gone = "is gone" if old.get("host") != socket.gethostname() or not _pid_alive(int(old.get("pid", -1))) \
                else "holds no lock"
            warnings.warn(f"{self.path}: stale lock of {_describe_holder(old)}, which {gone}; taking it over",
                          RuntimeWarning, stacklevel=3)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(self._record()))
        fh.flush()
        self.fh = fh
        return self

    def _enter_excl(self):
        for _ in range(2):
            try:
                fd = os.open(self.pid_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    info = self._parse(self.pid_path.read_text())
                except OSError:
                    info = None
                if info and info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
                    warnings.warn(f"{self.pid_path}: stale lock of {_describe_holder(info)}, which is gone; "
                                  "taking it over", RuntimeWarning, stacklevel=3)
                    self.pid_path.unlink(missing_ok=True)
                    continue
                self._refuse(info, f"{self.pid_path}; if that run is gone, delete this file")
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self._record()))
            self.excl = True
            return self
        self._refuse(None, str(self.pid_path))

    def __exit__(self, *exc):
        if self.fh is not None:
            try:
                self.fh.seek(0)
                self.fh.truncate()  # a clean end leaves no holder record
            except OSError:
                pass
            self.fh.close()
            self.fh = None
        if self.excl:
            self.pid_path.unlink(missing_ok=True)
            self.excl = False
        return False


class _StopOnSignal:
    """SIGINT/SIGTERM ask the run to stop at the next shard boundary (``self()`` is then
    true); a second signal restores the previous handlers and stops at once
    (KeyboardInterrupt). Only installed in the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self.old = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:
            self._restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping now")
        self.signum = signum
        print(f"galbayes: {signal.Signals(signum).name} received: stopping after the shard being fitted "
              "(send it again to stop now)", file=sys.stderr, flush=True)

    def _restore(self):
        for sig, old in self.old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError, TypeError):
                pass
        self.old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                try:
                    self.old[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):
                    pass
        return self

    def __exit__(self, *exc):
        self._restore()
        return False


def _check_writable(out_dir: Path) -> None:
    """Refuse (:class:`OutputError`) an output folder that cannot be written, before any
    work: creates and removes a probe file in it (or in its nearest existing parent) and in
    its ``shards``/``blocks`` subfolders if they exist."""
    probe_dirs = []
    d = out_dir
    while not d.exists() and d != d.parent:
        d = d.parent
    probe_dirs.append(d)
    if d == out_dir:
        probe_dirs += [out_dir / n for n in (SHARD_DIR, "blocks", "covariance") if (out_dir / n).is_dir()]
    for folder in probe_dirs:
        if not folder.is_dir():
            raise OutputError(f"{out_dir}: cannot create the output folder: {folder} is not a folder")
        probe = folder / f".galbayes-probe-{os.getpid()}-{time.monotonic_ns()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            what = "the output folder" if folder == out_dir else (
                "its parent folder" if folder != out_dir and not str(folder).startswith(str(out_dir) + os.sep)
                else folder.name + "/")
            raise OutputError(f"{out_dir}: cannot write {what} {folder}: {exc.strerror or exc} "
                              "(read-only file system or no permission); choose another --out") from None


def _clear_run(out_dir: Path):
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    (out_dir / JOURNAL_NAME).unlink(missing_ok=True)
    shard_dir = out_dir / SHARD_DIR
    if shard_dir.is_dir():
        for p in shard_dir.iterdir():
            if re.fullmatch(r"\.?shard_\d+\.fits(\.tmp-.*)?", p.name):
                p.unlink()


def run_catalog(catalog, model, out_dir, *, options: MapOptions | None = None, batch_size: int = 64,
                shard_size: int | None = None, blocks: bool = True, progress: bool = True,
                resume: bool = False, dask=None, dask_retries: int = 3, prefetch: bool = True,
                devices=None, errors=None, return_table: bool = True, streams: int | None = None):
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
        Consecutive catalog rows per shard (default :func:`default_shard_size`: ``8 ×
        batch_size``, at least :data:`MIN_SHARD_ROWS` without ``dask``; a resumed run without
        ``shard_size`` keeps the one its manifest records).
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
    streams : int, optional
        Round drivers run at once per process (:func:`galbayes.inference.map.fit_map`;
        default its :func:`~galbayes.inference.map.default_streams` locally and 1 in each
        Dask worker, whose processes are the parallelism there). Not part of the run's
        fingerprint: the results depend on it only at float32 rounding. The count used is
        recorded in the manifest, and a resumed run without ``streams`` uses it again (same
        bytes as an uninterrupted run; another count gives the same fits, not the same bytes).

    Returns
    -------
    astropy.table.Table or None
    """
    options = options or MapOptions()
    if batch_size < 1:
        raise OptionsError(f"batch_size must be >= 1, got {batch_size}")
    if streams is not None:
        streams = check_streams(streams)
    if shard_size is None and resume:   # a resumed run keeps the layout it was started with
        shard_size = _recorded_shard_size(out_dir)
    shard_size = int(shard_size or default_shard_size(batch_size, dask=dask is not None))
    if shard_size < 1:
        raise OptionsError(f"shard_size must be >= 1, got {shard_size}")
    catalog = Path(catalog).resolve()
    out_dir = Path(out_dir).resolve()
    _check_writable(out_dir)  # a read-only folder is refused before the catalog is read
    cat = open_catalog(catalog, model=model)
    n_rows = cat.scan(shard_size)  # malformed catalogs stop here, before any fit
    n_shards = cat.n_shards()
    fp = run_fingerprint(catalog, model, options, batch_size=batch_size, shard_size=shard_size,
                         blocks=blocks, errors=errors, bound_columns=cat.bound_cols)
    run_id = _sha256_json(fp["hashes"])[:16]
    cat.check_unchanged()  # the fingerprint is of the catalog that was validated

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the output folder: {exc.strerror or exc}") from None
    manifest_path = out_dir / MANIFEST_NAME
    journal_path = out_dir / JOURNAL_NAME
    done: dict = {}
    with _Lock(out_dir), _StopOnSignal() as stop:
        try:
            old = _read_manifest_file(out_dir) if resume else None
            if old is not None:
                if old.get("galbayes_run") != _FORMAT:
                    raise ResumeError(f"cannot resume the run in {out_dir}: it was recorded by another galbayes "
                                      f"(run format {old.get('galbayes_run')}, this one writes {_FORMAT}). To start "
                                      "afresh run without --resume (resume=False), or use another output folder.")
                changes = _what_changed(old.get("fingerprint", {}), fp)
                if changes:
                    raise ResumeError(f"cannot resume the run in {out_dir}: " + "; ".join(changes)
                                      + ". To start afresh run without --resume (resume=False), or use another output folder.")
                done = _verify_finished(out_dir, cat, old, run_id, n_shards)
                _rewrite_journal(journal_path, done)  # drops damaged lines, ends on a newline
            else:
                _clear_run(out_dir)
            # streams: the count asked for, else the one the resumed run used, else the default
            # (a galaxy's fit depends on it at float32 rounding: same count, same bytes)
            if streams is None:
                streams = (old or {}).get("streams") or (1 if dask is not None else default_streams())
            manifest = {"galbayes_run": _FORMAT, "run_id": run_id, "fingerprint": fp, "n_rows": n_rows,
                        "shard_size": shard_size, "n_shards": n_shards, "complete": False,
                        "journal": JOURNAL_NAME, "streams": int(streams)}
            _write_json(manifest_path, manifest)

            bar = None
            if progress:
                from tqdm.auto import tqdm
                bar = tqdm(total=n_rows, initial=sum(cat.shard_len(k) for k in done), unit="gal", desc="fitting")

            def record(info):
                _append_journal(journal_path, info)
                done[int(info["shard"])] = info
                if bar is not None:
                    bar.update(info["rows"][1] - info["rows"][0])

            todo = [k for k in range(n_shards) if k not in done]
            job = ShardJob(model=model, model_key=fp["hashes"]["recipe"], options=options, batch_size=batch_size,
                           blocks=blocks, errors=errors, out_dir=str(out_dir), run_id=run_id, devices=devices,
                           streams=int(streams))
            try:
                if dask is None:
                    _run_local(job, model, todo, cat.shard, record, prefetch, stop)
                else:
                    _run_dask(job, todo, cat.shard, record, dask, dask_retries, stop)
            finally:
                if bar is not None:
                    bar.close()
            if stop():
                raise RunInterrupted(stop.signum, len(done), n_shards, out_dir)
            table = _assemble(out_dir, model, run_id, [(k, cat.shard_len(k)) for k in range(n_shards)],
                              errors, return_table)
            manifest["complete"] = True
            manifest["shards"] = {str(k): done[k] for k in sorted(done)}
            _write_json(manifest_path, manifest)
        except OSError as exc:
            if not _is_disk_error(exc):
                raise
            if exc.filename and not str(exc.filename).startswith(str(out_dir) + os.sep):
                raise CatalogError(f"cannot read {exc.filename}: {exc.strerror or exc}") from exc  # an input
            reason = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                      errno.EROFS: "the file system is read-only", errno.EFBIG: "file too large"}.get(
                          exc.errno, exc.strerror or "permission denied")
            raise OutputError(f"{out_dir}: {reason} while writing {exc.filename or 'the run files'}; nothing "
                              f"half-written was kept and {len(done)} of {n_shards} shards are committed: make "
                              "room and run again with --resume (resume=True) to finish") from exc
    return table


def _verify_finished(out_dir: Path, cat, old: dict, run_id: str, n_shards: int) -> dict:
    """The journal's shards that can be kept: the file is there with its recorded SHA-256
    and the shard's input files are unchanged. Everything else is fitted again (warned)."""
    entries, problems = _read_journal(out_dir, run_id)
    if problems:
        warnings.warn(f"{out_dir / JOURNAL_NAME}: {'; '.join(problems[:5])}"
                      f"{' …' if len(problems) > 5 else ''}: the shards these lines recorded (if any) are "
                      "fitted again", RuntimeWarning, stacklevel=3)
    done = {}
    for k, info in sorted(entries.items()):
        p = out_dir / info.get("file", "")
        expect = [k * cat.shard_size, k * cat.shard_size + (cat.shard_len(k) if 0 <= k < n_shards else 0)]
        if not (0 <= k < n_shards) or info.get("rows") != expect:
            warnings.warn(f"shard {k} of the journal does not fit this run's layout; ignoring it", RuntimeWarning,
                          stacklevel=3)
            continue
        if not p.is_file() or _file_sha256(p) != info.get("sha256"):
            warnings.warn(f"shard {k} (rows {expect[0] + 1}–{expect[1]}) of the recorded run is missing or changed "
                          f"on disk ({p}); fitting it again", RuntimeWarning, stacklevel=3)
            continue
        changed = _changed_inputs(cat.shard(k), info.get("inputs"), info.get("written_ns"))
        if changed is not None:
            which = f" ({', '.join(changed)})" if changed else ""
            warnings.warn(f"shard {k} (rows {expect[0] + 1}–{expect[1]}): its image/σ/PSF/mask files changed since "
                          f"it was fitted{which}; fitting it again", RuntimeWarning, stacklevel=3)
            continue
        done[k] = info
    return done
