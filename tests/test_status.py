"""galbayes.status: the status vocabulary of result rows, its composition and its predicates."""
from __future__ import annotations

import numpy as np
import pytest

from galbayes import status as st


def test_strings_are_the_ones_written():
    # the exact texts result tables have always carried (files of earlier runs stay readable)
    assert st.OK == "ok"
    assert st.SEP == "; "
    assert st.NON_FINITE == "fit failed: non-finite parameters or chi2"
    assert st.fit_failed("ValueError: boom") == "fit failed: ValueError: boom"
    assert st.input_error("galaxy g1: image: not found") == "error: galaxy g1: image: not found"


def test_join_problems():
    assert st.join_problems([]) == "ok"
    assert st.join_problems(()) == "ok"
    assert st.join_problems(["at prior bound: sersic_n"]) == "at prior bound: sersic_n"
    assert st.join_problems(iter(["covariance not finite", "at prior bound: sersic_n"])) \
        == "covariance not finite; at prior bound: sersic_n"


def test_fit_status():
    assert st.fit_status(True) == "ok"
    assert st.fit_status(True, None) == "ok"
    assert st.fit_status(True, "ok") == "ok"
    assert st.fit_status(True, "at prior bound: sersic_n") == "ok; errors: at prior bound: sersic_n"
    assert st.fit_status(True, "covariance not finite; at prior bound: sersic_re") \
        == "ok; errors: covariance not finite; at prior bound: sersic_re"
    # a non-finite fit is failed whatever its error flag says
    for flag in (None, "ok", "covariance not finite"):
        assert st.fit_status(False, flag) == st.NON_FINITE
    assert st.fit_status(np.bool_(True), "ok") == "ok" and st.fit_status(np.bool_(False)) == st.NON_FINITE


def test_with_notes():
    note = "sigma estimated from image (MAD of the background)"
    assert st.with_notes("ok", [note]) == f"ok; {note}"
    assert st.with_notes("ok", [note, "second"]) == f"ok; {note}; second"
    assert st.with_notes("ok; errors: at prior bound: sersic_n", [note]) \
        == f"ok; errors: at prior bound: sersic_n; {note}"
    assert st.with_notes("ok", []) == "ok" and st.with_notes("ok", None) == "ok"
    # a failure keeps its own reason only
    assert st.with_notes(st.NON_FINITE, [note]) == st.NON_FINITE
    assert st.with_notes("error: galaxy g: bad psf", [note]) == "error: galaxy g: bad psf"


USABLE = ["ok", "ok; errors: at prior bound: sersic_n", "ok; sigma estimated from image (x)",
          "ok; errors: covariance not finite; sigma estimated from image (x)",
          st.fit_status(True, "bootstrap failed: fewer than 2 replicas converged")]
FAILED = [st.NON_FINITE, "fit failed: RuntimeError: x", "error: galaxy ok: cannot load", "",
          "not ok", "okay", "error: ok"]


@pytest.mark.parametrize("s", USABLE)
def test_usable(s):
    assert st.is_usable(s)
    assert st.is_clean(s) == (s == "ok")


@pytest.mark.parametrize("s", FAILED)
def test_not_usable(s):
    assert not st.is_usable(s) and not st.is_clean(s)


def test_predicates_read_table_cells():
    # FITS text columns: bytes, or str padded with blanks
    assert st.is_usable(b"ok") and st.is_clean(b"ok")
    assert st.is_usable(b"ok; errors: at prior bound: disk_q") and not st.is_clean(b"ok; errors: x")
    assert st.is_clean("ok  ") and st.is_usable("ok; errors: x  ")
    assert st.is_clean(np.str_("ok")) and st.is_clean(np.bytes_(b"ok"))
    assert st.is_usable("ok; errors: at prior bound: sersic_n".encode())
    assert not st.is_usable(b"fit failed: x")
    # composed statuses read back as what they are
    assert st.is_clean(st.fit_status(True, st.join_problems([])))
    flagged = st.fit_status(True, st.join_problems(["at prior bound: sersic_n"]))
    assert st.is_usable(flagged) and not st.is_clean(flagged)
    assert st.is_usable(st.with_notes("ok", ["n"])) and not st.is_clean(st.with_notes("ok", ["n"]))


# --------------------------------------------------------------------------- result rows
def _fitted(model, values, chi2, errors=None):
    """A FittedGalaxy of one packed 16×16 galaxy with the given fit values (no fitting)."""
    import galbayes as gb
    from galbayes.inference.map import MapResult
    from galbayes.fitting import FittedGalaxy

    obs = gb.Observation(image=np.zeros((16, 16)), sigma=np.ones((16, 16)), psf=np.ones((1, 1)))
    gal = model.pack(obs, None)
    batch = gb.Model.stack([gal])
    one = np.ones(1)
    res = MapResult(values=np.asarray([values], np.float64), chi2=np.asarray([chi2]), loglike=-0.5 * one * chi2,
                    n_iter=one.astype(int), converged=one.astype(bool), n_svi=one.astype(int), n_lm=one.astype(int))
    return FittedGalaxy("g0", gal, batch, 0, res, errors)


def test_result_rows_compose_the_status():
    import galbayes as gb
    from galbayes.fitting import ErrorEstimate, _input_notes, _result_row

    model = gb.load_recipe("sersic")
    v = np.asarray(_fitted(model, np.zeros(len(model.keys)), 0.0).gal.values0, np.float64)
    row = _result_row(model, _fitted(model, v, 250.0))
    assert row["status"] == "ok" and not any(k.endswith("_err") for k in row)
    assert row["chi2_red"] == pytest.approx(250.0 / (256 - model.n_free))
    bad = v.copy()
    bad[0] = np.nan
    assert _result_row(model, _fitted(model, bad, 250.0))["status"] == st.NON_FINITE
    assert _result_row(model, _fitted(model, v, np.inf))["status"] == st.NON_FINITE

    n, s = len(model.keys), model.n_free
    est = ErrorEstimate("laplace", np.full((1, n), 0.1), np.eye(s)[None], ["at prior bound: sersic_n"])
    row = _result_row(model, _fitted(model, v, 250.0, est))
    assert row["status"] == "ok; errors: at prior bound: sersic_n"
    assert {k + "_err" for k in model.keys} <= set(row) and row[model.keys[0] + "_err"] == 0.1
    clean = est._replace(flags=["ok"])
    assert _result_row(model, _fitted(model, v, 250.0, clean))["status"] == "ok"
    assert _result_row(model, _fitted(model, bad, 250.0, est))["status"] == st.NON_FINITE

    class Obs:
        notes = ["sigma estimated from image (x)"]

    assert _input_notes(dict(row), Obs())["status"] == "ok; errors: at prior bound: sersic_n; sigma estimated from image (x)"
    assert _input_notes({"id": "g", "status": st.NON_FINITE}, Obs())["status"] == st.NON_FINITE
    assert _input_notes({"id": "g", "status": "ok"}, gb.Observation(image=np.zeros((4, 4)), sigma=np.ones((4, 4)),
                                                                    psf=np.ones((1, 1))))["status"] == "ok"
