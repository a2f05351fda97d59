-- ledgergate alerts (written by consumers/audit.py, from the events of consumers/alerts.py).
--
-- alert.fired, alert.delivered and alert.failed payloads go as-is (JSONEachRow) into the
-- Null-engine table alert_events_in; materialized views route them. audit_alerts is keyed
-- by alert_id (derived from rule, group and first event id), so an alert fired again after
-- a crash (same alert_id) collapses into one row under FINAL. Statements are separated by a
-- semicolon at the end of a line.
--
-- "Which alerts fired last week, and were they delivered?"
--   SELECT a.ts, a.rule, a.alert_id, a.count, d.sink, d.kind, d.attempts, d.age_ms
--   FROM audit_alerts AS a FINAL LEFT JOIN audit_alert_deliveries AS d FINAL USING alert_id
--   WHERE a.ts >= now() - INTERVAL 7 DAY ORDER BY a.ts

CREATE TABLE IF NOT EXISTS alert_events_in
(
    schema_version UInt16,
    kind           String,
    event_id       String,
    ts             Int64,
    gateway        String,
    alert_id       String,
    rule           String,
    `on`           String,
    `group`        String,
    `count`        UInt64,
    threshold      UInt64,
    window_s       Float64,
    throttle_s     Nullable(Float64),
    first_event_id String,
    last_event_id  String,
    first_ts       Int64,
    last_ts        Int64,
    summary        Nullable(Bool),
    suppressed     UInt64,
    examples       String,
    evidence       String,
    text           String,
    sinks          String,
    sink           String,
    attempts       UInt32,
    status         Nullable(Int32),
    error          String,
    final          Nullable(Bool),
    age_ms         Float64
)
ENGINE = Null;

-- alert.fired: one row per alert (the document the sinks received, examples as JSON text)
CREATE TABLE IF NOT EXISTS audit_alerts
(
    alert_id       String,
    ts             DateTime64(3, 'UTC'),
    event_id       String,
    gateway        LowCardinality(String),
    rule           LowCardinality(String),
    `on`           LowCardinality(String),
    `group`        String,
    `count`        UInt64,
    threshold      UInt64,
    window_s       Float64,
    throttle_s     Nullable(Float64),
    first_event_id String,
    last_event_id  String,
    first_ts       DateTime64(3, 'UTC'),
    last_ts        DateTime64(3, 'UTC'),
    summary        Bool,
    suppressed     UInt64,
    examples       String CODEC(ZSTD(1)),
    evidence       String,
    text           String,
    sinks          String,
    schema_version UInt16
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(first_ts)
ORDER BY (alert_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS audit_alerts_mv TO audit_alerts AS
SELECT
    alert_id, fromUnixTimestamp64Milli(ts, 'UTC') AS ts, event_id, gateway, rule, `on`, `group`,
    `count`, threshold, window_s, throttle_s, first_event_id, last_event_id,
    fromUnixTimestamp64Milli(first_ts, 'UTC') AS first_ts,
    fromUnixTimestamp64Milli(last_ts, 'UTC') AS last_ts,
    ifNull(summary, false) AS summary, suppressed, examples, evidence, text, sinks, schema_version
FROM alert_events_in
WHERE kind = 'alert.fired';

-- alert.delivered / alert.failed: each sink's answer (failed with final = false: it retries)
CREATE TABLE IF NOT EXISTS audit_alert_deliveries
(
    alert_id       String,
    sink           String,
    event_id       String,
    ts             DateTime64(3, 'UTC'),
    kind           LowCardinality(String),
    gateway        LowCardinality(String),
    rule           LowCardinality(String),
    attempts       UInt32,
    status         Nullable(Int32),
    error          String,
    final          Bool,
    age_ms         Float64,
    schema_version UInt16
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (alert_id, sink, event_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS audit_alert_deliveries_mv TO audit_alert_deliveries AS
SELECT
    alert_id, sink, event_id, fromUnixTimestamp64Milli(ts, 'UTC') AS ts, kind, gateway, rule,
    attempts, status, error, ifNull(final, kind = 'alert.delivered') AS final, age_ms, schema_version
FROM alert_events_in
WHERE kind IN ('alert.delivered', 'alert.failed');
