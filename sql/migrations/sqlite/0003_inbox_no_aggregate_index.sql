-- warren 0003: drop the inbox's (consumer, aggregate_type, aggregate_id)
-- index. Deliveries arrive in time order but their aggregates do not: each
-- insert landed on a page of its own in that index, so a batch of 32
-- deliveries wrote 32 more pages to the WAL, and the index cost about a
-- third of the consumer's time per delivery at 100,000 rows. The other
-- indexes grow at their end. `warren inbox list --aggregate` now walks the
-- consumer's rows newest first (warren_inbox_received) and stops at the
-- limit; --since narrows it.

DROP INDEX IF EXISTS warren_inbox_aggregate;
