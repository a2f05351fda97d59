"""The gateway's TOML config file, validated by pydantic.

Sections: [gateway], [servers.NAME], [grants.NAME], [eventlog], [store], [[alerts.rules]],
[[alerts.sinks]] (schemas/alerts.py), [telemetry].
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

from schemas.alerts import AlertsSection

log = logging.getLogger("ledgergate.config")

ENV_PREFIX = "LEDGERGATE_"


class ConfigError(Exception):
    """``path: key: reason``; a value that came from an environment variable names the
    variable instead of the file (``environment variable LEDGERGATE_GATEWAY_LISTEN
    (gateway.listen): reason``), since editing the file would not fix it."""

    def __init__(self, path: str | Path, key: str, reason: str, env_var: str | None = None) -> None:
        self.path, self.key, self.reason, self.env_var = str(path), key, reason, env_var
        if env_var:
            where = f"environment variable {env_var} ({key}): "
        else:
            where = f"{self.path}: {key}: " if key else f"{self.path}: "
        super().__init__(where + reason)


class ConfigErrors(ConfigError):
    """Every error of one config (``check`` reports them all); behaves as the first one."""

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.path, first.key, first.reason, first.env_var)
        self.errors = errors


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
    # the HTTP edge toward agents (README "Security and limits")
    header_timeout_s: float = Field(15.0, gt=0, description="first byte of a request head -> its end")
    body_timeout_s: float = Field(30.0, gt=0, description="end of the head -> end of the body")
    keepalive_timeout_s: float = Field(75.0, gt=0, description="idle time between requests")
    max_connections: int = Field(1024, gt=0, description="open agent connections; beyond: 503")
    max_header_line_bytes: int = Field(8192, ge=256, le=65536, description="one header line")
    max_headers: int = Field(100, gt=0, le=1000, description="header lines in one request")
    max_sessions_per_grant: int = Field(256, gt=0, description="open MCP sessions per grant; beyond: 429")
    max_inflight_per_grant: int = Field(64, gt=0, description="concurrent POSTs per grant; beyond: 429")
    max_upstream_head_bytes: int = Field(64 * 1024, gt=0, description="an upstream answer's head")
    max_upstream_body_bytes: int = Field(
        16 << 20, gt=0, description="an upstream JSON answer, and one SSE event"
    )
    auth_failure_interval_s: float = Field(
        1.0, gt=0, description="auth.failed events: at most one per (address, server, reason) per interval"
    )
    auth_failure_max_keys: int = Field(
        1024, gt=0, description="(address, server, reason) keys tracked; beyond, one bucket per reason"
    )
    metrics_listen: str | None = Field(
        None, description="HOST:PORT serving only GET /metrics, without authentication"
    )
    # stdio upstreams and shutdown (README "Security and limits", "Failure modes")
    stream_queue_bytes: int = Field(
        4 << 20,
        gt=0,
        description="bytes queued toward one client stream of a stdio upstream; beyond: disconnected",
    )
    stream_queue_messages: int = Field(
        2048, gt=0, description="messages queued toward one client stream of a stdio upstream"
    )
    stdio_max_consecutive_timeouts: int = Field(
        3, gt=0, description="calls in a row a stdio child may time out before it is killed and restarted"
    )
    stdio_max_stdin_bytes: int = Field(
        8 << 20, gt=0, description="bytes waiting to be written to a stdio child; beyond: the child is hung"
    )
    drain_timeout_s: float = Field(
        10.0, ge=0, description="on SIGTERM, how long calls in flight may finish before they are cut"
    )

    @field_validator("listen", "metrics_listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is None:
            return v
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
    max_consecutive_timeouts: int | None = Field(
        None, gt=0, description="stdio: overrides [gateway] stdio_max_consecutive_timeouts"
    )
    redact: list[str] = Field(
        default_factory=list, description="argument key paths masked in the audit trail for every tool"
    )
    validate_upstream_schema: bool = Field(
        False, description="also refuse calls whose arguments break the upstream's own inputSchema"
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
    run_consumers: bool | None = Field(
        None,
        description="run the audit and counters consumers inside `ledgergate run` (default: yes with the "
        "embedded log; no with kafka, where `ledgergate consume audit|counters|alerts` processes run them)",
    )

    @property
    def consumers_in_gateway(self) -> bool:
        """Whether this deployment folds the log into the store inside the gateway process
        (and the CLI folds what is missing itself), or leaves it to `ledgergate consume`."""
        if self.run_consumers is None:
            return self.backend == "embedded"
        return self.run_consumers

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
    # a ClickHouse server's user and password (or CLICKHOUSE_USER / CLICKHOUSE_PASSWORD in the
    # environment; a user:password@ in the URL wins); keep the password in the environment
    user: str | None = None
    password: str | None = None
    # limits on each forensic query (POST /admin/audit/sql, `ledgergate audit sql`)
    query_timeout_s: float = Field(30.0, gt=0, description="max_execution_time of a forensic query")
    query_max_rows: int = Field(100_000, gt=0, description="rows beyond are cut; the answer says so")
    query_max_bytes: int = Field(64 << 20, gt=0, description="max_result_bytes of a forensic query")
    query_max_memory: int = Field(1 << 30, gt=0, description="max_memory_usage of a forensic query")
    # the tables are checked against the log at start-up and then every this many seconds (0: start-up only)
    check_interval_s: float = Field(300.0, ge=0, description="projection check interval")

    def credentials(self, environ: dict[str, str] | None = None) -> tuple[str | None, str | None]:
        """(user, password) for a ClickHouse server: these keys (LEDGERGATE_STORE_USER /
        LEDGERGATE_STORE_PASSWORD), else CLICKHOUSE_USER / CLICKHOUSE_PASSWORD."""
        env = os.environ if environ is None else environ
        user = self.user if self.user is not None else env.get("CLICKHOUSE_USER")
        password = self.password if self.password is not None else env.get("CLICKHOUSE_PASSWORD")
        return user, password


class TelemetrySection(_Section):
    """OpenTelemetry traces: off (nothing imported, nothing paid per call) unless otlp_endpoint."""

    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces endpoint, e.g. http://127.0.0.1:4318/v1/traces"
    )
    service_name: str = "ledgergate"

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v


class Config(_Section):
    gateway: GatewaySection = Field(default_factory=GatewaySection)
    servers: dict[str, ServerSection] = Field(default_factory=dict)
    grants: dict[str, GrantSection] = Field(default_factory=dict)
    eventlog: EventlogSection = Field(default_factory=EventlogSection)
    store: StoreSection = Field(default_factory=StoreSection)
    alerts: AlertsSection = Field(default_factory=AlertsSection)
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)

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


_ENV_SECTIONS = {
    "gateway": GatewaySection,
    "eventlog": EventlogSection,
    "store": StoreSection,
    "telemetry": TelemetrySection,
}


def _env_overrides(data: dict[str, Any], environ: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Apply LEDGERGATE_<SECTION>_<KEY> to ``data``. Returns (key path -> variable name) of
    the overrides applied, and the variables naming a known section but an unknown key."""
    applied: dict[str, str] = {}
    unknown: list[str] = []
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        for section, model in _ENV_SECTIONS.items():
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1 :]
                if key in model.model_fields:
                    data.setdefault(section, {})[key] = _env_value(value)
                    applied[f"{section}.{key}"] = name
                else:
                    unknown.append(name)
                break
    return applied, sorted(unknown)


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


def _fields(loc: tuple[int | str, ...]) -> list[str]:
    """The valid keys at the place of an unknown key ``loc`` (for "did you mean ...?")."""
    sections: dict[str, type[BaseModel]] = {**_ENV_SECTIONS, "servers": ServerSection, "grants": GrantSection}
    if len(loc) == 1:
        return [f for f in Config.model_fields if f != "source"]
    model = sections.get(str(loc[0]))
    if model is None or len(loc) != (3 if loc[0] in ("servers", "grants") else 2):
        return []
    return list(model.model_fields)


def nearest(word: str, choices: list[str]) -> str | None:
    """The valid key closest to a misspelt one, if any is close (difflib ratio >= 0.6)."""
    import difflib

    near = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return near[0] if near else None


def suggest(word: str, choices: list[str]) -> str:
    """ " (did you mean listen?)" for the nearest valid key, or ""."""
    near = nearest(word, choices)
    return f" (did you mean {near}?)" if near else ""


def config_errors(
    data: dict[str, Any], source: Path, environ: dict[str, str] | None = None
) -> tuple[Config | None, list[ConfigError]]:
    """Validate ``data`` (the parsed TOML) with the environment overrides applied and return
    the config (None when it does not validate) and EVERY error found, each naming its key
    path and its origin: the file, or the environment variable the value came from."""
    applied, unknown_env = _env_overrides(data, dict(os.environ) if environ is None else environ)
    errors: list[ConfigError] = []
    for var in unknown_env:
        section = next(s for s in _ENV_SECTIONS if var[len(ENV_PREFIX) :].lower().startswith(s + "_"))
        key = var[len(ENV_PREFIX) + len(section) + 1 :].lower()
        near = nearest(key, list(_ENV_SECTIONS[section].model_fields))
        hint = f" (did you mean {ENV_PREFIX}{section.upper()}_{near.upper()}?)" if near else ""
        errors.append(ConfigError(source, f"{section}.{key}", f"unknown key of [{section}]{hint}", var))
    cfg: Config | None = None
    for attempt in range(8):
        try:
            cfg = Config.model_validate(data)
            break
        except ValidationError as exc:
            for err in exc.errors():
                # drop pydantic's internal "function-after[...]" location parts
                loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p and "(" in p))
                if attempt == 0:
                    msg = err["msg"].removeprefix("Value error, ")
                    if err["type"] == "extra_forbidden":
                        msg = "unknown key" + suggest(str(loc[-1]), _fields(loc))
                    key = _key_path(loc)
                    errors.append(ConfigError(source, key, msg, applied.get(key)))
                _drop(data, loc)
    if cfg is None:
        return None, errors
    # with errors, cfg is what remains once the broken keys are dropped (defaults instead):
    # enough for the checks below and for `check` to go on reporting the rest
    cfg.source = source.resolve()
    if not cfg.servers:
        errors.append(ConfigError(source, "servers", "define at least one [servers.NAME] section"))
    for name in cfg.servers:
        if not cfg.policy_path(name).is_file():
            errors.append(
                ConfigError(source, f"servers.{name}.policy", f"no such file: {cfg.policy_path(name)}")
            )
    digests: dict[str, str] = {}
    for name, grant in cfg.grants.items():
        if grant.digest in digests:
            errors.append(
                ConfigError(source, f"grants.{name}", f"same key as grants.{digests[grant.digest]}")
            )
        digests[grant.digest] = name
    return cfg, errors


def _drop(data: dict[str, Any], loc: tuple[int | str, ...]) -> None:
    """Remove the key at ``loc`` (or its parent when the key itself is missing)."""
    node: Any = data
    for part in loc[:-1]:
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    if isinstance(node, dict) and loc and loc[-1] in node:
        del node[loc[-1]]
    elif len(loc) > 1:
        _drop(data, loc[:-1])


def parse_config(data: dict[str, Any], source: Path, environ: dict[str, str] | None = None) -> Config:
    cfg, errors = config_errors(data, source, environ)
    if errors:
        raise ConfigErrors(errors)
    assert cfg is not None
    return cfg


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror}") from None
    try:
        return tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"invalid TOML: {exc}") from None


def load_config(path: str | Path, environ: dict[str, str] | None = None) -> Config:
    return parse_config(read_toml(path), Path(path), environ)


def stdio_program(cfg: Config, server: str) -> str:
    """The program a stdio server runs, resolved as the gateway spawns it: a path with a
    slash (relative to the config folder), else looked up on the PATH the child gets
    (the server's ``env`` may set its own PATH). The bare name when not found."""
    argv = cfg.command(server)
    if "/" in argv[0]:
        return argv[0]
    import shutil

    path = {**os.environ, **cfg.servers[server].env}.get("PATH", os.defpath)
    return shutil.which(argv[0], path=path) or argv[0]


def stdio_command_problem(cfg: Config, server: str) -> str | None:
    """Why the gateway could not start the server's command (None if it can exec it)."""
    program = stdio_program(cfg, server)
    if "/" not in program:
        return f"{program!r} is not on the PATH"
    p = Path(program)
    if not p.exists():
        return f"{program} does not exist"
    if p.is_dir():
        return f"{program} is a directory, not a program"
    if not os.access(p, os.X_OK):
        return f"{program} is not executable (chmod +x?)"
    return None
