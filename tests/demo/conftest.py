"""One artifact folder for the demo tests, so the comparison test reuses the pipeline test's run."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_out(tmp_path_factory):
    return tmp_path_factory.mktemp("demo")
