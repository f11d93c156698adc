"""The public constructor is the settings declaration: the arguments ``inspect.signature(MARSM)`` shows
come from the ``def`` and equal, in name, order and default, the declared constructor settings."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import dist_marsm
from dist_marsm import MARSM, settings


def test_signature_is_the_declaration():
    parameters = list(inspect.signature(MARSM).parameters.values())
    assert parameters[0].name == "params" and parameters[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    declared = [(s.name, s.default) for s in settings.SETTINGS if s.argument]
    given = [(p.name, p.default) for p in parameters[1:]]
    assert given == declared
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters[1:])


def test_no_signature_is_patched():
    package = Path(dist_marsm.__file__).parent
    offenders = [str(f) for f in package.rglob("*.py") if "__signature__" in f.read_text()]
    assert offenders == []


def test_unknown_argument_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="gama"):
        MARSM([], gama=0.1)
