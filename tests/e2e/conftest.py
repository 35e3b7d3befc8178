"""The cluster both end-to-end modules run on (E2E_CLUSTER; tests/e2e/targets.py)."""
from __future__ import annotations

import pytest

from targets import target


@pytest.fixture(scope="session")
def cluster():
    t = target()
    yield t
    t.close()
