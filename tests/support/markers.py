"""The markers that say what a test needs, kept true by the fixtures that need them.

``root`` (loop devices, fsfreeze, other users), ``server`` (starts a database server or
an agent) and ``slow`` (over about 10 s) are registered in pyproject.toml, so that
``pytest -m "not slow and not server"`` is a quick loop. A fixture that needs root or
starts a server calls :func:`require`: a test that uses it without the marker fails at
setup, naming the marker to add, instead of slipping into the quick loop.
"""

from __future__ import annotations

import pytest


def require(request: pytest.FixtureRequest, marker: str) -> None:
    """Fail the test that requested this fixture unless it carries *marker*."""
    if request.node.get_closest_marker(marker) is None:
        pytest.fail(f"{request.node.nodeid} uses the {request.fixturename} fixture, which "
                    f"needs the `{marker}` marker: add @pytest.mark.{marker} (or "
                    f"pytestmark = pytest.mark.{marker} for the module)", pytrace=False)
