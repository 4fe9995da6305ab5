"""`lmx demo`'s place and cast (services/demo.py): the stack file it writes
for the simulated device and for a GPU, and --at-scale's models."""

from __future__ import annotations

import argparse

from services.demo import AGENTS, AT_SCALE, MODELS, Place, cast, place_for
from services.stack.config import load_stack


def test_at_scale_puts_three_distinct_published_shapes_in_the_models_places():
    agents, models = cast(True)
    assert models == tuple(AT_SCALE[m] for m in MODELS) and len(set(models)) == 3
    assert [a.name for a in agents] == [a.name for a in AGENTS]
    assert all(a.model.startswith("synthetic:") and not a.chat for a in agents)
    # Two agents still share one model's weights.
    assert len({a.model for a in agents}) == 3 and len(agents) == 4
    assert cast(False) == (AGENTS, MODELS)


def test_without_a_gpu_auto_is_the_simulated_device():
    args = argparse.Namespace(device="auto", device_size="1400MiB", cap_gib=None,
                              at_scale=False, quantize="none")
    place = place_for(args)
    assert not place.cuda and place.size == 1400 << 20


def test_the_stack_file_for_a_gpu_caps_nvml_at_the_small_card(tmp_path):
    from services.demo import stack_file

    place = Place(True, 8 << 30, "NVIDIA H100 80GB HBM3", *cast(True), "int4", 80 << 30)
    toml = place.admission_toml + place.worker_toml
    assert 'device-backend = "nvml"' in toml and "cap-fraction = 0.100000" in toml
    assert 'device = "cuda"' in toml and 'quantize = "int4"' in toml
    gpu = tmp_path / "gpu.toml"
    gpu.write_text(f'[admission]\nlisten = "127.0.0.1:1"\n{place.admission_toml}'
                   f'[[worker]]\nmodel = "{place.models[0]}"\nlisten = "127.0.0.1:2"\n'
                   f'{place.worker_toml}')
    loaded = load_stack(gpu)      # the services' own loaders accept it (no GPU needed to check)
    assert loaded.admission.settings.device_backend == "nvml"
    worker = loaded.workers[0].settings
    assert (worker.device, worker.quantize, worker.resident_fraction) == ("cuda", "int4", 0.0)
    cpu = Place(False, 1400 << 20)
    path = stack_file(tmp_path, cpu)
    stack = load_stack(path)      # the service loaders accept it whole
    assert [w.settings.model for w in stack.workers] == list(MODELS)
    assert stack.admission.settings.state_file == "none"
