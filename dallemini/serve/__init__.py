"""`dallemini serve`: a FastAPI web service (HTTP API, original demo protocol, web page) with dynamic batching."""

from __future__ import annotations

from .app import ServeSettings, create_app
from .batcher import Batcher, Job, Rejected

__all__ = ["Batcher", "Job", "Rejected", "ServeSettings", "create_app"]
