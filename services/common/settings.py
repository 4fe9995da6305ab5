"""One loader for every service's frozen settings dataclass.

Each field of a settings dataclass can be set, from weakest to strongest, by
its default, a TOML file (`--config FILE` or LMX_CONFIG, table named after the
service), the environment (`LMX_<SERVICE>_<FIELD>`) and a command-line flag
(`--field-name`). Values are parsed and validated once, at start; nothing
reads the environment at import time.

Field metadata: `help` (str), `flag` (the flag's name when not the field's),
`parse` (str -> value), `repeat` (a tuple of
values: the flag may be given several times, the environment variable holds a
comma-separated list, TOML an array).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from services.common.errors import ConfigError
from services.common.units import parse_bytes

T = TypeVar("T")


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _parser_for(field: dataclasses.Field) -> Any:
    parse = field.metadata.get("parse")
    if parse is not None:
        return parse
    if field.type in (bool, "bool"):
        return _parse_bool
    if field.type in (int, "int"):
        return int
    if field.type in (float, "float"):
        return float
    return str


def _convert(field: dataclasses.Field, raw: Any, origin: str) -> Any:
    parse = _parser_for(field)
    try:
        if field.metadata.get("repeat"):
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            return tuple(parse(item.strip() if isinstance(item, str) else item)
                         for item in items if item != "")
        if isinstance(raw, str) or parse is str:
            return parse(raw)
        # TOML already typed the value; still run it through the parser
        # (parse_bytes accepts ints, float accepts ints).
        return parse(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(field.name, f"bad value {raw!r} from {origin}: {exc}") from None


def _flag(field: dataclasses.Field) -> str:
    return "--" + field.metadata.get("flag", field.name.replace("_", "-"))


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--config", metavar="FILE",
                        help="TOML file with a table for this service (or LMX_CONFIG)")
    # The service's own settings first, then those every server shares.
    shared = {f.name for f in dataclasses.fields(ServerFields)}
    for field in sorted(dataclasses.fields(cls), key=lambda f: f.name in shared):
        flag = _flag(field)
        # argparse formats help with %: a literal one ("90% of") must be doubled.
        help_text = field.metadata.get("help", "").replace("%", "%%")
        default = field.default if field.default is not dataclasses.MISSING else None
        if field.metadata.get("repeat"):
            parser.add_argument(flag, action="append", default=None, dest=field.name,
                                help=f"{help_text} (repeatable)")
        else:
            parser.add_argument(flag, default=None, dest=field.name, help=f"{help_text} [default: {str(default).replace('%', '%%')}]")
    return parser


def load(cls: type[T], service: str, argv: Sequence[str] | None = None,
         environ: Mapping[str, str] | None = None, description: str = "") -> T:
    """Build and validate `cls` for `service` from flags, environment and TOML."""
    environ = os.environ if environ is None else environ
    parser = build_parser(cls, f"lmx {service}", description)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}

    config_path = args.config or environ.get("LMX_CONFIG")
    if config_path:
        try:
            with open(config_path, "rb") as fh:
                table = tomllib.load(fh).get(service, {})
        except OSError as exc:
            raise ConfigError("config", f"cannot read {config_path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{config_path} is not valid TOML: {exc}") from None
        if not isinstance(table, dict):
            raise ConfigError(service, f"{config_path}: {service} must be a table",
                              fix=f"write the settings under a [{service}] line")
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key, raw in table.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"{service}.{key}", f"unknown setting in {config_path}",
                                  fix=f"known: {', '.join(sorted(known))}")
            values[name] = _convert(known[name], raw, config_path)

    prefix = f"LMX_{service.upper()}_"
    for field in dataclasses.fields(cls):
        env_name = prefix + field.name.upper()
        if env_name in environ:
            values[field.name] = _convert(field, environ[env_name], env_name)
        flag_value = getattr(args, field.name)
        if flag_value is not None:
            values[field.name] = _convert(field, flag_value, _flag(field))

    try:
        return cls(**values)
    except ValueError as exc:  # __post_init__ validation that raised plainly
        raise ConfigError(service, str(exc)) from None


@dataclasses.dataclass(frozen=True)
class ServerFields:
    """What every server's settings have besides its own: the largest message,
    TLS and the bearer token (services/common/transport.py). Each service's
    settings class inherits them."""
    max_message_bytes: int = dataclasses.field(default=64 << 20, metadata={
        "help": "largest gRPC message received or sent", "parse": parse_bytes})
    tls_cert: str = dataclasses.field(default="", metadata={
        "help": "serve TLS with this PEM certificate (with --tls-key); clients set LMX_TLS_CA"})
    tls_key: str = dataclasses.field(default="", metadata={
        "help": "the PEM private key of --tls-cert"})
    auth_token_file: str = dataclasses.field(default="", metadata={
        "help": "every lmx RPC needs the token in this file ('authorization: Bearer <token>'); "
                "clients set LMX_AUTH_TOKEN_FILE"})


LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def check_common(settings: Any) -> None:
    """What every service's settings share: listen, grace_s, log_format,
    log_level, max_message_bytes. Called from each settings class's __post_init__."""
    from services.common.units import parse_address

    try:
        parse_address(settings.listen)
    except ValueError as exc:
        raise ConfigError("listen", str(exc)) from None
    if settings.grace_s < 0:
        raise ConfigError("grace_s", "must not be negative")
    from services.common.transport import read_token, server_credentials

    server_credentials(getattr(settings, "tls_cert", ""), getattr(settings, "tls_key", ""))
    if getattr(settings, "auth_token_file", ""):
        read_token(settings.auth_token_file)
    size = getattr(settings, "max_message_bytes", 64 << 20)
    if not (4 << 10) <= size < (2 << 30):
        raise ConfigError("max_message_bytes", f"must be within 4KiB..2GiB, got {size}")
    if settings.log_format not in LOG_FORMATS:
        raise ConfigError("log_format", f"unknown format {settings.log_format!r}",
                          fix=" | ".join(LOG_FORMATS))
    if settings.log_level.lower() not in LOG_LEVELS:
        raise ConfigError("log_level", f"unknown level {settings.log_level!r}",
                          fix=" | ".join(LOG_LEVELS))
