"""Faults at survey scale (issue 15): a full disk, SIGTERM/SIGINT, a read-only output folder,
two runs on one folder, input files changed after a shard was written, a damaged manifest,
journal or shard; and bad catalog rows that must become a row's status, not a crash.

Every test checks that nothing is half-written, no row is lost or silently reused, and that
``resume`` completes the run with results identical to an uninterrupted one. Same tiny
stamps, model and iteration budget as tests/test_runner.py (its fit programs are reused).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import galbayes.runner as runner
from galbayes.cli import main
from galbayes.runner import OutputError, ResumeError

sys.path.insert(0, str(Path(__file__).parent))
from test_runner import BATCH, FIT, MODEL_TOML, Counter, good_row, model, run, same_files, write_catalog  # noqa: E402

N_ROWS = 20  # shards of 8, 8, 4


def leftovers(out: Path) -> list:
    """Temporary files of interrupted writes (there must be none)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".tmp-" in p.name)


def committed(out: Path) -> set:
    return {int(k) for k in runner.read_manifest(out)["shards"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the N_ROWS catalog, with blocks: (folder, out)."""
    folder = tmp_path_factory.mktemp("ref")
    cat = write_catalog(folder, N_ROWS)
    run(cat, folder / "out", blocks=True)
    return folder, folder / "out"


def same_blocks(a: Path, b: Path):
    names = sorted(p.name for p in (a / "blocks").glob("*.fits"))
    assert names == sorted(p.name for p in (b / "blocks").glob("*.fits")) and len(names) == N_ROWS
    for n in names:
        with fits.open(a / "blocks" / n) as x, fits.open(b / "blocks" / n) as y:
            for hx, hy in zip(x, y):
                assert np.array_equal(hx.data, hy.data, equal_nan=True) if hx.data is not None else hy.data is None


# --------------------------------------------------------------------------- disk full
class DiskFull:
    """``os.fsync`` (what :func:`galbayes.results.atomic_write` and the journal call after
    writing) raises ENOSPC for the ``nth`` file under ``out/<where>`` — a full disk with
    delayed allocation reports it there."""

    def __init__(self, monkeypatch, out: Path, where: str, nth: int):
        self.real, self.calls, self.hit = os.fsync, 0, None
        target = str(out / where)

        def fsync(fd):
            try:
                name = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                name = ""
            if name.startswith(target) and not os.path.isdir(name):
                self.calls += 1
                if self.calls >= nth and self.hit is None:
                    self.hit = name
                    raise OSError(errno.ENOSPC, "No space left on device")
            return self.real(fd)

        monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("where, nth", [("shards/", 2), ("blocks/", 11), ("manifest.jsonl", 2), (".results.fits.tmp", 1)])
def test_disk_full_then_resume(tmp_path, monkeypatch, reference, where, nth):
    cat = write_catalog(tmp_path, N_ROWS)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        full = DiskFull(m, out, where, nth)
        with pytest.raises(OutputError, match="no space left on the device while writing") as exc:
            run(cat, out, blocks=True)
    msg = str(exc.value)
    assert full.hit is not None and "--resume" in msg
    assert leftovers(out) == []  # no temporary file left behind
    assert not (out / "results.fits").exists() and not (out / "results.csv").exists()
    done = committed(out)
    if where == "shards/":  # the second shard file failed: shard 0 committed, shard 1 not written
        assert done == {0} and not (out / "shards" / "shard_00001.fits").exists()
        assert "shard_00001.fits" in msg
    elif where == "blocks/":  # the 11th block is in shard 1 (8 per shard)
        assert done == {0}
    elif where == "manifest.jsonl":  # shard 1's file is written but its commit failed
        assert done == {0} and (out / "shards" / "shard_00001.fits").exists()
    else:
        assert done == {0, 1, 2}
    lines = (out / "manifest.jsonl").read_bytes()
    assert lines.endswith(b"\n") and lines.count(b"\n") == len(done)  # a failed commit left no line

    counter = Counter(monkeypatch)  # space freed: resume fits only what is missing
    table = run(cat, out, blocks=True, resume=True)
    assert sorted(counter.shards) == sorted({0, 1, 2} - done)
    assert list(table["id"]) == [good_row(j)["id"] for j in range(N_ROWS)] and set(table["status"]) == {"ok"}
    same_files(out, reference[1])
    same_blocks(out, reference[1])
    assert leftovers(out) == []


def test_disk_full_reported_by_astropy_without_errno(tmp_path, monkeypatch, reference):
    """astropy turns ENOSPC into ``OSError("Not enough space on disk: ...")`` (no errno; seen
    on a real full tmpfs): still a full disk, not a block silently skipped."""
    from astropy.io import fits as afits

    cat = write_catalog(tmp_path, N_ROWS)
    out = tmp_path / "out"
    real, calls = afits.HDUList.writeto, []

    def writeto(self, name, *a, **k):
        if "blocks" in str(name):
            calls.append(name)
            if len(calls) == 12:
                Path(name).write_bytes(b"SIMPLE  =                    T" + b" " * 100)  # a partial file
                raise OSError("Not enough space on disk: requested 31680, available 0. 31680 requested and 0 written")
        return real(self, name, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(afits.HDUList, "writeto", writeto)
        with pytest.raises(OutputError, match=r"no space left on the device while writing .*blocks/g00011\.fits"):
            run(cat, out, blocks=True)
    assert committed(out) == {0} and leftovers(out) == []
    run(cat, out, blocks=True, resume=True)
    same_files(out, reference[1])
    same_blocks(out, reference[1])


def test_disk_full_cli_exit_code(tmp_path, monkeypatch, capsys):
    cat = write_catalog(tmp_path, 8)
    (tmp_path / "gauss.toml").write_text(MODEL_TOML)
    out = tmp_path / "out"
    DiskFull(monkeypatch, out, "shards/", 1)
    rc = main(["fit", str(cat), "--model", str(tmp_path / "gauss.toml"), "--out", str(out), "--batch-size",
               str(BATCH), "--shard-size", "8", "--max-iter", str(FIT["max_iter"]), "--lm-iter",
               str(FIT["lm_iter"]), "--no-blocks", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert err.startswith("galbayes: error: ") and "no space left" in err and "shard_00000.fits" in err


# --------------------------------------------------------------------------- signals
def _hook_dir(tmp_path: Path) -> Path:
    """A ``sitecustomize`` that slows each shard down by 0.3 s (after its commit), so that a
    signal lands while the run is going on. Nothing else of ``python -m galbayes`` changes."""
    d = tmp_path / "hook"
    d.mkdir()
    (d / "sitecustomize.py").write_text(textwrap.dedent("""
        import time
        import galbayes.runner as R
        _orig = R._run_local
        def _slow_local(job, model, todo, shard_rows, record, prefetch, stop=None):
            def rec(info):
                record(info)
                time.sleep(0.3)
            return _orig(job, model, todo, shard_rows, rec, prefetch, stop)
        R._run_local = _slow_local
    """))
    return d


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_at_a_shard_boundary_and_resume_completes(tmp_path, monkeypatch, sig):
    n_rows = 96
    cat = write_catalog(tmp_path, n_rows)
    (tmp_path / "gauss.toml").write_text(MODEL_TOML)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_hook_dir(tmp_path))] + sys.path))
    import jax

    if jax.config.jax_compilation_cache_dir:  # reuse this session's compiled programs
        env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    cmd = [sys.executable, "-m", "galbayes", "fit", str(cat), "--model", str(tmp_path / "gauss.toml"),
           "--out", str(out), "--batch-size", str(BATCH), "--shard-size", "8", "--max-iter", str(FIT["max_iter"]),
           "--lm-iter", str(FIT["lm_iter"]), "--no-blocks", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not list((out / "shards").glob("shard_*.fits")):
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before the signal: {proc.communicate()}"
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err.decode()
    assert proc.returncode == runner.EXIT_INTERRUPTED == 75, err
    name = signal.Signals(sig).name
    assert f"{name} received: stopping after the shard being fitted" in err
    assert f"interrupted by {name}" in err and "--resume" in err and "Traceback" not in err
    done = committed(out)
    on_disk = {int(p.stem.split("_")[1]) for p in (out / "shards").glob("shard_*.fits")}
    assert done == on_disk and 1 <= len(done) < n_rows // 8  # every shard written is committed
    assert not (out / "results.fits").exists() and leftovers(out) == []
    assert (out / runner.LOCK_NAME).read_text() == ""  # released cleanly: no holder record

    counter = Counter(monkeypatch)
    table = run(cat, out, resume=True)
    assert sorted(counter.shards) == sorted(set(range(n_rows // 8)) - done)
    assert list(table["id"]) == [good_row(j)["id"] for j in range(n_rows)] and set(table["status"]) == {"ok"}
    run(cat, tmp_path / "reference")
    same_files(out, tmp_path / "reference")


def test_second_signal_stops_at_once_and_handlers_are_restored(capsys):
    before = signal.getsignal(signal.SIGTERM)
    with runner._StopOnSignal() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop() and stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGTERM) is before  # restored by the second signal
    assert signal.getsignal(signal.SIGTERM) is before
    assert "SIGTERM received" in capsys.readouterr().err


def test_cli_reports_a_stop_at_once(monkeypatch, capsys):
    import galbayes.cli as cli

    def stopped(args):
        raise KeyboardInterrupt("second SIGTERM: stopping now")

    monkeypatch.setattr(cli, "cmd_recipes", stopped)
    assert main(["recipes"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stopped at once (second SIGTERM: stopping now)" in err and "--resume" in err


# --------------------------------------------------------------------------- read-only folder
def _read_only(monkeypatch, folder: Path):
    """Make ``folder`` unwritable: chmod when not root; as root (who ignores permissions)
    the low-level ``os.open`` of a new file in it fails with EACCES, as chmod would."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    real = os.open

    def deny(path, flags, *a, **k):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and Path(path).parent == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", deny)


@pytest.mark.parametrize("which", ["out", "parent", "shards"])
def test_read_only_output_folder_refused_up_front(tmp_path, monkeypatch, capsys, which):
    cat = write_catalog(tmp_path, 4)
    out = tmp_path / "ro" / "out"
    if which == "parent":
        (tmp_path / "ro").mkdir()
        target = tmp_path / "ro"
    else:
        (out / "shards").mkdir(parents=True)
        target = out if which == "out" else out / "shards"

    def no_catalog(*a, **k):
        raise AssertionError("the catalog was read before the folder was checked")

    monkeypatch.setattr(runner, "open_catalog", no_catalog)
    _read_only(monkeypatch, target)
    try:
        with pytest.raises(OutputError, match=r"cannot write .*(read-only file system or no permission)") as exc:
            run(cat, out)
        assert str(target) in str(exc.value)
        (tmp_path / "gauss.toml").write_text(MODEL_TOML)
        rc = main(["fit", str(cat), "--model", str(tmp_path / "gauss.toml"), "--out", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.count("\n") == 0 and "cannot write" in err
    finally:
        target.chmod(0o755)
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == ["shards"]


# --------------------------------------------------------------------------- two runs, stale locks
def test_second_run_refused_naming_the_holder_and_stale_lock_taken_over(tmp_path):
    cat = write_catalog(tmp_path, 8)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        import galbayes.runner as R
        with R._Lock(Path({str(out)!r})):
            print("locked", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(ResumeError, match="another galbayes run") as exc:
            run(cat, out)
        msg = str(exc.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}, started 20" in msg, msg
        assert not (out / "manifest.json").exists()  # refused before writing anything
    finally:
        holder.kill()  # dies holding the lock: the OS releases it, its record stays
        holder.wait()
    assert json.loads((out / runner.LOCK_NAME).read_text())["pid"] == holder.pid
    with pytest.warns(RuntimeWarning, match=rf"stale lock of pid {holder.pid} .*which is gone; taking it over"):
        table = run(cat, out)
    assert len(table) == 8 and (out / runner.LOCK_NAME).read_text() == ""


def test_lock_without_flock_uses_a_pid_file(tmp_path, monkeypatch):
    """Where flock is not supported (ENOLCK on some network file systems)."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "out"
    out.mkdir()
    with runner._Lock(out):
        info = json.loads((out / (runner.LOCK_NAME + ".pid")).read_text())
        assert info["pid"] == os.getpid()
        with pytest.raises(ResumeError, match=rf"pid {os.getpid()} on host .*delete this file"):
            runner._Lock(out).__enter__()
    assert not (out / (runner.LOCK_NAME + ".pid")).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (out / (runner.LOCK_NAME + ".pid")).write_text(json.dumps(
        {"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+0000"}))
    with pytest.warns(RuntimeWarning, match=f"stale lock of pid {pid}"):
        with runner._Lock(out):
            assert json.loads((out / (runner.LOCK_NAME + ".pid")).read_text())["pid"] == os.getpid()
    # a holder on another host cannot be checked: refused, naming it
    (out / (runner.LOCK_NAME + ".pid")).write_text(json.dumps(
        {"pid": pid, "host": "elsewhere", "started": "2026-01-01T00:00:00+0000"}))
    with pytest.raises(ResumeError, match=f"pid {pid} on host elsewhere"):
        runner._Lock(out).__enter__()


# --------------------------------------------------------------------------- changed inputs
def _own_files(folder: Path, j: int):
    """Row ``j`` gets its own copies of image, σ and PSF: ``own_img.fits`` ..."""
    for src, dst in (("img0.fits", "own_img.fits"), ("sig0.fits", "own_sig.fits"), ("psf.fits", "own_psf.fits")):
        (folder / dst).write_bytes((folder / src).read_bytes())
    return {**good_row(j), "image": "own_img.fits", "sigma": "own_sig.fits", "psf": "own_psf.fits"}


@pytest.mark.parametrize("what", ["image", "sigma", "psf"])
def test_changed_input_file_refits_its_shard(tmp_path, monkeypatch, what):
    write_catalog(tmp_path, 0)
    rows = [good_row(j) for j in range(N_ROWS)]
    rows[10] = _own_files(tmp_path, 10)  # shard 1
    cat = write_catalog(tmp_path, rows)
    out = tmp_path / "out"
    before = run(cat, out)
    counter = Counter(monkeypatch)

    path = tmp_path / rows[10][what]
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes: kept
    run(cat, out, resume=True)
    assert counter.shards == []

    data = fits.getdata(path).astype(np.float32)
    data = {"image": data + 0.3, "sigma": data * 2.0, "psf": np.roll(data, 1, axis=1)}[what]
    fits.writeto(path, data, overwrite=True)
    with pytest.warns(RuntimeWarning, match=rf"shard 1 \(rows 9–16\): its image/σ/PSF/mask files changed .*{path.name}"):
        after = run(cat, out, resume=True)
    assert counter.shards == [1]  # only the shard that read the file
    fresh = run(cat, tmp_path / "fresh")
    same_files(out, tmp_path / "fresh")  # as if fitted on the new files from the start
    assert after["chi2"][10] != before["chi2"][10]
    keep = [j for j in range(N_ROWS) if not 8 <= j < 16]
    assert np.array_equal(np.asarray(after["chi2"])[keep], np.asarray(before["chi2"])[keep])
    assert np.array_equal(np.asarray(after["chi2"]), np.asarray(fresh["chi2"]))


def test_missing_input_that_appears_refits_its_shard(tmp_path, monkeypatch):
    write_catalog(tmp_path, 0)
    rows = [good_row(j) for j in range(N_ROWS)]
    rows[17] = {**good_row(17), "image": "later.fits"}  # shard 2
    cat = write_catalog(tmp_path, rows)
    out = tmp_path / "out"
    first = run(cat, out)
    assert "file not found" in first["status"][17]
    (tmp_path / "later.fits").write_bytes((tmp_path / "img1.fits").read_bytes())
    counter = Counter(monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"shard 2 .*later.fits \(|shard 2 .*later.fits"):
        again = run(cat, out, resume=True)
    assert counter.shards == [2] and again["status"][17] == "ok"


# --------------------------------------------------------------------------- damaged run files
def test_corrupt_manifest_is_a_clear_error(tmp_path):
    cat = write_catalog(tmp_path, 8)
    out = tmp_path / "out"
    run(cat, out)
    text = (out / "manifest.json").read_text()
    for bad in (text[: len(text) // 2], "", "[1, 2]"):
        (out / "manifest.json").write_text(bad)
        with pytest.raises(ResumeError, match="cannot read the run manifest"):
            run(cat, out, resume=True)
    rc = main(["fit", str(cat), "--model", str(tmp_path / "g.toml"), "--out", str(out), "--resume", "--quiet"]) \
        if (tmp_path / "g.toml").write_text(MODEL_TOML) else None
    assert rc == 2
    run(cat, out)  # without resume: started afresh
    assert runner.read_manifest(out)["complete"]


@pytest.mark.parametrize("damage", ["journal_truncated", "journal_line_changed", "shard_truncated",
                                    "shard_bitflip", "shard_of_other_layout"])
def test_damaged_journal_or_shard_is_refitted_never_reused(tmp_path, monkeypatch, reference, damage):
    cat = write_catalog(tmp_path, N_ROWS)
    out = tmp_path / "out"
    run(cat, out, blocks=True)
    (out / "results.fits").unlink()
    journal = out / "manifest.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    shard1 = out / "shards" / "shard_00001.fits"
    if damage == "journal_truncated":  # a commit cut short: last line without its end
        lines.sort(key=lambda ln: json.loads(ln)["shard"])
        journal.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
        expect, word = [2], "truncated"
    elif damage == "journal_line_changed":  # valid JSON, wrong checksum
        k = json.loads(lines[0])["shard"]
        entry = json.loads(lines[0])
        entry["n_ok"] -= 1
        lines[0] = (json.dumps(entry, sort_keys=True) + "\n").encode()
        journal.write_bytes(b"".join(lines))
        expect, word = [k], "damaged"
    elif damage == "shard_truncated":
        shard1.write_bytes(shard1.read_bytes()[:5000])
        expect, word = [1], "shard 1 .* missing or changed"
    elif damage == "shard_bitflip":
        b = bytearray(shard1.read_bytes())
        b[-100] ^= 0x01  # one bit of the data: still a valid FITS file
        shard1.write_bytes(bytes(b))
        expect, word = [1], "shard 1 .* missing or changed"
    else:  # a journal line whose rows do not match this run's shard layout
        entry = json.loads(lines[1])
        entry["rows"] = [0, 3]
        entry["check"] = runner._entry_check(entry)
        lines[1] = (json.dumps(entry, sort_keys=True) + "\n").encode()
        journal.write_bytes(b"".join(lines))
        expect, word = [entry["shard"]], "does not fit this run's layout"
    counter = Counter(monkeypatch)
    with pytest.warns(RuntimeWarning, match=word):
        table = run(cat, out, blocks=True, resume=True)
    assert counter.shards == expect
    assert len(table) == N_ROWS and set(table["status"]) == {"ok"}
    same_files(out, reference[1])
    assert journal.read_bytes().count(b"\n") == 3  # the damaged line was replaced, not kept


# --------------------------------------------------------------------------- bad rows at run time
def test_out_of_bounds_init_and_bad_sigma_become_statuses(tmp_path):
    """Initial values outside their bounds and σ ≤ 0 / NaN inside the fitted pixels are one
    galaxy's status naming it; the run goes on and the other galaxies fit."""
    write_catalog(tmp_path, 0)
    sig = fits.getdata(tmp_path / "sig0.fits").astype(np.float64)
    neg, nan, masked_bad = sig.copy(), sig.copy(), sig.copy()
    neg[4, 5] = -0.05
    nan[6, 7] = np.nan
    masked_bad[0, 0] = -1.0
    fits.writeto(tmp_path / "sig_neg.fits", neg)
    fits.writeto(tmp_path / "sig_nan.fits", nan)
    fits.writeto(tmp_path / "sig_masked_bad.fits", masked_bad)
    mask = np.zeros(sig.shape, np.int16)
    mask[0, 0] = 1
    fits.writeto(tmp_path / "mask00.fits", mask)
    bad = {
        "q_above_1": ({"g_q": 1.5}, ["g_q", "outside its bounds", "1.5"]),
        "fwhm_negative": ({"g_fwhm": -3.0}, ["g_fwhm", "outside its bounds"]),
        "xc_off_image": ({"g_xc": 500.0}, ["g_xc", "outside"]),
        "mag_inf": ({"g_mag": "inf"}, ["g_mag"]),
        "sigma_negative": ({"sigma": "sig_neg.fits"}, ["sigma", "σ ≤ 0 or NaN/inf", "(4, 5)"]),
        "sigma_nan": ({"sigma": "sig_nan.fits"}, ["sigma", "σ ≤ 0 or NaN/inf", "(6, 7)"]),
    }
    rows = []
    for j in range(6):
        rows.append(good_row(j))
        gid = list(bad)[j]
        rows.append({**good_row(j, gid), **bad[gid][0]})
    rows.append({**good_row(7, "bad_sigma_but_masked"), "sigma": "sig_masked_bad.fits", "mask": "mask00.fits"})
    cat = write_catalog(tmp_path, rows)
    table = run(cat, tmp_path / "out", shard_size=16)  # one shard: batches of 8, the compiled shape
    assert list(table["id"]) == [r["id"] for r in rows]
    status = dict(zip(table["id"], table["status"]))
    for gid, (_, words) in bad.items():
        s = status[gid]
        assert s.startswith(f"error: galaxy {gid}: "), s
        for w in words:
            assert w in s, (gid, s)
    assert all(status[r["id"]] == "ok" for r in rows if r["id"] not in bad), status
