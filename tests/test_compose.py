"""compose.yaml and the Dockerfile, checked without a Docker engine (none on these machines):
the file parses, every service's command and flags exist in the real CLI (its --help), every
LEDGERGATE_* name is a config key, the gateway's config validates with the service's
environment, and the Dockerfile's RUN steps are the README's install steps."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import _ENV_SECTIONS, ENV_PREFIX, config_errors, read_toml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
LEDGERGATE = [n for n, s in SERVICES.items() if str(s.get("image", "")).startswith("ledgergate")]


def test_compose_has_the_services_healthchecks_and_volumes() -> None:
    assert {"kafka", "clickhouse", "gateway", "consume-audit", "consume-counters", "consume-alerts"} <= set(
        SERVICES
    )
    assert SERVICES["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    for name in ("kafka", "clickhouse", "gateway", "gateway-2"):
        assert SERVICES[name]["healthcheck"]["test"], name
    declared = set(COMPOSE["volumes"])
    for name, svc in SERVICES.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            assert source in declared, f"{name}: volume {source} is not declared"
    for name in ("gateway", "gateway-2"):
        env = SERVICES[name]["environment"]
        assert env["LEDGERGATE_GATEWAY_ADMIN_TOKEN"].startswith("${"), (
            "the admin token comes from the environment"
        )
    ids = {SERVICES[n]["environment"]["LEDGERGATE_GATEWAY_INSTANCE_ID"] for n in ("gateway", "gateway-2")}
    assert len(ids) == 2, "replicas need distinct instance ids (each folds the others' calls)"


@cache
def cli_help(*words: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "ledgergate", *words, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, f"ledgergate {' '.join(words)} --help: {r.stderr}"
    return r.stdout


def _command(name: str) -> list[str]:
    svc = SERVICES[name]
    cmd = svc.get("command")
    if cmd is None:  # the image's CMD
        text = (ROOT / "Dockerfile").read_text()
        cmd = yaml.safe_load(re.search(r"^CMD (.*)$", text, re.M).group(1))  # type: ignore[union-attr]
    return [str(c) for c in cmd]


@pytest.mark.parametrize("name", LEDGERGATE)
def test_every_command_and_flag_exists_in_the_cli(name: str) -> None:
    assert "ledgergate" in (ROOT / "Dockerfile").read_text().split("ENTRYPOINT", 1)[1].splitlines()[0]
    cmd = _command(name)
    sub = cmd[0]
    assert (
        re.search(rf"^\s+{sub}\b", cli_help(), re.M) or f",{sub}," in cli_help() or f"{{{sub}" in cli_help()
    )
    text = cli_help(sub)
    flags = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text))
    positional = 0
    i = 1
    while i < len(cmd):
        word = cmd[i]
        if word.startswith("-"):
            assert word in flags, f"{name}: ledgergate {sub} has no flag {word}"
            i += 2  # every flag used here takes a value
        else:
            # a positional: one of the choices the help lists (consume's kind)
            choices = re.search(r"\{([\w,]+)\}", text)
            assert choices and word in choices.group(1).split(","), f"{name}: {word} is not a {sub} choice"
            positional += 1
            i += 1
    assert positional <= 1


def _env(svc: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (svc.get("environment") or {}).items()}


@pytest.mark.parametrize("name", LEDGERGATE)
def test_environment_names_are_config_keys(name: str) -> None:
    env = _env(SERVICES[name])
    names = [k for k in env if k.startswith(ENV_PREFIX)]
    assert names
    for var in names:
        rest = var[len(ENV_PREFIX) :].lower()
        section = next((s for s in _ENV_SECTIONS if rest.startswith(s + "_")), None)
        assert section is not None, f"{name}: {var} names no config section"
        key = rest[len(section) + 1 :]
        assert key in _ENV_SECTIONS[section].model_fields, f"{name}: {var}: [{section}] has no key {key}"
    # and the values validate: the config the service runs with, with its environment
    cmd = _command(name)
    config = cmd[cmd.index("-c") + 1]
    values = {k: ("x" * 16 if v.startswith("${") else v) for k, v in env.items()}
    cfg, errors = config_errors(read_toml(ROOT / config), ROOT / config, values)
    assert not errors and cfg is not None, errors
    assert cfg.eventlog.backend == "kafka" and cfg.store.clickhouse.startswith("http://")
    assert not cfg.eventlog.consumers_in_gateway, "the consume services fold the log, not the gateway"
    assert cfg.store.credentials(values)[0] == "ledgergate"


def _readme_install() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Install (what the Dockerfile does)", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [ln.strip() for ln in block.splitlines() if ln.strip()]


def test_dockerfile_steps_are_the_readme_install_steps() -> None:
    runs = re.findall(r"^RUN (.+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert runs == _readme_install()
    # what the steps install from is in the image
    copied = " ".join(re.findall(r"^COPY (.+)$", (ROOT / "Dockerfile").read_text(), re.M))
    for needed in ("pyproject.toml", "scripts", "examples", "gateway", "consumers", "eventlog", "ledgergate"):
        assert needed in copied, needed
