"""The KV store: parked KV caches in shared host memory (issue 4)."""
