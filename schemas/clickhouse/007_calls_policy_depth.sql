-- Columns added to call.decided after 001 (shadow mode and risk classes, issue 15), for stores
-- created before them: the tables gain the columns (idempotent). Such a store's audit_calls_mv
-- still selects the old columns, so there they stay empty until the view is recreated
-- (DROP VIEW audit_calls_mv, restart, replay --from 0); a new store has them from 001.

ALTER TABLE audit_events_in ADD COLUMN IF NOT EXISTS shadow Nullable(Bool);
ALTER TABLE audit_events_in ADD COLUMN IF NOT EXISTS would_decision String;
ALTER TABLE audit_events_in ADD COLUMN IF NOT EXISTS risk_class String;
ALTER TABLE audit_events_in ADD COLUMN IF NOT EXISTS risk_level String;
ALTER TABLE audit_calls ADD COLUMN IF NOT EXISTS shadow Bool;
ALTER TABLE audit_calls ADD COLUMN IF NOT EXISTS would_decision LowCardinality(String);
ALTER TABLE audit_calls ADD COLUMN IF NOT EXISTS risk_class LowCardinality(String);
ALTER TABLE audit_calls ADD COLUMN IF NOT EXISTS risk_level LowCardinality(String);
