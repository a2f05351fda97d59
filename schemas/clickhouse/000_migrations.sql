-- ledgergate schema migrations: which schemas/clickhouse/NNN_*.sql files a store has applied.
--
-- ensure_schema() (consumers/store/base.py) runs at every start: it creates this table,
-- reads the versions applied, runs the statements of each file not yet recorded (every
-- statement is idempotent, so a start interrupted between a file and its row is harmless)
-- and records it. Several consumers starting at once may both apply a file: idempotent
-- statements and a ReplacingMergeTree keyed by version make that harmless too.

CREATE TABLE IF NOT EXISTS ledgergate_migrations
(
    version     UInt32,
    name        String,
    applied_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY version;
