"""An older card, simulated on the CPU (its compute capability patched):
--dtype auto picks float16 where bfloat16 does not compute, refuses
bfloat16 asked for, runs decode steps eagerly (no Triton, no graphs) and
int4 de-quantized, and says so in one line."""

from __future__ import annotations

import pytest
import torch

from services.common.errors import ConfigError
from services.worker import device as devices
from services.worker import quantize
from services.worker.sizing import LeaseSizing
from services.worker.settings import load_settings

CUDA = torch.device("cuda:0")


@pytest.fixture
def card(monkeypatch):
    def simulate(major: int, minor: int) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda device=None: (major, minor))
    return simulate


@pytest.mark.parametrize("capability, dtype, graphs, int4", [
    ((7, 5), torch.float16, False, "dequant"),     # T4, RTX 20xx
    ((6, 1), torch.float16, False, "dequant"),     # GTX 10xx
    ((8, 6), torch.bfloat16, True, "tinygemm"),    # RTX 30xx, A10
    ((9, 0), torch.bfloat16, True, "tinygemm"),    # H100
])
def test_auto_picks_what_the_card_runs(card, capability, dtype, graphs, int4):
    card(*capability)
    assert devices.resolve_dtype("auto", CUDA) == dtype
    assert devices.decode_graphs("auto", CUDA) is graphs
    assert devices.decode_graphs("off", CUDA) is False
    line = devices.describe_card(CUDA, dtype, "auto")
    assert line["capability"] == f"{capability[0]}.{capability[1]}"
    assert line["decode"].startswith("CUDA graphs" if graphs else "eager (compute capability")
    assert line["int4"] == int4
    assert quantize.tinygemm_supported(CUDA, dtype) is (int4 == "tinygemm")


def test_bfloat16_on_an_older_card_is_a_clear_error(card):
    card(7, 0)
    with pytest.raises(ConfigError) as caught:
        devices.resolve_dtype("bfloat16", CUDA)
    assert caught.value.setting == "dtype" and "7.0" in caught.value.message
    assert devices.resolve_dtype("float16", CUDA) == torch.float16


def test_the_cpu_stays_as_it_was():
    cpu = torch.device("cpu")
    assert devices.resolve_dtype("auto", cpu) == torch.float32
    assert not devices.decode_graphs("auto", cpu)
    assert devices.describe_card(cpu, torch.float32, "auto")["decode"] == "eager"


def test_the_lease_plans_no_graph_pool_on_an_older_card(card, model_cache):
    settings = load_settings(["--model", "synthetic:llama-tiny", "--device", "cpu",
                              "--quantize", "int4"], {})
    card(7, 5)
    old = LeaseSizing(settings, CUDA, torch.float16, model_cache)
    assert not old.graphs and old.graph_pool_estimate() == 0
    assert old.plan.dims.dequant_bytes > 0, "int4 is de-quantized there: its transient is planned"
    card(9, 0)
    new = LeaseSizing(settings, CUDA, torch.bfloat16, model_cache)
    # tinygemm reads the packed layers: only the int8 head's chunk is converted
    assert new.graphs and new.plan.dims.dequant_bytes == \
        quantize.head_bytes(new.plan.dims, quantize.QuantSpec.of(settings))
    kept = load_settings(["--model", "synthetic:llama-tiny", "--device", "cpu",
                          "--quantize", "int4", "--quantize-embeddings", "none"], {})
    assert LeaseSizing(kept, CUDA, torch.bfloat16, model_cache).plan.dims.dequant_bytes == 0
