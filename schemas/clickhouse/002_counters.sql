-- ledgergate per-minute call counters (written by consumers/counters.py).
--
-- The consumer inserts call.decided payloads as-is (JSONEachRow) into the Null-engine
-- table counters_in; the materialized view folds each insert block into
-- counters_minute, an AggregatingMergeTree keyed by (minute, server, tool, grant, agent,
-- decision) whose value is uniqExactState(event_id): the exact set of event ids seen.
-- Merging states is a set union, so inserting the same event again (at-least-once
-- delivery, replay from offset 0) never changes uniqExactMerge(calls): replay-safe
-- without FINAL. `tool` is the tool name, or the JSON-RPC method for non-tool requests.
--
-- Read it with:
--   SELECT minute, server, tool, `grant`, agent, decision, uniqExactMerge(calls) AS count
--   FROM counters_minute GROUP BY minute, server, tool, `grant`, agent, decision
--
-- Statements are separated by a semicolon at the end of a line.

CREATE TABLE IF NOT EXISTS counters_in
(
    kind     String,
    event_id String,
    ts       Int64,
    server   String,
    method   String,
    tool     String,
    `grant`  String,
    agent    String,
    decision String
)
ENGINE = Null;

CREATE TABLE IF NOT EXISTS counters_minute
(
    minute   DateTime('UTC'),
    server   LowCardinality(String),
    tool     LowCardinality(String),
    `grant`  LowCardinality(String),
    agent    LowCardinality(String),
    decision LowCardinality(String),
    calls    AggregateFunction(uniqExact, String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, server, tool, `grant`, agent, decision);

CREATE MATERIALIZED VIEW IF NOT EXISTS counters_minute_mv TO counters_minute AS
SELECT
    toStartOfMinute(toDateTime(intDiv(ts, 1000), 'UTC')) AS minute,
    server,
    if(tool = '', method, tool) AS tool,
    `grant`,
    agent,
    decision,
    uniqExactState(event_id) AS calls
FROM counters_in
WHERE kind = 'call.decided'
GROUP BY minute, server, tool, `grant`, agent, decision;
