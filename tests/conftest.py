"""Shared pytest setup: offline, CPU-friendly defaults for every test."""

from __future__ import annotations

import os

import pytest

# No test may reach the network or a user's caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Text-feature cache and torch hub under a per-session temp dir."""
    cache = tmp_path_factory.getbasetemp() / "mergevid-cache"
    monkeypatch.setenv("MERGEKIT_VIDEO_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(cache / "torch"))


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when CUDA is unavailable."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
