"""Worker: serves one model to many agent sessions inside its admission lease."""
