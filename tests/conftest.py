"""Shared test settings: keep torch to one thread per test worker on small machines, register
the shared fixtures, and mark the slow tests.

``make test`` runs everything; ``make test-fast`` (``pytest -m "not slow"``) is the edit-test
loop: it leaves out the tests that need the trained tiny model, a real server (Orthanc,
PostgreSQL, ``orthonode serve``), PixelMed or a training run.
"""
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a hard dependency; this only guards collection
    pass

#: the fixtures every test folder shares (the tiny model, phantoms, node configurations, servers)
pytest_plugins = ("tests.support.fixtures",)

#: a test that uses one of these fixtures (directly or through another) is marked ``slow``
SLOW_FIXTURES = frozenset({"tiny_checkpoint", "knee_phantoms", "orthanc", "serve_process", "postgres_server_url"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
