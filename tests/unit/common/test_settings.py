"""The settings loader (defaults < TOML < environment < flags) and admission's
validation of the result."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from services.admission.devices import SimulatedDeviceSpec
from services.admission.settings import DEFAULT_LISTEN, AdmissionSettings, load_settings
from services.common import settings as loader
from services.common.errors import ConfigError

GIB = 1 << 30


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "lmx.toml"
    path.write_text(text)
    return str(path)


def test_defaults():
    settings = load_settings([], {})
    assert settings == AdmissionSettings()
    assert (settings.listen, settings.cap_fraction, settings.devices, settings.device_backend) == (
        DEFAULT_LISTEN, 0.90, (), "auto")


def test_precedence_defaults_then_file_then_environment_then_flags(tmp_path):
    config = write_toml(tmp_path, "[admission]\ncap_fraction = 0.5\nmax_wait_s = 7\n"
                                  "default_ttl_s = 20\n")
    env = {"LMX_ADMISSION_CAP_FRACTION": "0.6", "LMX_ADMISSION_MAX_WAIT_S": "8"}
    flags = ["--config", config, "--cap-fraction", "0.7"]

    both = load_settings(flags, env)
    assert both.cap_fraction == 0.7, "a flag must win over the environment and the file"
    assert both.max_wait_s == 8.0, "the environment must win over the file"
    assert both.default_ttl_s == 20.0, "the file must win over the default"
    assert both.grace_s == 5.0, "unset anywhere: the default"

    assert load_settings(["--config", config], env).cap_fraction == 0.6
    assert load_settings(["--config", config], {}).cap_fraction == 0.5
    assert load_settings([], {}).cap_fraction == 0.9


def test_config_file_from_lmx_config(tmp_path):
    config = write_toml(tmp_path, "[admission]\nlisten = '0.0.0.0:6000'\n[worker]\nbogus = 1\n")
    settings = load_settings([], {"LMX_CONFIG": config})
    assert settings.listen == "0.0.0.0:6000", "LMX_CONFIG names the file; other tables are ignored"


def test_toml_keys_may_use_dashes(tmp_path):
    config = write_toml(tmp_path, "[admission]\ncap-fraction = 0.4\n")
    assert load_settings(["--config", config], {}).cap_fraction == 0.4


def test_file_without_the_service_table_gives_defaults(tmp_path):
    config = write_toml(tmp_path, "[other]\nx = 1\n")
    assert load_settings(["--config", config], {}) == AdmissionSettings()


def test_device_is_repeatable_everywhere(tmp_path):
    flags = load_settings(["--device", "cpu:0=1GiB", "--device", "cpu:1=512MiB"], {})
    assert flags.devices == (SimulatedDeviceSpec("cpu:0", GIB),
                             SimulatedDeviceSpec("cpu:1", 512 << 20))
    env = load_settings([], {"LMX_ADMISSION_DEVICES": "cpu:0=1GiB, cpu:1=2GiB"})
    assert env.devices == (SimulatedDeviceSpec("cpu:0", GIB), SimulatedDeviceSpec("cpu:1", 2 * GIB))
    config = write_toml(tmp_path, '[admission]\ndevices = ["cpu:5=3GiB"]\n')
    assert load_settings(["--config", config], {}).devices == (SimulatedDeviceSpec("cpu:5", 3 * GIB),)
    both = load_settings(["--device", "cpu:9=1GiB"], {"LMX_ADMISSION_DEVICES": "cpu:0=1GiB"})
    assert both.devices == (SimulatedDeviceSpec("cpu:9", GIB),), "flags replace the env list"


def test_unknown_toml_key_is_an_error(tmp_path):
    config = write_toml(tmp_path, "[admission]\ncap_fractoin = 0.5\n")
    with pytest.raises(ConfigError) as err:
        load_settings(["--config", config], {})
    assert err.value.setting == "admission.cap_fractoin"
    assert "cap_fraction" in err.value.fix, "the error must list the known settings"


def test_unreadable_or_invalid_config_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_settings(["--config", str(tmp_path / "missing.toml")], {})
    assert err.value.setting == "config"
    config = write_toml(tmp_path, "[admission\ncap_fraction = \n")
    with pytest.raises(ConfigError) as err:
        load_settings(["--config", config], {})
    assert err.value.setting == "config" and "TOML" in err.value.message


def test_service_key_that_is_not_a_table_is_an_error(tmp_path):
    config = write_toml(tmp_path, "admission = 3\n")
    with pytest.raises(ConfigError) as err:
        load_settings(["--config", config], {})
    assert err.value.setting == "admission" and "table" in err.value.message


@pytest.mark.parametrize("argv, env, toml, setting, origin", [
    (["--cap-fraction", "lots"], {}, "", "cap_fraction", "--cap-fraction"),
    ([], {"LMX_ADMISSION_MAX_WAIT_S": "soon"}, "", "max_wait_s", "LMX_ADMISSION_MAX_WAIT_S"),
    ([], {}, "grace_s = 'later'", "grace_s", "lmx.toml"),
    (["--device", "cpu:0"], {}, "", "devices", "--device"),
    ([], {"LMX_ADMISSION_DEVICES": "cpu:0=8GiB,cpu:1=much"}, "", "devices", "LMX_ADMISSION_DEVICES"),
])
def test_unparsable_values_name_the_setting_and_where_they_came_from(
        tmp_path, argv, env, toml, setting, origin):
    if toml:
        argv = [*argv, "--config", write_toml(tmp_path, f"[admission]\n{toml}\n")]
    with pytest.raises(ConfigError) as err:
        load_settings(argv, env)
    assert err.value.setting == setting, f"blamed {err.value.setting}, not {setting}"
    assert origin in err.value.message, f"{err.value.message!r} must say it came from {origin}"


@pytest.mark.parametrize("argv, setting", [
    (["--listen", "nowhere"], "listen"),
    (["--listen", "host:99999"], "listen"),
    (["--cap-fraction", "0"], "cap_fraction"),
    (["--cap-fraction", "1.5"], "cap_fraction"),
    (["--min-ttl-s", "0"], "default_ttl_s"),
    (["--default-ttl-s", "0.05"], "default_ttl_s"),
    (["--default-ttl-s", "5000"], "default_ttl_s"),
    (["--max-wait-s", "0"], "max_wait_s"),
    (["--sweep-interval-s", "-1"], "sweep_interval_s"),
    (["--poll-interval-s", "0"], "poll_interval_s"),
    (["--grace-s", "-1"], "grace_s"),
    (["--log-format", "xml"], "log_format"),
])
def test_admission_settings_validation(argv, setting):
    with pytest.raises(ConfigError) as err:
        load_settings(argv, {})
    assert err.value.setting == setting, f"{argv} must be blamed on {setting}"


def test_valid_edge_values_pass():
    settings = load_settings(["--cap-fraction", "1", "--grace-s", "0", "--listen", "[::1]:0",
                              "--min-ttl-s", "1", "--default-ttl-s", "1", "--max-ttl-s", "1",
                              "--log-format", "json"], {})
    assert (settings.cap_fraction, settings.grace_s, settings.min_ttl_s) == (1.0, 0.0, 1.0)


def test_settings_are_frozen():
    settings = load_settings([], {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.cap_fraction = 0.1


def test_unknown_flag_exits():
    with pytest.raises(SystemExit):
        load_settings(["--no-such-flag", "1"], {})


def test_environment_is_read_only_when_loading(monkeypatch):
    monkeypatch.setenv("LMX_ADMISSION_GRACE_S", "9")
    assert load_settings([], None).grace_s == 9.0, "environ=None reads os.environ"
    assert load_settings([], {}).grace_s == 5.0, "an explicit environ replaces os.environ"


# ---- the loader with another service's dataclass ---------------------------------

@dataclasses.dataclass(frozen=True)
class Toy:
    verbose: bool = False
    count: int = 1
    names: tuple[str, ...] = dataclasses.field(default=(), metadata={"repeat": True})
    limit: float = dataclasses.field(default=1.0, metadata={"flag": "max"})

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("count must not be negative")


def test_loader_parses_bool_int_and_custom_flag_names(tmp_path):
    toy = loader.load(Toy, "toy", ["--verbose", "yes", "--count", "3", "--max", "2.5",
                                   "--names", "a", "--names", "b"], {})
    assert toy == Toy(True, 3, ("a", "b"), 2.5)
    assert loader.load(Toy, "toy", [], {"LMX_TOY_VERBOSE": "off"}).verbose is False
    config = write_toml(tmp_path, "[toy]\nverbose = true\ncount = 4\nnames = 'x,y'\n")
    assert loader.load(Toy, "toy", ["--config", config], {}) == Toy(True, 4, ("x", "y"), 1.0)


def test_loader_errors_name_the_field():
    with pytest.raises(ConfigError) as err:
        loader.load(Toy, "toy", ["--verbose", "maybe"], {})
    assert err.value.setting == "verbose"
    with pytest.raises(ConfigError) as err:
        loader.load(Toy, "toy", ["--count", "1.5"], {})
    assert err.value.setting == "count"
    with pytest.raises(ConfigError) as err:
        loader.load(Toy, "toy", ["--count", "-1"], {})
    assert err.value.setting == "toy" and "negative" in err.value.message, (
        "a plain ValueError from __post_init__ becomes a ConfigError for the service")


@pytest.mark.parametrize("flags, setting", [
    (["--log-level", "loud"], "log_level"),
    (["--log-format", "xml"], "log_format"),
    (["--grace-s", "-1"], "grace_s"),
    (["--listen", "nowhere"], "listen"),
])
def test_every_service_checks_the_shared_settings(flags, setting):
    from services.admission.settings import load_settings as admission
    from services.kvstore.settings import load_settings as kvstore
    from services.worker.settings import load_settings as worker

    for load in (admission, worker, kvstore):
        with pytest.raises(ConfigError) as refused:
            load(flags, environ={})
        assert refused.value.setting == setting, (load.__module__, refused.value)
