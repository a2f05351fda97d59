-- ledgergate security events (written by consumers/audit.py, read by consumers/forensics.py).
--
-- auth.failed, admin.query and admin.reload payloads go as-is (JSONEachRow) into the
-- Null-engine table security_events_in; materialized views route each kind into its table.
-- Same idempotence rule as 001_audit.sql: ReplacingMergeTree whose key ends with
-- event_id, read with FINAL. Statements are separated by a semicolon at the end of a line.

CREATE TABLE IF NOT EXISTS security_events_in
(
    schema_version UInt16,
    kind           String,
    event_id       String,
    ts             Int64,
    gateway        String,
    remote         String,
    server         String,
    reason         String,
    `count`        UInt64,
    first_ts       Int64,
    last_ts        Int64,
    overflow       Nullable(Bool),
    question       String,
    `sql`          String,
    params         String,
    filters        String,
    caller         String,
    outcome        String,
    status         Nullable(Int32),
    error          String,
    message        String,
    row_count      Nullable(UInt64),
    duration_ms    Float64,
    results        String
)
ENGINE = Null;

-- auth.failed: requests refused for their credentials, `count` failures per event
-- (aggregated per remote, server, reason and interval). Never any key material.
CREATE TABLE IF NOT EXISTS audit_auth_failures
(
    event_id       String,
    ts             DateTime64(3, 'UTC'),
    gateway        LowCardinality(String),
    remote         String,
    server         String,
    reason         LowCardinality(String),
    `count`        UInt64,
    first_ts       DateTime64(3, 'UTC'),
    last_ts        DateTime64(3, 'UTC'),
    overflow       Bool,
    schema_version UInt16
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (remote, server, ts, event_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS audit_auth_failures_mv TO audit_auth_failures AS
SELECT
    event_id, fromUnixTimestamp64Milli(ts, 'UTC') AS ts, gateway, remote, server, reason, `count`,
    fromUnixTimestamp64Milli(first_ts, 'UTC') AS first_ts,
    fromUnixTimestamp64Milli(last_ts, 'UTC') AS last_ts,
    ifNull(overflow, false) AS overflow, schema_version
FROM security_events_in
WHERE kind = 'auth.failed';

-- admin.query / admin.reload: who asked the admin API (or the local CLI) what, and how
-- it ended. `question` is who / calls / denials / sql ('' for admin.reload).
CREATE TABLE IF NOT EXISTS audit_admin
(
    event_id       String,
    ts             DateTime64(3, 'UTC'),
    kind           LowCardinality(String),
    gateway        LowCardinality(String),
    question       LowCardinality(String),
    `sql`          String CODEC(ZSTD(1)),
    params         String CODEC(ZSTD(1)),
    filters        String,
    caller         LowCardinality(String),
    remote         String,
    outcome        LowCardinality(String),
    status         Nullable(Int32),
    error          LowCardinality(String),
    message        String,
    row_count      Nullable(UInt64),
    duration_ms    Float64,
    results        String,
    schema_version UInt16
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (ts, event_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS audit_admin_mv TO audit_admin AS
SELECT
    event_id, fromUnixTimestamp64Milli(ts, 'UTC') AS ts, kind, gateway, question, `sql`, params,
    filters, caller, remote, outcome, status, error, message, row_count, duration_ms, results,
    schema_version
FROM security_events_in
WHERE kind IN ('admin.query', 'admin.reload');
