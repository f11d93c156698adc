"""The settings declaration: what a closed choice or a numeric range derives (check and message), and the rules
between a group's settings, which validate() applies. Expected strings are written out by hand."""

from __future__ import annotations

import math

import pytest

from dist_marsm import settings
from dist_marsm.settings import Range, Setting


@pytest.mark.parametrize(
    "limits,wording,inside,outside",
    [
        (Range(), "a finite number >= 0", [0, 0.0, 7.5], [-1e-9, math.inf, math.nan, True, "1"]),
        (Range(0.0, 1.0), "a number in [0, 1)", [0.0, 0.999], [1.0, -0.1]),
        (Range(0.0, 1.0, high_closed=True), "a number in [0, 1]", [0.0, 1.0], [1.0001]),
        (Range(low_open=True), "a finite number > 0", [1e-12], [0.0, -1.0]),
        (Range(1, 99, high_closed=True, integer=True), "an int in [1, 99]", [1, 99], [0, 100, 5.0, True]),
    ],
)
def test_a_range_checks_what_its_message_says(limits, wording, inside, outside):
    assert str(limits) == wording
    assert all(limits(x) for x in inside), inside
    assert not any(limits(x) for x in outside), outside


def test_a_closed_choice_is_named_once():
    s = Setting("mode", "a", "which mode", choices=("a", "b", None))
    assert s.expect == "one of ('a', 'b', None)"
    assert s.valid("b") and s.valid(None) and not s.valid("c")
    flag = Setting("flag", True, "on or off", choices=(True, False))
    assert flag.expect == "True or False"
    assert flag.valid(False) and not flag.valid(1) and not flag.valid(0)  # bools are ints: matched by type too


def test_a_real_range_stores_floats_and_an_int_range_does_not():
    real = Setting("rate", 0.5, "a rate", valid=Range(0.0, 1.0))
    count = Setting("count", 3, "a count", valid=Range(1, integer=True))
    assert type(real.canonical(1)) is float and real.canonical("x") == "x"
    assert count.canonical is None


def test_a_setting_without_a_check_is_refused_where_declared():
    for incomplete in ({}, {"valid": lambda x: True}):  # a check without its wording too
        with pytest.raises(TypeError, match="setting odd: declare its choices, a Range, or a valid"):
            Setting("odd", 1, "no check", **incomplete)


def test_validate_applies_the_group_rules_naming_where():
    def group_of(**overrides):  # a whole group, as the optimizer holds one
        return {**settings.group_defaults(**overrides), "use_mars": True}

    group = group_of(variant="efficient", momentum=0.0)
    with pytest.raises(ValueError, match=r"^here: momentum must be > 0 for variant='efficient'"):
        settings.validate(group, "here")
    group = group_of(ns_steps=2, ns_coefficients=[(3.0, -4.0, 2.0)] * 3)
    with pytest.raises(ValueError, match=r"^there: ns_coefficients: .*3 triples given for 2 steps"):
        settings.validate(group, "there")
    settings.validate(group_of(ns_steps=3, ns_coefficients=[(3.0, -4.0, 2.0)] * 3), "fine")


def test_a_message_without_where_has_no_prefix():
    with pytest.raises(ValueError, match=r"^gamma must be a number in \[0, 1\], got 2\.0$"):
        settings.validate({"gamma": 2.0}, "", names={"gamma"})
