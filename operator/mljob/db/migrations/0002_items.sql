-- 0002_items: the item ids of every job, snapshotted at dispatch.
--
-- Same conventions as 0001: unqualified names (the search_path schema), applied once inside the
-- runner's transaction, never edited once applied.

-- One row per item of a job, written before the job's first task is published, so a result
-- can be checked ("is this an item of this job?") inside the same statement that stores it:
-- results for a job never dispatched or for ids that are not its items are refused, not counted.
-- It is also the record that lost Redis state and lost streams are rebuilt from (items with no
-- row in mljob_results are the unresolved ones). Kept after cleanup, like mljob_results: a late
-- result must still be recognised as an item of its job, and Postgres keeps the history.
-- No foreign key to mljob_jobs, for the same reason as mljob_results.
-- The primary key serves both lookups: (job_uid, item_id) for one item and its job_uid prefix for
-- "does this job exist at all".
CREATE TABLE mljob_items (
    job_uid  text NOT NULL,
    item_id  text NOT NULL,
    PRIMARY KEY (job_uid, item_id)
);

-- Items that already have a result are items of their job: backfill them so results recorded
-- before this migration keep being recognised (replays, rebuilds). Items of jobs dispatched
-- before this migration that have no result yet are registered when dispatch resumes.
INSERT INTO mljob_items (job_uid, item_id)
SELECT job_uid, item_id FROM mljob_results
ON CONFLICT DO NOTHING;
