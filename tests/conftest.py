"""Shared pytest fixtures and markers."""

from pathlib import Path

import pytest

# The read-only datasets beside the repository (see ../shared/datasets/SOURCES.md). Only tests and
# scripts may name this place; package code takes a data_dir.
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def pytest_configure(config):
    config.addinivalue_line("markers", "postgres: needs a PostgreSQL server (CNNSEARCH_TEST_POSTGRES)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The shared datasets folder; tests that need it skip where it is absent."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATASETS} (see shared/datasets/SOURCES.md)")
    return SHARED_DATASETS
