-- klined warehouse schema (canonical). Applied idempotently at start by klined.db.apply_schema():
-- every statement is CREATE ... IF NOT EXISTS, CREATE OR REPLACE, or a guarded DO block, so
-- applying it again changes nothing. Works on PostgreSQL 14 through 18 (no MERGE, no
-- NULLS NOT DISTINCT). All times are timestamptz in UTC; nothing here depends on the session's
-- TimeZone setting (partition bounds and day boundaries are computed AT TIME ZONE 'UTC').
--
-- Layers: bronze (raw events, append-only, duplicates allowed) -> silver (one row per
-- exchange/symbol/minute, chosen by source precedence) -> gold (5m/15m/30m/1h derived from silver)
-- -> monitoring (completeness, what Looker Studio and the TUI read). ops holds the ledgers.
--
-- Partitions: bronze and silver are RANGE partitioned by hour on interval_start. Partitions are
-- created by ops.ensure_hour_partition() ahead of time and before every insert; there is
-- deliberately no DEFAULT partition (a row parked there would block creating its hour's
-- partition later). Bronze partitions older than the retention are dropped; the lake keeps the
-- raw history.

CREATE SCHEMA IF NOT EXISTS bronze;
CREATE SCHEMA IF NOT EXISTS silver;
CREATE SCHEMA IF NOT EXISTS gold;
CREATE SCHEMA IF NOT EXISTS ops;
CREATE SCHEMA IF NOT EXISTS monitoring;

-- ---------------------------------------------------------------------------------------------
-- ops: schema version, configured pairs, ledgers

CREATE TABLE IF NOT EXISTS ops.schema_version (
    version     integer PRIMARY KEY,
    description text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- The configured pairs, synced from the config at start (klined.db.sync_pairs). Completeness
-- expects 60 rows per hour for every pair that is active and not known to be unlisted.
CREATE TABLE IF NOT EXISTS ops.pairs (
    exchange      text NOT NULL,
    symbol        text NOT NULL,              -- canonical BASE/QUOTE
    quote_asset   text NOT NULL,
    native_symbol text NOT NULL,
    active        boolean NOT NULL DEFAULT true,   -- configured right now
    listed        boolean,                    -- exchange listing check: NULL = not checked yet
    note          text NOT NULL DEFAULT '',
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (exchange, symbol)
);

-- One row per lake part loaded into bronze; inserted in the same transaction as the part's rows,
-- so a part is loaded exactly once.
CREATE TABLE IF NOT EXISTS ops.lake_parts (
    lake_key         text PRIMARY KEY,
    hour_start       timestamptz NOT NULL,
    exchange         text NOT NULL,
    size             bigint NOT NULL,          -- bytes read
    rows             bigint NOT NULL,          -- rows loaded into bronze
    bad_lines        integer NOT NULL DEFAULT 0,   -- torn or malformed lines skipped
    bad_line_numbers integer[] NOT NULL DEFAULT '{}',  -- 1-based, at most the first 100
    loaded_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS lake_parts_hour_idx ON ops.lake_parts (hour_start, exchange);

-- Every run of every chain step: running -> ok | failed | skipped.
CREATE TABLE IF NOT EXISTS ops.job_runs (
    run_id      bigserial PRIMARY KEY,
    hour_start  timestamptz,                   -- NULL for steps not tied to one hour
    step        text NOT NULL,
    status      text NOT NULL CHECK (status IN ('running', 'ok', 'failed', 'skipped')),
    rows        bigint,
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz,
    duration_ms bigint,
    error       text,
    trigger     text NOT NULL DEFAULT 'schedule',  -- schedule | catchup | dirty | manual | backfill
    details     jsonb
);
CREATE INDEX IF NOT EXISTS job_runs_hour_step_idx ON ops.job_runs (hour_start, step);
CREATE INDEX IF NOT EXISTS job_runs_started_idx ON ops.job_runs (started_at);

-- Hours that need the chain (silver, gold, completeness) again: new lake parts, gap-fill or
-- backfill rows. seq grows on every (re)mark, so a runner clears exactly what it processed
-- (klined.jobs.ops.clear_dirty_hour) and never a mark made while it ran.
CREATE SEQUENCE IF NOT EXISTS ops.dirty_seq;
CREATE TABLE IF NOT EXISTS ops.dirty_hours (
    exchange   text NOT NULL,
    hour_start timestamptz NOT NULL,
    reason     text NOT NULL,                  -- lake_parts | gapfill | backfill | manual
    marked_at  timestamptz NOT NULL DEFAULT now(),
    seq        bigint NOT NULL DEFAULT nextval('ops.dirty_seq'),
    PRIMARY KEY (exchange, hour_start)
);

-- 5-minute buckets whose silver minutes changed and whose gold rows (5m and the 15m/30m/1h
-- buckets containing them) must be recomputed. Written by the silver merge in the same
-- transaction as the silver change, consumed (deleted) by the gold refresh in the same
-- transaction as the gold change.
CREATE TABLE IF NOT EXISTS ops.gold_dirty (
    exchange     text NOT NULL,
    symbol       text NOT NULL,
    bucket_start timestamptz NOT NULL,         -- 5-minute aligned, UTC
    marked_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (exchange, symbol, bucket_start)
);
CREATE INDEX IF NOT EXISTS gold_dirty_bucket_idx ON ops.gold_dirty (bucket_start);

-- Gap-fill attempts (REST / trades), one row per request covering [range_start, range_end).
-- outcome: filled | partial | no_trades | empty | rate_limited | error | unavailable.
CREATE TABLE IF NOT EXISTS ops.gapfill_attempts (
    attempt_id   bigserial PRIMARY KEY,
    exchange     text NOT NULL,
    symbol       text NOT NULL,
    range_start  timestamptz NOT NULL,
    range_end    timestamptz NOT NULL,
    attempted_at timestamptz NOT NULL DEFAULT now(),
    outcome      text NOT NULL,
    rows         integer NOT NULL DEFAULT 0,
    detail       text NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS gapfill_attempts_pair_idx
    ON ops.gapfill_attempts (exchange, symbol, range_start);

-- `klined backfill --from --to` progress, one row per backfill run; done_through is the end of
-- the last hour fully processed, so an interrupted backfill resumes from there.
CREATE TABLE IF NOT EXISTS ops.backfill_progress (
    backfill_id  bigserial PRIMARY KEY,
    exchange     text NOT NULL,
    symbols      text[],                       -- NULL = every configured pair
    range_start  timestamptz NOT NULL,
    range_end    timestamptz NOT NULL,
    done_through timestamptz,
    status       text NOT NULL DEFAULT 'running'
                 CHECK (status IN ('running', 'done', 'failed', 'cancelled')),
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    detail       text NOT NULL DEFAULT ''
);

-- ---------------------------------------------------------------------------------------------
-- bronze: every captured event and every REST/trades/no_trades row, as is

CREATE TABLE IF NOT EXISTS bronze.bronze_ohlcv_native (
    exchange         text NOT NULL,
    symbol           text NOT NULL,
    native_symbol    text NOT NULL,
    interval_seconds integer NOT NULL,
    interval_start   timestamptz NOT NULL,
    interval_end     timestamptz NOT NULL,
    open             numeric NOT NULL,
    high             numeric NOT NULL,
    low              numeric NOT NULL,
    close            numeric NOT NULL,
    volume           numeric NOT NULL,
    quote_volume     numeric,
    vwap             numeric,
    trade_count      bigint,
    is_final         boolean NOT NULL,
    source           text NOT NULL CHECK (source IN ('ws', 'rest', 'trades', 'no_trades')),
    session_id       text,
    event_ts         timestamptz NOT NULL,
    ingestion_ts     timestamptz NOT NULL,
    lake_key         text,                     -- NULL for rows inserted directly (gap-fill)
    -- no NaN or infinities (PostgreSQL sorts NaN above Infinity)
    CONSTRAINT bronze_finite CHECK (
        greatest(open, high, low, close, volume, quote_volume, vwap) < 'Infinity'
        AND least(open, high, low, close, volume, quote_volume, vwap) > '-Infinity')
) PARTITION BY RANGE (interval_start);

-- ---------------------------------------------------------------------------------------------
-- silver: exactly one candle per exchange / symbol / minute

CREATE TABLE IF NOT EXISTS silver.fact_ohlcv (
    exchange         text NOT NULL,
    symbol           text NOT NULL,
    quote_asset      text NOT NULL,
    interval_seconds integer NOT NULL DEFAULT 60,
    interval_start   timestamptz NOT NULL,
    interval_end     timestamptz NOT NULL,
    open             numeric NOT NULL,
    high             numeric NOT NULL,
    low              numeric NOT NULL,
    close            numeric NOT NULL,
    volume           numeric NOT NULL,
    quote_volume     numeric,
    trade_count      bigint,
    vwap             numeric,
    source           text NOT NULL
                     CHECK (source IN ('ws_final', 'rest', 'trades', 'no_trades', 'ws_partial')),
    rank             smallint NOT NULL,        -- klined.model.SOURCE_RANK: lower wins
    event_ts         timestamptz NOT NULL,     -- tie-break within a rank: latest wins
    ingestion_ts     timestamptz NOT NULL,     -- then latest ingestion
    updated_at       timestamptz NOT NULL DEFAULT now(),  -- when this row last changed
    PRIMARY KEY (exchange, symbol, interval_start)
) PARTITION BY RANGE (interval_start);

-- ---------------------------------------------------------------------------------------------
-- gold: buckets derived strictly from silver. traded_minutes counts the minutes with trades
-- (the ones that set the price range); minutes counts every silver minute present.

CREATE TABLE IF NOT EXISTS gold.ohlcv_5m (
    exchange       text NOT NULL,
    symbol         text NOT NULL,
    interval_start timestamptz NOT NULL,
    interval_end   timestamptz NOT NULL,
    open           numeric NOT NULL,
    high           numeric NOT NULL,
    low            numeric NOT NULL,
    close          numeric NOT NULL,
    volume         numeric NOT NULL,
    quote_volume   numeric,
    trade_count    bigint,
    minutes        smallint NOT NULL,
    traded_minutes smallint NOT NULL,
    source         text NOT NULL DEFAULT 'derived' CHECK (source = 'derived'),
    ingestion_ts   timestamptz NOT NULL DEFAULT now(),  -- when this row last changed
    PRIMARY KEY (exchange, symbol, interval_start)
);
CREATE TABLE IF NOT EXISTS gold.ohlcv_15m (LIKE gold.ohlcv_5m INCLUDING ALL);
CREATE TABLE IF NOT EXISTS gold.ohlcv_30m (LIKE gold.ohlcv_5m INCLUDING ALL);
CREATE TABLE IF NOT EXISTS gold.ohlcv_1h (LIKE gold.ohlcv_5m INCLUDING ALL);

-- ---------------------------------------------------------------------------------------------
-- monitoring: what Looker Studio and the TUI read (the read-only role sees only this schema)

CREATE TABLE IF NOT EXISTS monitoring.hourly_completeness (
    exchange        text NOT NULL,
    symbol          text NOT NULL,
    hour_start      timestamptz NOT NULL,
    expected        integer NOT NULL,          -- 60
    ws_final        integer NOT NULL,
    rest            integer NOT NULL,
    trades          integer NOT NULL,
    no_trades       integer NOT NULL,
    ws_partial      integer NOT NULL,
    missing         integer NOT NULL,
    completion_rate numeric NOT NULL,          -- (ws_final+rest+trades+no_trades)/expected
    refreshed_at    timestamptz NOT NULL DEFAULT now(),  -- when the counts last changed
    PRIMARY KEY (exchange, symbol, hour_start),
    CHECK (ws_final + rest + trades + no_trades + ws_partial + missing = expected),
    CHECK (completion_rate >= 0 AND completion_rate <= 1)
);
CREATE INDEX IF NOT EXISTS hourly_completeness_hour_idx
    ON monitoring.hourly_completeness (hour_start);

-- Stream outages recorded by the daemon (symbol NULL = the whole connection).
CREATE TABLE IF NOT EXISTS monitoring.stream_incidents (
    incident_id bigserial PRIMARY KEY,
    exchange    text NOT NULL,
    symbol      text,
    started_at  timestamptz NOT NULL,
    ended_at    timestamptz,                   -- NULL while ongoing
    kind        text NOT NULL,                 -- disconnect | stall | subscribe_failed | ...
    detail      text NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS stream_incidents_started_idx
    ON monitoring.stream_incidents (started_at);

-- Days are UTC days, whatever the session's TimeZone. expected sums the hours refreshed so far.
CREATE OR REPLACE VIEW monitoring.daily_completeness AS
SELECT exchange,
       symbol,
       (hour_start AT TIME ZONE 'UTC')::date AS day,
       sum(expected)::integer   AS expected,
       sum(ws_final)::integer   AS ws_final,
       sum(rest)::integer       AS rest,
       sum(trades)::integer     AS trades,
       sum(no_trades)::integer  AS no_trades,
       sum(ws_partial)::integer AS ws_partial,
       sum(missing)::integer    AS missing,
       round(sum(ws_final + rest + trades + no_trades)::numeric
             / nullif(sum(expected), 0), 4) AS completion_rate
FROM monitoring.hourly_completeness
GROUP BY exchange, symbol, (hour_start AT TIME ZONE 'UTC')::date;

CREATE OR REPLACE VIEW monitoring.exchange_hourly_completeness AS
SELECT exchange,
       hour_start,
       count(*)::integer        AS pairs,
       sum(expected)::integer   AS expected,
       sum(ws_final)::integer   AS ws_final,
       sum(rest)::integer       AS rest,
       sum(trades)::integer     AS trades,
       sum(no_trades)::integer  AS no_trades,
       sum(ws_partial)::integer AS ws_partial,
       sum(missing)::integer    AS missing,
       round(sum(ws_final + rest + trades + no_trades)::numeric
             / nullif(sum(expected), 0), 4) AS completion_rate
FROM monitoring.hourly_completeness
GROUP BY exchange, hour_start;

-- ---------------------------------------------------------------------------------------------
-- functions

-- Silver precedence rank of a bronze event (klined.model.SOURCE_RANK); lower wins.
CREATE OR REPLACE FUNCTION ops.source_rank(p_source text, p_is_final boolean)
RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT (CASE p_source
                WHEN 'ws' THEN CASE WHEN p_is_final THEN 1 ELSE 5 END
                WHEN 'rest' THEN 2
                WHEN 'trades' THEN 3
                WHEN 'no_trades' THEN 4
            END)::smallint
$$;

-- The silver source name of a bronze event (klined.model.silver_source).
CREATE OR REPLACE FUNCTION ops.silver_source(p_source text, p_is_final boolean)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN p_source = 'ws'
                THEN CASE WHEN p_is_final THEN 'ws_final' ELSE 'ws_partial' END
                ELSE p_source END
$$;

-- Create the hourly partition of p_parent ('bronze.bronze_ohlcv_native' or 'silver.fact_ohlcv')
-- that holds p_hour, unless it exists. Safe when several sessions race to create the same
-- partition: the loser sees duplicate_table (or the overlap error) and reports false.
CREATE OR REPLACE FUNCTION ops.ensure_hour_partition(p_parent text, p_hour timestamptz)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    v_start  timestamptz := date_bin('1 hour', p_hour, timestamptz '1970-01-01 00:00:00+00');
    v_schema text := split_part(p_parent, '.', 1);
    v_table  text := split_part(p_parent, '.', 2);
    v_name   text := v_table || '_p' || to_char(v_start AT TIME ZONE 'UTC', 'YYYYMMDDHH24');
    v_from   text := to_char(v_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00';
    v_to     text := to_char((v_start + interval '1 hour') AT TIME ZONE 'UTC',
                             'YYYY-MM-DD HH24:MI:SS') || '+00';
BEGIN
    IF to_regclass(format('%I.%I', v_schema, v_name)) IS NOT NULL THEN
        RETURN false;
    END IF;
    BEGIN
        EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.%I FOR VALUES FROM (%L) TO (%L)',
                       v_schema, v_name, v_schema, v_table, v_from, v_to);
    EXCEPTION
        WHEN duplicate_table OR invalid_object_definition THEN
            RETURN false;
    END;
    RETURN true;
END
$$;

-- The start hours of the existing hourly partitions of p_parent, from the catalog (bounds, not
-- names, are the truth).
CREATE OR REPLACE FUNCTION ops.hour_partitions(p_parent text)
RETURNS TABLE (partition_name text, hour_start timestamptz)
LANGUAGE sql STABLE
AS $$
    SELECT c.oid::regclass::text,
           (regexp_match(pg_get_expr(c.relpartbound, c.oid),
                         'FROM \(''([^'']+)''\)'))[1]::timestamptz
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = p_parent::regclass
      AND c.relispartition
      AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'
$$;

-- Create the read-only role (NOLOGIN; give it a password with
-- `ALTER ROLE <name> WITH LOGIN PASSWORD '...'`) and grant it the monitoring schema only:
-- USAGE, SELECT on every table and view there, and the same for tables created later.
-- Roles are cluster-wide, so creating one that another database just created is not an error.
CREATE OR REPLACE FUNCTION ops.grant_readonly(p_role text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_role) THEN
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', p_role);
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;
        END;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA monitoring TO %I', p_role);
    EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA monitoring TO %I', p_role);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA monitoring GRANT SELECT ON TABLES TO %I',
                   p_role);
END
$$;

-- ---------------------------------------------------------------------------------------------

INSERT INTO ops.schema_version (version, description)
VALUES (1, 'bronze, silver, gold, ops, monitoring; hourly partitions')
ON CONFLICT (version) DO NOTHING;
