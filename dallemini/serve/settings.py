"""The limits and options of one server, and the check that they can work together (and that its
image store directory, when it has one, can be written)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .support import open_image_dir

BATCHING = ("continuous", "request")


@dataclass
class ServeSettings:
    """Limits and options of one server."""

    # continuous: requests join the running decoder batch at every step, with any settings;
    # request: requests with equal settings share one batch from its first step to its last
    batching: str = "continuous"
    max_batch_images: int = 16  # images sampled together in one decoder batch
    max_wait_ms: float = 10.0  # request batching: how long the oldest request waits for others
    max_queue: int = 64  # images waiting; past it new requests get 429
    timeout_s: float = 300.0  # per request, queueing included; past it 504
    api_key: str | None = None
    max_images: int = 16  # per request
    default_images: int = 4
    original_images: int = 9  # per request of the original demo protocol
    max_body_bytes: int = 2_100_000  # a completion's base64 init image fits
    cache_images: int = 512  # PNGs kept for response="url"
    # a directory for those PNGs that several replicas share (None: each server's own memory)
    image_store: str | None = None
    stream_every: int | None = None  # tokens between partial frames (default: one token row)
    model_name: str = "model"
    # on SIGTERM, how long requests in flight may take; then their connections are closed
    drain_timeout_s: float = 60.0

    def check(self) -> None:
        """Raise ConfigError for limits that cannot work together or an image store that cannot be written."""
        if self.batching not in BATCHING:
            raise ConfigError(f"batching must be one of {list(BATCHING)}, got {self.batching!r}")
        for name in (
            "max_batch_images",
            "max_queue",
            "max_images",
            "original_images",
            "cache_images",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise ConfigError("max_wait_ms must be >= 0 and timeout_s > 0")
        if not self.drain_timeout_s > 0:
            raise ConfigError(f"drain_timeout_s must be > 0, got {self.drain_timeout_s}")
        largest = max(self.max_images, self.original_images)
        if self.max_queue < largest:
            raise ConfigError(
                f"max_queue ({self.max_queue}) must hold one whole request ({largest} images: "
                f"max_images {self.max_images}, original protocol {self.original_images})"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key must not be empty")
        if self.image_store is not None:
            open_image_dir(self.image_store)  # created and writable, else ConfigError
