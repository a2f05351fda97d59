"""The gateway's TOML config file, validated by pydantic.

Sections: [gateway], [servers.NAME], [grants.NAME], [eventlog], [store].
Relative paths (policy files, data_dir, a server command's program) are resolved
against the config file's folder. Environment variables LEDGERGATE_<SECTION>_<KEY>
override scalar keys of the [gateway], [eventlog] and [store] sections.
Errors name the file, the key path and the reason (ConfigError).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger("ledgergate.config")

ENV_PREFIX = "LEDGERGATE_"


class ConfigError(Exception):
    def __init__(self, path: str | Path, key: str, reason: str) -> None:
        self.path, self.key, self.reason = str(path), key, reason
        where = f"{self.path}: {key}: " if key else f"{self.path}: "
        super().__init__(where + reason)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GatewaySection(_Section):
    listen: str = "127.0.0.1:8080"
    data_dir: str = ".ledgergate"
    max_body_bytes: int = Field(1 << 20, gt=0)
    upstream_timeout_s: float = Field(60.0, gt=0, description="idle time without a message from the upstream")
    session_idle_timeout_s: float = Field(1800.0, gt=0)
    admin_token: str | None = None
    allowed_hosts: list[str] = Field(default_factory=list, description="Host names accepted besides loopback")
    allowed_origins: list[str] = Field(default_factory=list, description="Origins accepted besides loopback")
    instance_id: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8080")
        return v

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class ServerSection(_Section):
    url: str | None = None
    command: list[str] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    policy: str
    redact: list[str] = Field(
        default_factory=list, description="argument key paths masked in the audit trail for every tool"
    )

    @model_validator(mode="after")
    def _one_transport(self) -> ServerSection:
        if (self.url is None) == (self.command is None):
            raise ValueError('give exactly one of url = "http://.../mcp" or command = [...]')
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        if self.command is not None and not self.command:
            raise ValueError("command must not be empty")
        return self

    @property
    def transport(self) -> Literal["http", "stdio"]:
        return "http" if self.url else "stdio"


class GrantSection(_Section):
    key_sha256: str | None = None
    key: str | None = None
    agent: str | None = None

    @model_validator(mode="after")
    def _one_key(self) -> GrantSection:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError('give exactly one of key_sha256 = "..." or key = "..." (demos only)')
        if self.key_sha256 is not None:
            h = self.key_sha256.lower()
            if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise ValueError("key_sha256 must be 64 hex characters")
            self.key_sha256 = h
        return self

    @property
    def digest(self) -> str:
        if self.key_sha256 is not None:
            return self.key_sha256
        assert self.key is not None
        return hashlib.sha256(self.key.encode()).hexdigest()


class EventlogSection(_Section):
    backend: Literal["embedded", "kafka"] = "embedded"
    durability: Literal["strict", "batched"] = "strict"
    flush_interval_ms: float = Field(5.0, gt=0)
    # backend = "kafka"
    bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, HOST:PORT[,HOST:PORT...]")
    topic: str = "ledgergate.decisions"
    partitions: int = Field(6, gt=0, description="partitions of the topic when ledgergate creates it")
    replication: int = Field(1, gt=0, description="replication factor of the topic if ledgergate creates it")
    spool_after_ms: float = Field(
        1000.0, gt=0, description="no broker ack within this: decisions go to the spool (data_dir/spool.db)"
    )

    def open_log_options(self) -> dict[str, object]:
        """Keyword arguments of eventlog.open_log for this section."""
        if self.backend != "kafka":
            return {}
        return {
            "bootstrap": self.bootstrap,
            "topic": self.topic,
            "partitions": self.partitions,
            "replication": self.replication,
            "spool_after_ms": self.spool_after_ms,
        }


class StoreSection(_Section):
    clickhouse: str = "embedded"


class Config(_Section):
    gateway: GatewaySection = Field(default_factory=GatewaySection)
    servers: dict[str, ServerSection] = Field(default_factory=dict)
    grants: dict[str, GrantSection] = Field(default_factory=dict)
    eventlog: EventlogSection = Field(default_factory=EventlogSection)
    store: StoreSection = Field(default_factory=StoreSection)

    # set by load_config, not by the file
    source: Path = Path("ledgergate.toml")

    def resolve(self, relative: str) -> Path:
        p = Path(relative).expanduser()
        return p if p.is_absolute() else (self.source.parent / p).resolve()

    @property
    def data_dir(self) -> Path:
        return self.resolve(self.gateway.data_dir)

    def policy_path(self, server: str) -> Path:
        return self.resolve(self.servers[server].policy)

    def command(self, server: str) -> list[str]:
        """The server's argv with a relative program path resolved against the config folder."""
        argv = list(self.servers[server].command or [])
        if argv and "/" in argv[0] and not Path(argv[0]).is_absolute():
            argv[0] = str(self.resolve(argv[0]))
        return argv


_ENV_SECTIONS = {"gateway": GatewaySection, "eventlog": EventlogSection, "store": StoreSection}


def _env_overrides(data: dict[str, Any], environ: dict[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        for section, model in _ENV_SECTIONS.items():
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1 :]
                if key in model.model_fields:
                    data.setdefault(section, {})[key] = _env_value(value)
                break


def _env_value(raw: str) -> Any:
    if raw.startswith(("[", "{")):
        import orjson

        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw
    return raw


def _key_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts)


def parse_config(data: dict[str, Any], source: Path, environ: dict[str, str] | None = None) -> Config:
    _env_overrides(data, dict(os.environ) if environ is None else environ)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        # drop pydantic's internal "function-after[...]" location parts
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p and "(" in p))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise ConfigError(source, _key_path(loc), msg) from None
    cfg.source = source.resolve()
    if not cfg.servers:
        raise ConfigError(source, "servers", "define at least one [servers.NAME] section")
    for name in cfg.servers:
        if not cfg.policy_path(name).is_file():
            raise ConfigError(source, f"servers.{name}.policy", f"no such file: {cfg.policy_path(name)}")
    digests: dict[str, str] = {}
    for name, grant in cfg.grants.items():
        if grant.digest in digests:
            raise ConfigError(source, f"grants.{name}", f"same key as grants.{digests[grant.digest]}")
        digests[grant.digest] = name
    return cfg


def load_config(path: str | Path, environ: dict[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"invalid TOML: {exc}") from None
    return parse_config(data, path, environ)
