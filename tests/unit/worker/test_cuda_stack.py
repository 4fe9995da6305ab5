"""--cuda-stack-bytes: the per-thread GPU stack a worker's CUDA context
reserves. The setting is checked; without a driver (this CPU), asking for it
is logged and changes nothing. The GPU measures what it saves
(bench/context_memory.py)."""

from __future__ import annotations

import ctypes

import pytest

from services.common.errors import ConfigError
from services.worker import device as devices
from services.worker.settings import load_settings


def test_the_setting_defaults_to_cudas_own_and_refuses_a_negative_size():
    assert load_settings(["--model", "m"], {}).cuda_stack_bytes == 0
    assert load_settings(["--model", "m", "--cuda-stack-bytes", "256"], {}).cuda_stack_bytes == 256
    with pytest.raises(ConfigError) as caught:
        load_settings(["--model", "m", "--cuda-stack-bytes", "-1"], {})
    assert caught.value.setting == "cuda_stack_bytes"


def test_without_a_driver_the_limit_is_not_set_and_nothing_fails(monkeypatch):
    def no_driver(name, *args, **kwargs):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_driver)
    assert devices.set_stack_limit(256) is None


def test_the_driver_is_asked_for_the_limit_and_says_what_it_set(monkeypatch):
    calls = []

    class Driver:
        def cuCtxSetLimit(self, limit, value):
            calls.append(("set", limit, value.value))
            return 0

        def cuCtxGetLimit(self, pointer, limit):
            pointer._obj.value = 512          # the driver rounds as it likes
            return 0

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Driver())
    assert devices.set_stack_limit(256) == 512
    assert calls == [("set", 0, 256)]        # CU_LIMIT_STACK_SIZE
