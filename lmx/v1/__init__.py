"""lmx.v1 protocol: generated from protos/lmx/v1 by `make proto`."""
