"""The OpenAI-compatible HTTP front: existing agents talk to lmx's workers
through POST /v1/chat/completions, /v1/completions and GET /v1/models."""
