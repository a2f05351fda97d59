-- How far the log reached, as the store saw it (written by consumers/runner.py, read at
-- start-up by ledgergate/embedded.py). One row per stored batch: `next_offset` is the offset
-- after the batch's last record, `ts_ms` the wall time of the insert. If the log later ends
-- below the highest next_offset seen since the last acknowledged gap, the log went backwards
-- (records lost, e.g. a deleted WAL): the gateway says so and refuses to serve in strict mode
-- until an operator accepts the gap. An accepted gap writes a row with consumer '(log.gap)':
-- rows older than it no longer count.

CREATE TABLE IF NOT EXISTS log_positions
(
    consumer    LowCardinality(String),
    next_offset UInt64,
    ts_ms       UInt64
)
ENGINE = MergeTree
ORDER BY (consumer, ts_ms)
TTL toDateTime(intDiv(ts_ms, 1000)) + INTERVAL 90 DAY;
