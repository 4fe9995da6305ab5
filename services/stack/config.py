"""The stack file (`deploy/lmx.toml`): which services `lmx up` starts, each
with the settings of its own command, written under its name:

    [admission]                 # the flags of `lmx admission`, without the --
    listen = "127.0.0.1:50051"

    [kvstore]
    keep-on-stop = false

    [[worker]]                  # one table per worker (one model each)
    model = "smollm2-135m"
    listen = "127.0.0.1:50061"

    [front]                     # the OpenAI-compatible HTTP front (optional)
    listen = "127.0.0.1:8000"

Every table is checked by its service's own settings loader before anything
starts, so a misspelt key or a bad value is one clear line, not a crash of a
child process later. Workers are pointed at the stack's admission and kvstore
unless their table says otherwise.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import ConfigError
from services.common.launch import HTTP_HEALTH

DEFAULT_STACK = Path(__file__).resolve().parents[2] / "deploy" / "lmx.toml"


@dataclass(frozen=True)
class ServiceSpec:
    name: str              # "admission", "kvstore", "worker-smollm2-135m"
    module: str            # python -m <module>
    health_service: str    # the gRPC service name its health check reports
    argv: tuple[str, ...]  # its flags
    listen: str
    settings: Any          # the service's validated settings object

    @property
    def is_worker(self) -> bool:
        return self.module == "services.worker"


@dataclass(frozen=True)
class StackConfig:
    path: Path
    admission: ServiceSpec
    kvstore: ServiceSpec | None
    workers: tuple[ServiceSpec, ...]
    front: ServiceSpec | None = None

    @property
    def services(self) -> tuple[ServiceSpec, ...]:
        first = (self.admission,) + ((self.kvstore,) if self.kvstore else ())
        return first + self.workers + ((self.front,) if self.front else ())


def to_argv(table: dict[str, Any], where: str) -> list[str]:
    """A TOML table as command-line flags: key = value -> --key value; a
    list repeats the flag; a bool is true/false."""
    argv: list[str] = []
    for key, value in table.items():
        flag = "--" + key.replace("_", "-")
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, bool):
                item = "true" if item else "false"
            elif not isinstance(item, (str, int, float)):
                raise ConfigError(f"{where}.{key}", f"cannot be a {type(item).__name__}",
                                  fix="use a string, a number, true/false or a list of them")
            argv += [flag, str(item)]
    return argv


def _service(name: str, module: str, health: str, table: dict[str, Any], where: str,
             extra: list[str]) -> ServiceSpec:
    argv = to_argv(table, where) + extra
    settings = _load(module, argv, where)
    return ServiceSpec(name, module, health, tuple(argv), settings.listen, settings)


def _load(module: str, argv: list[str], where: str) -> Any:
    """Validate flags with the service's own loader (no environment)."""
    if module == "services.admission":
        from services.admission.settings import load_settings
    elif module == "services.kvstore":
        from services.kvstore.settings import load_settings
    elif module == "services.front":
        from services.front.settings import load_settings
    else:
        from services.worker.settings import load_settings
    try:
        return load_settings(argv, environ={})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.setting}", exc.message, fix=exc.fix) from None
    except SystemExit:   # argparse: an unknown flag, a value it cannot parse
        raise ConfigError(where, f"has a setting `lmx {module.split('.')[-1]}` does not know "
                                 f"({' '.join(argv)})",
                          fix=f"see lmx {module.split('.')[-1]} -h") from None


def load_stack(path: str | Path | None = None) -> StackConfig:
    path = Path(path) if path else DEFAULT_STACK
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("stack", f"no stack file at {path}",
                          fix="pass --stack FILE (deploy/lmx.toml is the example)") from None
    except OSError as exc:
        raise ConfigError("stack", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("stack", f"{path} is not valid TOML: {exc}") from None
    unknown = set(doc) - {"admission", "kvstore", "worker", "front"}
    if unknown:
        raise ConfigError("stack", f"{path}: unknown table(s) {', '.join(sorted(unknown))}",
                          fix="the tables are [admission], [kvstore], [[worker]] and [front]")
    for name in ("admission", "kvstore", "front"):
        if name in doc and not isinstance(doc[name], dict):
            raise ConfigError("stack", f"{path}: {name} must be a table",
                              fix=f"write its settings under a [{name}] line")
    workers_doc = doc.get("worker", [])
    if not isinstance(workers_doc, list) or not all(isinstance(w, dict) for w in workers_doc):
        raise ConfigError("stack", f"{path}: worker must be an array of tables",
                          fix="write each worker under its own [[worker]] line")

    admission = _service("admission", "services.admission", "lmx.v1.AdmissionService",
                         doc.get("admission", {}), "[admission]", [])
    kvstore = None
    if doc.get("kvstore", {}) is not False:
        kvstore = _service("kvstore", "services.kvstore", "lmx.v1.KVStoreService",
                           doc.get("kvstore", {}), "[kvstore]", [])
    workers = []
    names: set[str] = set()
    for index, table in enumerate(workers_doc):
        where = f"[[worker]] #{index + 1}"
        if "model" not in table:
            raise ConfigError(where, "names no model", fix='add model = "smollm2-135m"')
        extra = []
        if "admission" not in table:
            extra += ["--admission", admission.listen]
        if "kvstore" not in table and kvstore is not None:
            extra += ["--kvstore", kvstore.listen]
        name = f"worker-{str(table['model']).replace(':', '-').replace('/', '-')}"
        while name in names:
            name += "-2"
        names.add(name)
        workers.append(_service(name, "services.worker", "lmx.v1.WorkerService", table, where,
                                extra))
    front = None
    if "front" in doc:
        table = doc["front"]
        extra = [] if "admission" in table else ["--admission", admission.listen]
        if "kvstore" not in table and kvstore is not None:
            extra += ["--kvstore", kvstore.listen]
        front = _service("front", "services.front", HTTP_HEALTH, table, "[front]", extra)
    listens = [s.listen for s in (admission, kvstore, *workers, front) if s is not None]
    taken = {x for x in listens if listens.count(x) > 1}
    if taken:
        raise ConfigError("stack", f"{path}: two services listen on {', '.join(sorted(taken))}",
                          fix="give each its own listen address")
    return StackConfig(path, admission, kvstore, tuple(workers), front)
