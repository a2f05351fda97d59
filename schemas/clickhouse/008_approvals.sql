-- ledgergate held calls (approvals) and config reloads (written by consumers/audit.py).
--
-- approval.requested, approval.resolved and config.loaded payloads go as-is (JSONEachRow)
-- into the Null-engine table approval_events_in; materialized views route them. Requests and
-- resolutions are keyed by approval_id (one row each under FINAL, also after a replay).
-- Statements are separated by a semicolon at the end of a line.
--
-- "Who approved what last week, and how long did the agents wait?"
--   SELECT q.ts, q.server, q.tool, q.agent, r.outcome, r.by, r.comment, r.waited_ms
--   FROM audit_approval_requests AS q FINAL LEFT JOIN audit_approval_resolutions AS r FINAL
--   USING approval_id WHERE q.ts >= now() - INTERVAL 7 DAY ORDER BY q.ts

CREATE TABLE IF NOT EXISTS approval_events_in
(
    schema_version      UInt16,
    kind                String,
    event_id            String,
    ts                  Int64,
    gateway             String,
    approval_id         String,
    call_id             String,
    server              String,
    tool                String,
    `grant`             String,
    agent               String,
    session             String,
    arguments           String,
    args_sha256         String,
    rule                String,
    timeout_s           Float64,
    expires_ts          Int64,
    remember_s          Int64,
    outcome             String,
    by                  String,
    comment             String,
    resolved_ts         Int64,
    waited_ms           Int64,
    remembered_until_ts Nullable(Int64),
    path                String,
    config_sha256       String,
    ok                  Bool,
    error               String,
    applied             String,
    restart_needed      String
)
ENGINE = Null;

-- approval.requested: one row per held call (arguments after redaction, as JSON text)
CREATE TABLE IF NOT EXISTS audit_approval_requests
(
    approval_id    String,
    ts             DateTime64(3, 'UTC'),
    event_id       String,
    gateway        LowCardinality(String),
    call_id        String,
    server         LowCardinality(String),
    tool           LowCardinality(String),
    `grant`        LowCardinality(String),
    agent          LowCardinality(String),
    session        String,
    arguments      String CODEC(ZSTD(1)),
    args_sha256    String,
    rule           String,
    timeout_s      Float64,
    expires_ts     DateTime64(3, 'UTC'),
    remember_s     Int64,
    schema_version UInt16
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (approval_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS audit_approval_requests_mv TO audit_approval_requests AS
SELECT
    approval_id, fromUnixTimestamp64Milli(ts, 'UTC') AS ts, event_id, gateway, call_id, server, tool,
    `grant`, agent, session, arguments, args_sha256, rule, timeout_s,
    fromUnixTimestamp64Milli(expires_ts, 'UTC') AS expires_ts, remember_s, schema_version
FROM approval_events_in
WHERE kind = 'approval.requested';

-- approval.resolved: approved / denied (by whom, with what comment), timed out, cancelled
CREATE TABLE IF NOT EXISTS audit_approval_resolutions
(
    approval_id         String,
    ts                  DateTime64(3, 'UTC'),
    event_id            String,
    gateway             LowCardinality(String),
    call_id             String,
    server              LowCardinality(String),
    tool                LowCardinality(String),
    `grant`             LowCardinality(String),
    agent               LowCardinality(String),
    outcome             LowCardinality(String),
    by                  String,
    comment             String,
    resolved_ts         DateTime64(3, 'UTC'),
    waited_ms           Int64,
    remembered_until_ts Nullable(DateTime64(3, 'UTC')),
    schema_version      UInt16
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (approval_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS audit_approval_resolutions_mv TO audit_approval_resolutions AS
SELECT
    approval_id, fromUnixTimestamp64Milli(ts, 'UTC') AS ts, event_id, gateway, call_id, server, tool,
    `grant`, agent, outcome, by, comment, fromUnixTimestamp64Milli(resolved_ts, 'UTC') AS resolved_ts,
    waited_ms, fromUnixTimestamp64Milli(remembered_until_ts, 'UTC') AS remembered_until_ts,
    schema_version
FROM approval_events_in
WHERE kind = 'approval.resolved';

-- config.loaded: each (re)load of the config file, what applied and what needs a restart
CREATE TABLE IF NOT EXISTS audit_config_loads
(
    ts             DateTime64(3, 'UTC'),
    event_id       String,
    gateway        LowCardinality(String),
    path           String,
    config_sha256  String,
    ok             Bool,
    error          String,
    applied        String,
    restart_needed String,
    schema_version UInt16
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (ts, event_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS audit_config_loads_mv TO audit_config_loads AS
SELECT
    fromUnixTimestamp64Milli(ts, 'UTC') AS ts, event_id, gateway, path, config_sha256, ok, error,
    applied, restart_needed, schema_version
FROM approval_events_in
WHERE kind = 'config.loaded';
