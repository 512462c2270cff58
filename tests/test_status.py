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
