"""The helpers every adapter uses: driver import, one-line errors, the call budget."""

from __future__ import annotations

import os
import sqlite3
import sys

import pytest

import quiesce
from quiesce import MissingDriverError, Target, TargetError, import_driver, one_line, translated
from quiesce.phases import hard_limit


def test_a_missing_driver_is_one_line_naming_the_extra_and_this_pip():
    with pytest.raises(MissingDriverError) as e:
        import_driver("quiesce_no_such_driver", "widget")
    pip = os.path.join(os.path.dirname(sys.executable), "pip")
    assert str(e.value) == ("the Python module 'quiesce_no_such_driver' is not installed; "
                            f"install it with: {pip} install 'quiesce[widget]'")
    assert import_driver("sqlite3", "sqlite") is sqlite3
    with pytest.raises(MissingDriverError):  # a missing submodule counts too
        import_driver("sqlite3", "sqlite", "no_such_part")


def test_driver_errors_become_one_line_and_ours_pass_through():
    assert one_line(ValueError("first line\n  DETAIL:  second")) == "first line DETAIL: second"
    assert one_line(TimeoutError()) == "TimeoutError"
    with pytest.raises(TargetError) as e:
        with translated(sqlite3.Error, "cannot open /x", advice="; check path"):
            sqlite3.connect(":memory:").execute("SELECT * FROM missing")
    assert str(e.value) == "cannot open /x: no such table: missing; check path"
    assert isinstance(e.value.__cause__, sqlite3.Error)
    mine = quiesce.HoldBroken("the lock was lost")
    with pytest.raises(quiesce.HoldBroken) as e:
        with translated(Exception, "thaw failed"):
            raise mine
    assert e.value is mine
    with pytest.raises(KeyError):  # not a driver error: not ours to word
        with translated(sqlite3.Error, "x"):
            raise KeyError("k")


def test_the_call_budget_lives_on_the_target():
    fast, slow = Target("a", "sqlite", timeout=1), Target("b", "sqlite", timeout=10)
    assert (fast.call_budget, fast.call_limit) == (4, 9)
    assert hard_limit(slow) == slow.call_limit == 45
    assert Target.longest_call([fast, slow]) == 45 and Target.longest_call([]) == 0
