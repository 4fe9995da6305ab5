"""lmx services: admission, worker and kvstore, and what they share (common)."""
