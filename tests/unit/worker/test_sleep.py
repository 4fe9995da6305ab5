"""services/worker/sleep.py: a later sleep copies only what may have changed.

Parameters do not change while a model serves, so after the first sleep the
host buffer still holds them: the next sleeps copy the buffers only (a
model may keep state in them) and free the parameters' device copies. A
new plan (a different set of tensors moved) copies everything again. On
the CPU the stash is made to move (moves=True), as it does on a GPU."""

import structlog
import torch

from services.worker.sleep import WeightStash


def _sleeps(stash):
    with structlog.testing.capture_logs() as logs:
        stash.sleep()
    return next(line for line in logs if line["event"] == "model_asleep")


def test_a_later_sleep_copies_the_buffers_only_and_the_weights_come_back_the_same(tiny):
    model = tiny.model
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    stash = WeightStash(model, tiny.device, moves=True)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        first = _sleeps(stash)
        # Every tensor copied (bytes also counts the slices' alignment).
        assert first["bytes"] >= first["copied_bytes"] >= param_bytes
        stash.wake()
        second = _sleeps(stash)
        assert second["bytes"] == first["bytes"]
        assert second["copied_bytes"] == first["copied_bytes"] - param_bytes, \
            "the parameters were copied out again though the host buffer holds them"
        assert all(p.numel() == 0 for p in model.parameters()), "a weight was left in place"
    finally:
        stash.wake()
    after = model.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items()), (
        "a weight or buffer changed through two sleeps and wakes")


def test_a_buffer_that_changed_while_awake_is_kept_and_a_new_plan_copies_all(tiny):
    model = tiny.model
    buffers = [(name, b) for name, b in model.named_buffers() if b is not None and b.numel()]
    stash = WeightStash(model, tiny.device, moves=True)
    try:
        _sleeps(stash)
        stash.wake()
        if buffers:
            name, _ = buffers[0]
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            with torch.no_grad():
                module._buffers[leaf].add_(1)
            changed = module._buffers[leaf].clone()
        _sleeps(stash)
        stash.wake()
        if buffers:
            assert torch.equal(module._buffers[leaf], changed), "the buffer's new value was lost"
        # Fewer tensors to move (as when layers stream): planned again, all copied.
        first_param = next(iter(model.parameters()))
        stash.exclude([first_param])
        moved_params = sum(p.numel() * p.element_size() for p in model.parameters()
                           if p is not first_param)
        assert moved_params > 0
        again = _sleeps(stash)
        assert again["copied_bytes"] >= moved_params, "a new plan copies the parameters again"
    finally:
        stash.wake()
