"""Layer streaming on the CPU: a model with some decoder layers in host
memory, copied into a ring before they run, computes exactly what the
resident model computes (float32), over many forward passes, for any ring
size, and recovers from a pass that stopped half-way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.worker.models import build_synthetic, model_config
from services.worker.streaming import (
    LayerStreamer,
    decoder_layers,
    stream_order,
    streamed_indices,
)

CPU = torch.device("cpu")


def tiny(num_layers: int = 5):
    config, _ = model_config("synthetic:llama-tiny", Path("/nonexistent"))
    config.num_hidden_layers = num_layers
    model = build_synthetic(config, CPU, torch.float32, seed=0)
    model.set_attn_implementation("sdpa")
    model.eval()
    return model


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


def test_which_layers_stream():
    """Spread out, so that each copy overlaps resident layers' compute; the
    sets grow one layer at a time (stream_order)."""
    assert streamed_indices(10, 1.0) == []
    assert streamed_indices(16, 0.625) == [2, 4, 6, 8, 10, 12]
    assert streamed_indices(10, 0.4) == [1, 2, 3, 5, 6, 7]
    assert streamed_indices(5, 0.01) == [0, 1, 2, 3, 4]
    for num_layers in (1, 2, 5, 16, 28, 32, 80):
        order = stream_order(num_layers)
        assert sorted(order) == list(range(num_layers)), num_layers
        for n in range(1, num_layers + 1):      # nested: growing never reshuffles
            assert set(order[:n - 1]) <= set(order[:n])
    # At 25% streamed no two streamed layers are neighbours in a 32-layer model.
    streamed = streamed_indices(32, 0.75)
    assert all(b - a >= 2 for a, b in zip(streamed, streamed[1:])), streamed
    with pytest.raises(ValueError):
        streamed_indices(10, 0.0)


@pytest.mark.parametrize("fraction, slots", [(0.4, 2), (0.4, 3), (0.01, 2), (0.6, 1), (0.2, 7)])
def test_streamed_equals_resident_exactly(fraction, slots):
    model = tiny()
    prompts = [[1, 2, 3, 4, 5], [7, 8], list(range(20, 40)), [9]]
    expected = [logits(model, ids) for ids in prompts]
    streamer = LayerStreamer(model, CPU, streamed_indices(5, fraction), ring_slots=slots)
    streamer.attach()
    info = streamer.info()
    assert info.streamed == len(streamed_indices(5, fraction))
    assert info.ring_slots == min(slots, info.streamed)
    for _ in range(2):                                  # the schedule runs across passes
        for ids, want in zip(prompts, expected):
            assert torch.equal(logits(model, ids), want), "a streamed pass differs"
    assert streamer.copied_bytes >= 8 * info.streamed * info.layer_bytes


def test_the_device_copies_of_streamed_layers_are_gone_and_come_back():
    model = tiny()
    want = logits(model, [3, 1, 4])
    layers = decoder_layers(model)
    streamer = LayerStreamer(model, CPU, [3, 4], ring_slots=2)
    streamer.attach()
    ring = {t.untyped_storage().data_ptr() for t in streamer.ring}
    assert {p.untyped_storage().data_ptr() for p in layers[4].parameters()} <= ring, (
        "a streamed layer's weights must live in the ring")
    streamer.detach()
    assert torch.equal(logits(model, [3, 1, 4]), want)
    assert not streamer._hooks


def test_a_pass_that_stops_half_way_does_not_derail_the_schedule():
    model = tiny()
    want = logits(model, [5, 6, 7])
    streamer = LayerStreamer(model, CPU, [1, 2, 3, 4], ring_slots=2)
    streamer.attach()

    def boom(module, args, output):
        raise RuntimeError("out of memory, say")
    hook = decoder_layers(model)[2].register_forward_hook(boom)
    with pytest.raises(RuntimeError):
        logits(model, [5, 6, 7])
    hook.remove()
    assert torch.equal(logits(model, [5, 6, 7]), want), "after a failed pass the next one is exact"


def test_two_workers_of_a_model_share_one_host_copy(tmp_path):
    """The first streamer writes the streamed layers into one shared-memory
    file; the second maps it (copies nothing); both are exact; the file goes
    when the last one closes."""
    first_model, second_model = tiny(), tiny()
    want = logits(first_model, [2, 7, 1, 8])
    streamed = [2, 3, 4]

    first = LayerStreamer(first_model, CPU, streamed, ring_slots=2,
                          share_as="synthetic:llama-tiny", shm_dir=tmp_path)
    first.attach()
    files = list(tmp_path.glob("lmx-weights-*"))
    assert [f.name for f in files if not f.name.endswith(".lock")] == [first.shared.path.name]
    assert first.shared.path.stat().st_size == 3 * first.layer_bytes
    assert first.shared.path.stat().st_mode & 0o777 == 0o600
    assert not first.shared_mapped
    second = LayerStreamer(second_model, CPU, streamed, ring_slots=2,
                           share_as="synthetic:llama-tiny", shm_dir=tmp_path)
    second.attach()
    assert second.shared_mapped, "the second worker should map the first one's copy"
    assert torch.equal(logits(first_model, [2, 7, 1, 8]), want)
    assert torch.equal(logits(second_model, [2, 7, 1, 8]), want)
    first.close()
    assert second.shared.path.exists(), "the file must stay while a worker uses it"
    assert torch.equal(logits(second_model, [2, 7, 1, 8]), want)
    second.close()
    assert not list(tmp_path.glob("lmx-weights-*")), "the last worker removes the file"


def test_a_streamed_model_sleeps_and_wakes_exactly():
    """Asleep, the resident weights are in host memory and the ring is gone;
    awake, the next passes are exact again."""
    from services.worker.sleep import StreamedStash, WeightStash

    model = tiny()
    want = logits(model, [4, 2, 4, 2])
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    everything = sum(t.numel() * t.element_size() for t in unique)
    streamer = LayerStreamer(model, CPU, [2, 3, 4], ring_slots=2)
    streamer.attach()
    assert torch.equal(logits(model, [4, 2, 4, 2]), want)
    stash = StreamedStash(WeightStash(model, CPU, moves=True,
                                      skip=streamer.streamed_parameters()), streamer)
    moved = stash.sleep()
    assert stash.asleep and not streamer.ring
    resident = everything - 3 * streamer.layer_bytes
    assert resident <= moved.num_bytes <= resident + 64 * 1024, (
        f"the stash should move the resident weights only: {moved.num_bytes} vs {resident}")
    assert all(p.numel() == 0 for p in model.parameters()), "nothing left on the device"
    stash.wake()
    assert not stash.asleep and len(streamer.ring) == 2
    for _ in range(2):
        assert torch.equal(logits(model, [4, 2, 4, 2]), want)


@pytest.mark.parametrize("first, then", [(1, 3), (2, 2), (4, 1)])
def test_layers_made_resident_again_stay_exact(first, then):
    """Memory freed up: streamed layers come back to the device, a few at a
    time, between passes; every pass stays exact; at the end nothing is
    streamed and no hook is left."""
    model = tiny()
    want = logits(model, [6, 5, 4])
    streamer = LayerStreamer(model, CPU, [1, 2, 3, 4], ring_slots=3)
    streamer.attach()
    assert torch.equal(logits(model, [6, 5, 4]), want)
    assert streamer.make_resident(first) == first
    # The ones streamed last (by stream_order) come back first.
    rank = {index: r for r, index in enumerate(stream_order(5))}
    back = sorted([1, 2, 3, 4], key=lambda i: rank[i], reverse=True)[:first]
    assert streamer.count == 4 - first
    assert streamer.streamed == sorted(set([1, 2, 3, 4]) - set(back))
    assert torch.equal(logits(model, [6, 5, 4]), want)
    assert streamer.make_resident(then) == 4 - first
    assert streamer.count == 0 and not streamer._hooks and not streamer.ring
    assert streamer.info().resident_fraction == 1.0
    assert torch.equal(logits(model, [6, 5, 4]), want)


def test_a_sleep_after_layers_came_back_moves_them_too():
    from services.worker.sleep import StreamedStash, WeightStash

    model = tiny()
    want = logits(model, [9, 9, 1])
    streamer = LayerStreamer(model, CPU, [2, 3, 4], ring_slots=2)
    streamer.attach()
    stash = StreamedStash(WeightStash(model, CPU, moves=True,
                                      skip=streamer.streamed_parameters()), streamer)
    first = stash.sleep().num_bytes
    stash.wake()
    streamer.make_resident(2)
    again = stash.sleep().num_bytes
    assert again >= first + 2 * streamer.layer_bytes, "the layers made resident must move too"
    stash.wake()
    assert torch.equal(logits(model, [9, 9, 1]), want)


def test_a_dead_writers_temporary_file_is_removed(tmp_path):
    """A worker that died while writing the shared copy leaves a temporary
    file; the next writer of that copy removes it."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    model = tiny()
    streamer = LayerStreamer(model, CPU, [3, 4], ring_slots=2, share_as="synthetic:llama-tiny",
                             shm_dir=tmp_path)
    from services.worker.shared_weights import PREFIX, weights_key
    key = weights_key("synthetic:llama-tiny", streamer.layout, [3, 4], streamer.layer_bytes)
    stale = tmp_path / f"{PREFIX}{key}.{dead}.tmp"
    stale.write_bytes(b"half written")
    streamer.attach()
    assert not stale.exists(), "the dead writer's file should be gone"
    streamer.close()
    assert not list(tmp_path.glob(f"{PREFIX}*"))


def test_streaming_more_layers_stays_exact_and_frees_them():
    """Memory short: more layers go to host memory, between passes; exact;
    then they can come back."""
    model = tiny()
    want = logits(model, [8, 6, 7])
    layers = decoder_layers(model)
    streamer = LayerStreamer(model, CPU, [4], ring_slots=2)
    streamer.attach()
    before = {p.untyped_storage().data_ptr() for p in layers[2].parameters()}
    assert streamer.stream_more(2) == 2     # the next two of stream_order(5): 2, then 1
    assert streamer.streamed == [1, 2, 4] and streamer.count == 3
    ring = {t.untyped_storage().data_ptr() for t in streamer.ring}
    assert {p.untyped_storage().data_ptr() for p in layers[2].parameters()} <= ring
    assert not before & ring
    for _ in range(2):
        assert torch.equal(logits(model, [8, 6, 7]), want)
    assert streamer.stream_more(10) == 2, "only the two resident layers left can go"
    assert streamer.streamed == [0, 1, 2, 3, 4]
    assert torch.equal(logits(model, [8, 6, 7]), want)
    streamer.make_resident(3)
    assert torch.equal(logits(model, [8, 6, 7]), want)


def test_a_resident_model_starts_streaming_and_stops_again():
    """A streamer with nothing streamed (a resident model that may give
    layers back): streaming starts from zero, its ring made only once the
    layers' device copies are gone (`more_frees` counts the ring); exact;
    all layers back makes it resident again, and it can start again."""
    model = tiny()
    want = logits(model, [8, 6, 7])
    layers = decoder_layers(model)
    streamer = LayerStreamer(model, CPU, [], ring_slots=2)
    streamer.attach()
    assert streamer.count == 0 and streamer.info().ring_bytes == 0
    one = streamer.layer_bytes
    assert one > 0, "the layer size is known before anything streams"
    assert streamer.more_frees(1) == 0 and streamer.more_frees(2) == 0, "the ring costs two"
    assert streamer.more_frees(3) == one
    assert streamer.stream_more(3) == 3      # stream_order(5): 2, 1, 3
    assert streamer.streamed == [1, 2, 3] and streamer.slots == 2
    info = streamer.info()
    assert info.host_bytes == 3 * one and info.ring_bytes == 2 * one
    ring = {t.untyped_storage().data_ptr() for t in streamer.ring}
    # The layer now runs from the ring. (Whether the ring took the freed
    # resident copy's addresses is the allocator's business: not asserted.)
    assert {p.untyped_storage().data_ptr() for p in layers[2].parameters()} <= ring
    for _ in range(2):
        assert torch.equal(logits(model, [8, 6, 7]), want)
    assert streamer.more_frees(1) == one, "with a ring already, a layer frees a layer"
    assert streamer.make_resident(3) == 3
    assert streamer.count == 0 and streamer.info().ring_bytes == 0 and not streamer.ring
    assert torch.equal(logits(model, [8, 6, 7]), want)
    assert streamer.stream_more(4) == 4
    assert torch.equal(logits(model, [8, 6, 7]), want)
