-- Columns added to call.completed after 001 (upstream_answered, refunded), for stores created
-- before them: the tables gain the columns (idempotent). Such a store's audit_outcomes_mv still
-- selects the old columns, so there they stay NULL/false until the view is recreated
-- (DROP VIEW audit_outcomes_mv, restart, replay --from 0); a new store has them from 001.

ALTER TABLE audit_events_in ADD COLUMN IF NOT EXISTS upstream_answered Nullable(Bool);
ALTER TABLE audit_events_in ADD COLUMN IF NOT EXISTS refunded Nullable(Bool);
ALTER TABLE audit_outcomes ADD COLUMN IF NOT EXISTS upstream_answered Nullable(Bool);
ALTER TABLE audit_outcomes ADD COLUMN IF NOT EXISTS refunded Bool;
