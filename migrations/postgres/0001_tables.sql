-- PgStore's tables, in the schema the store was configured with (the connection's
-- search_path). Keys are bytes (a key may hold NUL, which `text` cannot) and are found by
-- their SHA-256 digest (`key_hash`), since a key of 4096 bytes is too long for a btree entry.

-- Every task output: its key and its envelope.
CREATE TABLE outputs (
    key_hash bytea PRIMARY KEY,
    key bytea NOT NULL,
    value bytea NOT NULL
);

-- Every process that connected: its id makes its run ids, and its heartbeat tells whether
-- it is alive (its runs still Running once `expires_at` passed are Interrupted).
CREATE TABLE workers (
    id bigserial PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

-- Who may run a task: `token` counts the key's leases (the fencing token), `owner` is the
-- worker holding it until `expires_at`; `done` once its output was committed under it.
CREATE TABLE leases (
    key_hash bytea PRIMARY KEY,
    key bytea NOT NULL,
    token bigint NOT NULL,
    owner bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    done boolean NOT NULL
);

-- Runs; `worker` is the process that ran it.
CREATE TABLE runs (
    id bigint PRIMARY KEY,
    worker bigint NOT NULL,
    started_ms bigint NOT NULL,
    finished_ms bigint,
    status text NOT NULL,
    executed bigint NOT NULL DEFAULT 0,
    cached bigint NOT NULL DEFAULT 0,
    failed bigint NOT NULL DEFAULT 0,
    version text NOT NULL DEFAULT ''
);

-- Attempts, one per run, key and attempt number.
CREATE TABLE attempts (
    run bigint NOT NULL,
    key_hash bytea NOT NULL,
    attempt integer NOT NULL,
    key bytea NOT NULL,
    started_ms bigint NOT NULL,
    finished_ms bigint,
    outcome text NOT NULL,
    error text,
    duration_us bigint,
    output_size bigint,
    reason text,
    PRIMARY KEY (run, key_hash, attempt)
);
CREATE INDEX attempts_by_key ON attempts (key_hash, run, attempt);
