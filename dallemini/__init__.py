"""dallemini: DALL·E Mini in PyTorch (public API: TextToImage, load_pipeline)."""

__version__ = "0.1.0"
