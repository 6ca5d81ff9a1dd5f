"""``mergevid data ...`` and ``mergevid bench data`` (owned by the data pipeline)."""

from __future__ import annotations

from .main import bench_app, data_app  # noqa: F401
