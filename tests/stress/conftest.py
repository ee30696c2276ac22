"""Fixtures of the stress suite (issue 9); helpers live in stress_helpers.py. Every test here
is skipped when <repo>/../shared/models/stories260K is absent."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from stress_helpers import MODEL, start_server  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not MODEL.exists():
        skip = pytest.mark.skip(reason=f"{MODEL} not found")
        here = os.path.dirname(__file__)
        for item in items:
            if str(item.fspath).startswith(here):
                item.add_marker(skip)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory, "--max-request-bytes", "1000000")
    yield s
    s.stop()
