"""The indexer's tests: the catalogue fixtures of ``tests.catalogues``, one torch thread per module."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread) -> None:
    """Tiny batches of 128-px images: one torch thread (``tests.catalogues.one_torch_thread``)."""
