"""Fixtures shared by the whole suite: real upstream processes and the ClickHouse server."""

pytest_plugins = [
    "tests.support.upstreams",
    "tests.support.clickhouse",
]
