"""Data: image/caption sources, encoding to token shards, and the streaming shard reader."""
