-- 0001_initial: jobs, per-item results, phase audit trail, dead letters.
--
-- Every object is created unqualified, i.e. in the first schema of the current search_path,
-- so a deployment (or a test) isolates itself simply by choosing a schema. Never add `public.`.
-- Applied once, inside the migration runner's transaction; never edit an applied migration:
-- add a new 0002_<name>.sql instead.

-- One row per MLJob (keyed by the Kubernetes object UID, so delete + recreate of the same
-- namespace/name is a distinct job).
CREATE TABLE mljob_jobs (
    uid                 text        PRIMARY KEY,
    namespace           text        NOT NULL,
    name                text        NOT NULL,
    pipeline            text        NOT NULL,
    phase               text        NOT NULL
        CONSTRAINT mljob_jobs_phase_check CHECK (phase IN (
            'Pending', 'Dispatching', 'Running', 'Canceling', 'Succeeded', 'Failed', 'Cancelled'
        )),
    total               integer     NOT NULL DEFAULT 0,
    dispatched          integer     NOT NULL DEFAULT 0,
    processed           integer     NOT NULL DEFAULT 0,
    failed              integer     NOT NULL DEFAULT 0,
    reason              text,
    message             text,
    spec                jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    start_time          timestamptz,
    completion_time     timestamptz,
    last_activity_time  timestamptz
);

CREATE INDEX mljob_jobs_namespace_name_idx ON mljob_jobs (namespace, name);
CREATE INDEX mljob_jobs_phase_idx ON mljob_jobs (phase);

-- One row per (job, item). The primary key makes result recording idempotent
-- (INSERT ... ON CONFLICT (job_uid, item_id) ...) under at-least-once delivery.
-- Deliberately NO foreign key to mljob_jobs: a late (or early) result must be recordable
-- even when the job row is missing.
CREATE TABLE mljob_results (
    job_uid      text        NOT NULL,
    item_id      text        NOT NULL,
    outcome      text        NOT NULL
        CONSTRAINT mljob_results_outcome_check CHECK (outcome IN ('succeeded', 'failed')),
    result       jsonb,
    error        text,
    attempts     integer     NOT NULL DEFAULT 1,
    worker       text,
    finished_at  timestamptz NOT NULL DEFAULT now(),
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_uid, item_id)
);

-- Append-only audit trail of phase transitions.
CREATE TABLE mljob_transitions (
    id          bigserial   PRIMARY KEY,
    job_uid     text        NOT NULL,
    from_phase  text,
    to_phase    text        NOT NULL,
    reason      text,
    message     text,
    actor       text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX mljob_transitions_job_uid_idx ON mljob_transitions (job_uid);

-- Messages that could not be parsed/processed, kept for inspection instead of being dropped
-- or redelivered forever.
CREATE TABLE mljob_dead_letters (
    id       bigserial   PRIMARY KEY,
    source   text,
    subject  text,
    payload  bytea,
    reason   text,
    at       timestamptz NOT NULL DEFAULT now()
);
