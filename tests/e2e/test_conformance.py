"""Transparency yardstick: the official MCP conformance suite passes through the gateway
exactly as it passes directly against the same upstream, in the same run.

suite -> inject_auth (adds the bearer key the suite cannot send) -> `ledgergate run`
(a real process, default-allow policy) -> the conformance upstream (official TS SDK).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.run_conformance import EXPECTED_ACTIVE, run_scenarios, summary
from tests.support.gateway import start_gateway_process, write_config
from tests.support.procs import free_port, start_process, stop_process, wait_tcp

KEY = "key-conformance-0123456789"
INJECT = Path(__file__).resolve().parents[1] / "conformance" / "inject_auth.py"


@pytest.fixture(scope="module")
def through_gateway(conformance_upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("conformance-gateway")
    cfg = write_config(
        tmp,
        servers={"conformance": {"url": conformance_upstream}},
        policies={"conformance": {"version": "1", "default": "allow"}},
        grants={"suite": KEY},
    )
    gw, base = start_gateway_process(cfg, tmp / "gateway.log")
    port = free_port()
    front = start_process(
        [sys.executable, str(INJECT), f"{base}/mcp/conformance", str(port), KEY], log_path=tmp / "inject.log"
    )
    try:
        wait_tcp("127.0.0.1", port, timeout=30, handle=front)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        stop_process(front)
        stop_process(gw)


@pytest.mark.conformance
def test_conformance_through_gateway_equals_direct(
    conformance_upstream: str, through_gateway: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    direct = run_scenarios(conformance_upstream, tmp_path_factory.mktemp("conf-direct"))
    proxied = run_scenarios(through_gateway, tmp_path_factory.mktemp("conf-gateway"))
    print("\ndirect:\n" + summary(direct) + "\nthrough the gateway:\n" + summary(proxied))
    passed_direct = {s for s, (ok, _) in direct.items() if ok}
    passed_proxied = {s for s, (ok, _) in proxied.items() if ok}
    assert set(direct) == set(EXPECTED_ACTIVE) == set(proxied)
    assert passed_direct == set(EXPECTED_ACTIVE), summary(direct)
    failures = {s: d for s, (ok, d) in proxied.items() if not ok}
    assert passed_proxied == passed_direct, failures
