"""dallemini: DALL·E Mini in PyTorch (public API: TextToImage, load_pipeline)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["TextToImage", "__version__", "load_pipeline"]


def __getattr__(name: str) -> Any:
    """TextToImage and load_pipeline, imported on first use so `import dallemini` stays light."""
    if name in ("TextToImage", "load_pipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'dallemini' has no attribute {name!r}")
