"""Set up for every test: on a machine without a CUDA GPU, Triton (where it
is installed) runs in interpreter mode, so that the worker's CUDA kernels
(services/worker/paged_kernels.py) can be tested on CPU tensors. The mode is
set in this process only (Triton's knob), not in the environment, so that
the services the tests start do not inherit it."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton
        import triton.language  # noqa: F401 - decorated in interpreter mode

        triton.knobs.runtime.interpret = True
    except (ImportError, AttributeError):   # no Triton, or one without knobs: tests skip
        pass
    finally:
        del os.environ["TRITON_INTERPRET"]
