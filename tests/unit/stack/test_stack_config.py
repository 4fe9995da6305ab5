"""The stack file: tables become each service's flags, checked by that
service's own settings loader; mistakes are one clear ConfigError."""

from __future__ import annotations

import pytest

from lmx.v1 import admission_pb2 as pb
from services.common.errors import ConfigError
from services.stack.config import DEFAULT_STACK, load_stack, to_argv
from services.stack.ps import render_ps
from services.stack.supervisor import model_problem, port_free


def write(tmp_path, text: str):
    path = tmp_path / "lmx.toml"
    path.write_text(text)
    return path


def test_the_shipped_stack_file_loads():
    stack = load_stack(DEFAULT_STACK)
    assert [w.settings.model for w in stack.workers] == ["smollm2-135m", "gemma3-270m"]
    assert stack.kvstore is not None and stack.kvstore.settings.keep_on_stop is False
    for worker in stack.workers:
        assert worker.settings.admission == stack.admission.listen
        assert worker.settings.kvstore == stack.kvstore.listen
    assert stack.front is not None and stack.front.settings.admission == stack.admission.listen
    assert stack.services[-1] is stack.front


def test_tables_become_flags():
    assert to_argv({"listen": "a:1", "keep_on_stop": False, "device": ["cpu:0=1GiB", "cpu:1=2GiB"],
                    "cap-fraction": 0.5}, "t") == [
        "--listen", "a:1", "--keep-on-stop", "false", "--device", "cpu:0=1GiB",
        "--device", "cpu:1=2GiB", "--cap-fraction", "0.5"]
    with pytest.raises(ConfigError):
        to_argv({"listen": {"nested": 1}}, "t")


@pytest.mark.parametrize("text, words", [
    ("[admission]\nlisten = \n", "not valid TOML"),
    ("[admision]\n", "unknown table"),
    ("[admission]\ncap-fractoin = 0.5\n", "does not know"),
    ("[admission]\ncap-fraction = 7\n", "cap_fraction"),
    ("[[worker]]\nlisten = \"127.0.0.1:1\"\n", "names no model"),
    ("worker = 3\n", "array of tables"),
    ("[[worker]]\nmodel = \"m\"\nquantize = \"int3\"\n", "quantize"),
    ("[admission]\nlisten = \"127.0.0.1:5\"\n[kvstore]\nlisten = \"127.0.0.1:5\"\n",
     "two services listen"),
])
def test_mistakes_are_one_clear_error(tmp_path, text, words):
    with pytest.raises(ConfigError) as info:
        load_stack(write(tmp_path, text))
    assert words in str(info.value), str(info.value)


def test_a_worker_table_quantizes_its_model(tmp_path):
    stack = load_stack(write(tmp_path, '[[worker]]\nmodel = "m"\nquantize = "int4"\n'
                                       'quantize-group-size = 64\n'
                                       'quantize-embeddings = "none"\n'))
    settings = stack.workers[0].settings
    assert (settings.quantize, settings.quantize_group_size,
            settings.quantize_embeddings) == ("int4", 64, "none")


def test_a_missing_stack_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match="no stack file"):
        load_stack(tmp_path / "nope.toml")


def test_model_and_port_checks():
    assert model_problem("smollm2-135m") == ""
    assert model_problem("synthetic:llama-tiny") == ""
    assert "unknown synthetic shape" in model_problem("synthetic:nope")
    assert "unknown model" in model_problem("no-such-model")
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert not port_free("127.0.0.1", sock.getsockname()[1])


def test_ps_shows_devices_and_each_workers_lease_and_sessions():
    holder = pb.Holder(name="worker/m", pid=42)
    status = pb.StatusResponse(
        devices=[pb.DeviceStatus(device="cpu:0", name="simulated", total_bytes=8 << 30,
                                 cap_fraction=0.9, cap_bytes=int(7.2 * (1 << 30)),
                                 leased_bytes=3 << 30, free_bytes=int(4.2 * (1 << 30)))],
        leases=[pb.Lease(lease_id="l1", holder=holder, device="cpu:0", bytes=2 << 30,
                         since_renewal_s=1.5),
                pb.Lease(lease_id="l2", holder=holder, device="cpu:0", bytes=1 << 30,
                         since_renewal_s=0.5)],
        workers=[pb.WorkerInfo(worker_id="m@a", model="m", address="127.0.0.1:1",
                               state=pb.WORKER_STATE_ASLEEP, pid=42, device="cpu:0",
                               num_sessions=3, num_parked=2, weights="int4-g128")])
    text = render_ps(status)
    row = next(line for line in text.splitlines() if line.startswith("m "))
    assert row.split()[:9] == ["m", "asleep", "int4-g128", "cpu:0", "3.00", "GiB", "1", "2",
                               "0.5s"], row
    assert "7.20 GiB (90%)" in text
    assert "no workers" in render_ps(pb.StatusResponse())
