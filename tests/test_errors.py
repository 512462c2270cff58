"""The error hierarchy and how the command line reports it (architecture issue).

Every error galbayes raises on purpose derives from ``GalbayesError`` and from the builtin it
was before (``ValueError``), under its old import path too; ``galbayes`` prints such an error
as one line ``galbayes: error: <message>`` on stderr with exit status 2, and ``--debug``
(before or after the command) shows the traceback instead.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import galbayes
import galbayes.cli as cli
from galbayes import errors
from galbayes.errors import (CatalogError, GalbayesError, InputError, ModelError, OptionsError, OutputError,
                             ResumeError)

# (class, the builtin or package class it must still derive from)
HIERARCHY = [
    (InputError, ValueError),
    (ModelError, ValueError),
    (OptionsError, ValueError),
    (CatalogError, ValueError),
    (ResumeError, CatalogError),
    (OutputError, CatalogError),
]


@pytest.mark.parametrize("cls, builtin", HIERARCHY, ids=lambda c: c.__name__)
def test_every_error_derives_from_galbayes_error_and_its_builtin(cls, builtin):
    assert issubclass(cls, GalbayesError)
    assert issubclass(cls, builtin) and issubclass(cls, ValueError)
    with pytest.raises(ValueError, match="^the message$"):  # old `except ValueError` still catches it
        raise cls("the message")


def test_unknown_profile_is_a_model_error_and_a_key_error():
    from galbayes.profiles import UnknownProfileError, get_profile

    assert issubclass(UnknownProfileError, ModelError) and issubclass(UnknownProfileError, KeyError)
    with pytest.raises(GalbayesError, match="unknown profile 'no_such_profile'"):
        get_profile("no_such_profile")


def test_run_interrupted_is_a_signal_not_an_error():
    from galbayes.runner import RunInterrupted

    assert not issubclass(RunInterrupted, GalbayesError)
    assert not issubclass(RunInterrupted, ValueError)


def test_old_import_paths_give_the_same_class_objects():
    import galbayes.catalog
    import galbayes.runner

    assert galbayes.catalog.CatalogError is errors.CatalogError
    assert galbayes.runner.ResumeError is errors.ResumeError
    assert galbayes.runner.OutputError is errors.OutputError
    assert "CatalogError" in galbayes.catalog.__all__
    assert {"ResumeError", "OutputError"} <= set(galbayes.runner.__all__)
    for name in ("GalbayesError", "InputError", "ModelError", "OptionsError", "CatalogError"):
        assert getattr(galbayes, name) is getattr(errors, name)
        assert name in galbayes.__all__


def _raises(cls, message, fn, *args, **kw):
    """``fn(*args, **kw)`` raises exactly ``message`` as a ``cls`` (and so a GalbayesError)."""
    with pytest.raises(cls) as info:
        fn(*args, **kw)
    assert isinstance(info.value, GalbayesError) and isinstance(info.value, ValueError)
    assert str(info.value) == message


def test_bad_options_are_options_errors_with_their_old_messages():
    from galbayes.inference.map import OPTIMIZERS, MapOptions
    from galbayes.likelihood import LIKELIHOODS, check_likelihood
    from galbayes.pipeline import ERROR_METHODS, _error_method

    _raises(OptionsError, "iteration caps must be >= 0", MapOptions, max_iter=-1)
    _raises(OptionsError, "iteration caps must be >= 0", MapOptions, lm_iter=-2)
    _raises(OptionsError, "max_iter=0 with polish='none' would not fit anything", MapOptions, max_iter=0,
            polish="none")
    _raises(OptionsError, "polish must be 'lm' or 'none', got 'newton'", MapOptions, polish="newton")
    _raises(OptionsError, f"unknown optimizer 'lbfgs'; choose one of {sorted(OPTIMIZERS)}", MapOptions,
            optimizer="lbfgs")
    _raises(OptionsError, f"errors must be one of {ERROR_METHODS}, got 'hessian'", _error_method, "hessian")
    _raises(OptionsError, f"unknown likelihood 'poisson'; choose one of {LIKELIHOODS}", check_likelihood,
            "poisson")
    assert _error_method(None) == "none" and MapOptions().max_iter == 10  # good values still pass


def test_run_catalog_sizes_are_options_errors(tmp_path):
    from galbayes.recipe import load_recipe
    from galbayes.runner import run_catalog

    model = load_recipe("sersic")
    _raises(OptionsError, "batch_size must be >= 1, got 0", run_catalog, tmp_path / "none.csv", model,
            tmp_path / "o", batch_size=0)
    _raises(OptionsError, "shard_size must be >= 1, got -3", run_catalog, tmp_path / "none.csv", model,
            tmp_path / "o", batch_size=1, shard_size=-3)
    _raises(CatalogError, f"{(tmp_path / 'none.csv').resolve()}: catalog file not found", run_catalog,
            tmp_path / "none.csv", model, tmp_path / "o", batch_size=1)


def test_bad_model_settings_are_model_errors():
    from galbayes.params import Param, as_param

    _raises(ModelError, "bounds (2.0, 1.0): low must be < high", Param, bounds=(2.0, 1.0))
    _raises(ModelError, "unknown parameter setting(s) ['bound']; known: ['bounds', 'fixed', 'init', 'log', "
            "'prior']", as_param, {"bound": [0, 1]})


def test_bad_device_count_is_an_options_error():
    import jax

    from galbayes.devices import use_devices

    n = len(jax.devices())
    with pytest.raises(OptionsError, match=f"^asked for {n + 1} devices; JAX sees {n}$"):
        with use_devices(n + 1):
            pass


# ---- the command line ----------------------------------------------------------------------

def _fit_args(tmp_path, *extra):
    return ["fit", str(tmp_path / "missing.csv"), "--model", "sersic", "--out", str(tmp_path / "o"), *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("galbayes: error: ") and "Traceback" not in err
    return lines[0][len("galbayes: error: "):]


def test_cli_missing_catalog_is_one_line_exit_2(tmp_path, capsys):
    rc = cli.main(_fit_args(tmp_path))
    assert rc == 2
    assert _one_error_line(capsys) == f"{(tmp_path / 'missing.csv').resolve()}: catalog file not found"
    assert not (tmp_path / "o" / "results.fits").exists()


@pytest.mark.parametrize("extra, message", [
    (["--max-iter", "-1"], "iteration caps must be >= 0"),
    (["--max-iter", "0", "--polish", "none"], "max_iter=0 with polish='none' would not fit anything"),
    (["--batch-size", "-1"], "batch_size must be >= 1, got -1"),
    (["--shard-size", "-1"], "shard_size must be >= 1, got -1"),
])
def test_cli_bad_option_is_one_line_exit_2(tmp_path, capsys, extra, message):
    rc = cli.main(_fit_args(tmp_path, *extra))
    assert rc == 2
    assert _one_error_line(capsys) == message


@pytest.mark.parametrize("where", ["before", "after"])
def test_cli_debug_reraises(tmp_path, capsys, where):
    argv = ["--debug", *_fit_args(tmp_path)] if where == "before" else _fit_args(tmp_path, "--debug")
    with pytest.raises(CatalogError, match="catalog file not found"):
        cli.main(argv)
    assert "galbayes: error" not in capsys.readouterr().err
    with pytest.raises(OptionsError, match="iteration caps must be >= 0"):
        cli.main(["--debug", *_fit_args(tmp_path, "--max-iter", "-1")])


def test_cli_debug_flag_parses_before_and_after_the_command():
    parse = cli.build_parser().parse_args
    assert parse(["recipes"]).debug is False
    assert parse(["--debug", "recipes"]).debug is True
    assert parse(["recipes", "--debug"]).debug is True
    assert parse(["--debug", "sample", "run", "--ids", "a"]).debug is True  # not reset by the subcommand


def test_cli_multi_line_message_is_printed_on_one_line(monkeypatch, capsys):
    def broken(args):
        raise ModelError("first line\nsecond line")

    monkeypatch.setattr(cli, "cmd_recipes", broken)
    assert cli.main(["recipes"]) == 2
    assert _one_error_line(capsys) == "first line second line"


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), ValueError("not a galbayes error")])
def test_cli_other_exceptions_keep_their_traceback(monkeypatch, exc):
    def broken(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_recipes", broken)
    with pytest.raises(type(exc), match=str(exc)):
        cli.main(["recipes"])


def _run_cli(tmp_path, *argv):
    """``python -m galbayes ARGV`` in a child process importing this checkout's galbayes."""
    root = str(Path(galbayes.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "galbayes", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_subprocess_error_line_and_debug_traceback(tmp_path):
    argv = ["fit", "missing.csv", "--model", "sersic", "--out", "o"]
    plain = _run_cli(tmp_path, *argv)
    assert plain.returncode == 2, plain.stderr
    expected = f"galbayes: error: {(tmp_path / 'missing.csv').resolve()}: catalog file not found"
    assert plain.stderr.splitlines() == [expected]

    debug = _run_cli(tmp_path, "--debug", *argv)
    assert debug.returncode == 1, debug.stderr
    assert debug.stderr.startswith("Traceback (most recent call last):")
    assert debug.stderr.splitlines()[-1] == (f"galbayes.errors.CatalogError: {(tmp_path / 'missing.csv').resolve()}: "
                                             "catalog file not found")
    assert "galbayes: error" not in debug.stderr
