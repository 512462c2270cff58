"""The top-level API and the error hierarchy (issue 13): every documented entry point is
importable from ``galbayes`` itself, and every error the package raises on purpose derives
from ``GalbayesError`` (and still from ``ValueError`` where it did)."""
from __future__ import annotations

import importlib

import pytest

import galbayes as gb

TOP_LEVEL = {
    "fit": "galbayes.pipeline", "fit_catalog": "galbayes.pipeline", "load_recipe": "galbayes.recipe",
    "read_catalog": "galbayes.catalog", "Observation": "galbayes.data", "Model": "galbayes.model",
    "Component": "galbayes.model", "Param": "galbayes.params", "ParamSpec": "galbayes.params",
    "profile": "galbayes.profiles", "fit_map": "galbayes.inference.map", "MapOptions": "galbayes.inference.map",
    "laplace_errors": "galbayes.inference.laplace", "bootstrap_errors": "galbayes.inference.bootstrap",
    "run_nuts": "galbayes.inference.nuts",
}


@pytest.mark.parametrize("name, module", sorted(TOP_LEVEL.items()))
def test_top_level_name_is_the_module_object(name, module):
    assert getattr(gb, name) is getattr(importlib.import_module(module), name)
    assert name in gb.__all__ and name in dir(gb)


def test_unknown_top_level_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        gb.no_such_thing  # noqa: B018


def test_package_errors_share_one_base():
    from galbayes.errors import GalbayesError, InputError, ModelError

    for cls in (InputError, ModelError):
        assert issubclass(cls, GalbayesError) and issubclass(cls, ValueError)
    with pytest.raises(GalbayesError, match="galaxy g7: sigma: bad"):
        raise InputError("bad", galaxy="g7", what="sigma")
    with pytest.raises(GalbayesError):
        gb.Model([])
