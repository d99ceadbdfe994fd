import math

import pytest

from lckv_stream import limits


@pytest.mark.parametrize("name, value, expected", [
    ("window", 1024, 1024), ("window", 1024.0, 1024), ("temperature", 1, 1), ("temperature", 0.25, 0.25),
    ("seed", 2**63 - 1, 2**63 - 1), ("sink", 0, 0),
])
def test_values_in_range_come_back_as_the_setting_takes_them(name, value, expected):
    checked = limits.check(name, value)
    assert checked == expected and type(checked) is type(expected)


@pytest.mark.parametrize("name, value, message", [
    ("window", "abc", "window must be a whole number between 16 and 8192, got 'abc'"),
    ("window", None, "window must be a whole number between 16 and 8192, got None"),
    ("window", True, "window must be a whole number between 16 and 8192, got True"),
    ("window", 15, "window must be between 16 and 8192, got 15"),
    ("window", 16.5, "window must be a whole number, got 16.5"),
    ("temperature", math.nan, "temperature must be between 0 and 2, got nan"),
    ("temperature", [1], "temperature must be a number between 0 and 2, got [1]"),
    ("seed", -1, "seed must be between 0 and 9223372036854775807, got -1"),
    ("top_p", "\ud800" * 50, "top_p must be a number between 0.05 and 1, got '\\ud800\\ud800\\ud800"),
])
def test_bad_values_are_named_with_their_range(name, value, message):
    with pytest.raises(ValueError) as refused:
        limits.check(name, value)
    assert str(refused.value).startswith(message)
    str(refused.value).encode("utf-8")  # printable and encodable, whatever the value was


def test_command_line_values_are_parsed_then_checked():
    assert limits.parse("window", "512") == 512 and limits.parse("temperature", "0.5") == 0.5
    with pytest.raises(ValueError, match="got '1.5'"):
        limits.parse("window", "1.5")
    with pytest.raises(ValueError, match="between 16 and 8192, got 8"):
        limits.parse("window", "8")


def test_every_default_is_in_its_range():
    for name, default in limits.DEFAULTS.items():
        assert limits.check(name, default) == default
