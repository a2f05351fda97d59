-- ledgergate audit trail (written by consumers/audit.py, read by consumers/forensics.py).
--
-- The consumer inserts every event payload as-is (JSONEachRow) into the Null-engine
-- table audit_events_in. Materialized views route each kind into its own table and turn
-- the millisecond `ts` into DateTime64(3, 'UTC'). Nothing is stored in audit_events_in.
--
-- Idempotence (at-least-once delivery, replay from offset 0): every audit table is a
-- ReplacingMergeTree whose sorting key ends with event_id and whose other key columns
-- are fixed by the event itself, so a re-inserted event collapses with its first copy.
-- Until a merge happens both copies exist on disk: read with FINAL (forensics.py does).
--
-- Tables live in the current database. Statements are separated by a semicolon at the
-- end of a line (the schema loader splits there, so never put one inside a statement).

CREATE TABLE IF NOT EXISTS audit_events_in
(
    schema_version   UInt16,
    kind             String,
    event_id         String,
    ts               Int64,
    gateway          String,
    call_id          String,
    server           String,
    method           String,
    tool             String,
    request_id       String,
    `grant`          String,
    agent            String,
    session          String,
    protocol_version String,
    client_name      String,
    client_version   String,
    remote           String,
    arguments        String,
    args_sha256      String,
    decision         String,
    rule             String,
    reason           String,
    retry_after_s    Nullable(Float64),
    counters         String,
    charges          String,
    policy_version   String,
    outcome          String,
    error_code       Nullable(Int64),
    error_message    String,
    upstream_ms      Nullable(Float64),
    response_bytes   UInt64,
    path             String,
    ok               Nullable(Bool),
    error            String,
    upstream_answered Nullable(Bool),
    refunded         Nullable(Bool),
    shadow           Nullable(Bool),
    would_decision   String,
    risk_class       String,
    risk_level       String
)
ENGINE = Null;

-- call.decided: every JSON-RPC request the gateway handled, with its decision.
CREATE TABLE IF NOT EXISTS audit_calls
(
    event_id         String,
    ts               DateTime64(3, 'UTC'),
    gateway          LowCardinality(String),
    call_id          String,
    server           LowCardinality(String),
    method           LowCardinality(String),
    tool             LowCardinality(String),
    request_id       String,
    `grant`          LowCardinality(String),
    agent            LowCardinality(String),
    session          String,
    protocol_version LowCardinality(String),
    client_name      LowCardinality(String),
    client_version   LowCardinality(String),
    remote           String,
    arguments        String CODEC(ZSTD(1)),
    args_sha256      String,
    decision         LowCardinality(String),
    rule             String,
    reason           String,
    retry_after_s    Nullable(Float64),
    counters         String CODEC(ZSTD(1)),
    charges          String CODEC(ZSTD(1)),
    policy_version   LowCardinality(String),
    schema_version   UInt16,
    shadow           Bool,
    would_decision   LowCardinality(String),
    risk_class       LowCardinality(String),
    risk_level       LowCardinality(String)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (server, tool, ts, event_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS audit_calls_mv TO audit_calls AS
SELECT
    event_id, fromUnixTimestamp64Milli(ts, 'UTC') AS ts, gateway, call_id, server, method, tool,
    request_id, `grant`, agent, session, protocol_version, client_name, client_version, remote,
    arguments, args_sha256, decision, rule, reason, retry_after_s, counters, charges,
    policy_version, schema_version, ifNull(shadow, false) AS shadow, would_decision, risk_class,
    risk_level
FROM audit_events_in
WHERE kind = 'call.decided';

-- call.completed: how each request ended (join to audit_calls on call_id). outcome
-- 'shutdown': cut by the drain timeout (upstream_answered: had the upstream answered);
-- refunded: allowed but never sent upstream, its charges given back.
CREATE TABLE IF NOT EXISTS audit_outcomes
(
    event_id       String,
    ts             DateTime64(3, 'UTC'),
    gateway        LowCardinality(String),
    call_id        String,
    server         LowCardinality(String),
    method         LowCardinality(String),
    tool           LowCardinality(String),
    `grant`        LowCardinality(String),
    agent          LowCardinality(String),
    session        String,
    outcome        LowCardinality(String),
    error_code     Nullable(Int64),
    error_message  String,
    upstream_ms    Nullable(Float64),
    response_bytes UInt64,
    schema_version UInt16,
    upstream_answered Nullable(Bool),
    refunded       Bool
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (call_id, event_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS audit_outcomes_mv TO audit_outcomes AS
SELECT
    event_id, fromUnixTimestamp64Milli(ts, 'UTC') AS ts, gateway, call_id, server, method, tool,
    `grant`, agent, session, outcome, error_code, error_message, upstream_ms, response_bytes,
    schema_version, upstream_answered, ifNull(refunded, false) AS refunded
FROM audit_events_in
WHERE kind = 'call.completed';

-- session.opened / session.closed (`reason` only for closed).
CREATE TABLE IF NOT EXISTS audit_sessions
(
    event_id         String,
    ts               DateTime64(3, 'UTC'),
    kind             LowCardinality(String),
    gateway          LowCardinality(String),
    session          String,
    server           LowCardinality(String),
    `grant`          LowCardinality(String),
    agent            LowCardinality(String),
    protocol_version LowCardinality(String),
    client_name      LowCardinality(String),
    client_version   LowCardinality(String),
    remote           String,
    reason           LowCardinality(String),
    schema_version   UInt16
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (session, event_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS audit_sessions_mv TO audit_sessions AS
SELECT
    event_id, fromUnixTimestamp64Milli(ts, 'UTC') AS ts, kind, gateway, session, server, `grant`,
    agent, protocol_version, client_name, client_version, remote, reason, schema_version
FROM audit_events_in
WHERE kind IN ('session.opened', 'session.closed');

-- policy.loaded: every policy (re)load, failed ones included.
CREATE TABLE IF NOT EXISTS audit_policy_loads
(
    event_id       String,
    ts             DateTime64(3, 'UTC'),
    gateway        LowCardinality(String),
    server         LowCardinality(String),
    path           String,
    policy_version String,
    ok             Bool,
    error          String,
    schema_version UInt16
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (server, ts, event_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS audit_policy_loads_mv TO audit_policy_loads AS
SELECT
    event_id, fromUnixTimestamp64Milli(ts, 'UTC') AS ts, gateway, server, path, policy_version,
    ifNull(ok, true) AS ok, error, schema_version
FROM audit_events_in
WHERE kind = 'policy.loaded';
