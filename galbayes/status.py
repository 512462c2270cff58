"""The per-galaxy ``status`` of a result row, and the error flags behind it, defined once.

Every result row (:func:`galbayes.fit`, :func:`galbayes.fit_catalog`) carries a ``status``
text. Its vocabulary, composed here and nowhere else:

``"ok"`` (:data:`OK`)
    A clean fit: finite parameters and χ², and (when error bars were asked for) an
    unflagged covariance.
``"ok; errors: <flag>"``
    A usable fit whose error estimate is flagged (e.g. ``"at prior bound: sersic_n"``, see
    :mod:`galbayes.inference.laplace`); the MAP values are fine, the error bars are not to
    be trusted blindly.
``"ok; <note>; ..."``
    A usable fit with remarks on its inputs (:attr:`galbayes.data.Observation.notes`, e.g.
    ``"sigma estimated from image (...)"``), appended by :func:`with_notes`.
``"fit failed: <reason>"``
    The fit ran but its result is unusable (:data:`NON_FINITE`), or it raised.
``"error: <reason>"``
    The galaxy could not be read or packed; it was not fitted.

So a status is *usable* (:func:`is_usable`: the MAP values can be used — sampled with NUTS,
drawn, compared) when it is ``"ok"`` or starts with ``"ok; "``, and *clean*
(:func:`is_clean`) when it is exactly ``"ok"``.

Error flags (``LaplaceResult.flags``, ``BootstrapResult.flags``) are :data:`OK` or the
problems joined by :data:`SEP` (:func:`join_problems`).
"""
from __future__ import annotations

__all__ = ["OK", "SEP", "ERRORS_PREFIX", "FIT_FAILED_PREFIX", "NON_FINITE", "INPUT_ERROR_PREFIX",
           "join_problems", "fit_status", "fit_failed", "input_error", "with_notes",
           "is_usable", "is_clean"]

#: A clean fit (and an error estimate without problems).
OK = "ok"
#: Separator of the parts of a status (and of the problems of an error flag).
SEP = "; "
#: Introduces the flag of a usable fit's error estimate: ``"ok; errors: <flag>"``.
ERRORS_PREFIX = "errors: "
#: Introduces the reason of a fit whose result is unusable or that raised.
FIT_FAILED_PREFIX = "fit failed: "
#: The status of a fit that ended on non-finite parameters or χ².
NON_FINITE = FIT_FAILED_PREFIX + "non-finite parameters or chi2"
#: Introduces the reason a galaxy could not be read or packed (it was not fitted).
INPUT_ERROR_PREFIX = "error: "


def _text(status) -> str:
    """A status cell as text: bytes decoded (FITS text columns), surrounding blanks removed
    (FITS pads text with spaces)."""
    if isinstance(status, bytes):
        status = status.decode("utf-8")
    return str(status).strip()


def join_problems(problems) -> str:
    """The flag of one galaxy's error estimate: :data:`OK`, or its problems joined by :data:`SEP`.

    Parameters
    ----------
    problems : sequence of str
        What went wrong (empty when nothing did).

    Returns
    -------
    str
    """
    problems = list(problems)
    return SEP.join(problems) if problems else OK


def fit_status(finite: bool, error_flag: str | None = None) -> str:
    """The status of a fitted galaxy.

    Parameters
    ----------
    finite : bool
        The fit ended on finite parameters and χ².
    error_flag : str, optional
        The flag of its error estimate (:func:`join_problems`), None when no errors were asked.

    Returns
    -------
    str
        :data:`NON_FINITE` if not ``finite``; else :data:`OK`, or ``"ok; errors: <flag>"``
        when the error flag is not :data:`OK`.
    """
    if not finite:
        return NON_FINITE
    if error_flag is None or error_flag == OK:
        return OK
    return f"{OK}{SEP}{ERRORS_PREFIX}{error_flag}"


def fit_failed(reason: str) -> str:
    """``"fit failed: <reason>"``: the status of a galaxy whose fit raised or is unusable."""
    return FIT_FAILED_PREFIX + str(reason)


def input_error(reason) -> str:
    """``"error: <reason>"``: the status of a galaxy that could not be read or packed."""
    return INPUT_ERROR_PREFIX + str(reason)


def with_notes(status: str, notes) -> str:
    """A usable status with remarks on the galaxy's inputs appended (``"ok; <note>; ..."``).

    Parameters
    ----------
    status : str
    notes : sequence of str or None
        E.g. :attr:`galbayes.data.Observation.notes`.

    Returns
    -------
    str
        ``status`` unchanged when there are no notes or it is not usable (a failure keeps its
        own reason), else ``status`` and the notes joined by :data:`SEP`.
    """
    if not notes or not is_usable(status):
        return status
    return SEP.join([status] + list(notes))


def is_usable(status) -> bool:
    """Whether a status is that of a usable fit: ``"ok"`` or ``"ok; ..."`` (a flagged error
    estimate, input notes).

    Parameters
    ----------
    status : str or bytes
        A ``status`` cell (bytes are decoded, surrounding blanks ignored).

    Returns
    -------
    bool
    """
    s = _text(status)
    return s == OK or s.startswith(OK + SEP)


def is_clean(status) -> bool:
    """Whether a status is exactly ``"ok"``: usable, error estimate unflagged, no input notes.

    Parameters
    ----------
    status : str or bytes
        A ``status`` cell (bytes are decoded, surrounding blanks ignored).

    Returns
    -------
    bool
    """
    return _text(status) == OK
