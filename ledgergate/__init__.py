"""The composition root: the only package that imports both `gateway` and `consumers`.

`embedded` wires the event log, the ClickHouse store, the consumers and the gateway app into one
process (`ledgergate run`); `cli` is the command line (`ledgergate ...`).
"""
