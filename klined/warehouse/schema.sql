-- klined warehouse schema (canonical). Applied idempotently at start by klined.db.apply_schema():
-- every statement is CREATE ... IF NOT EXISTS, CREATE OR REPLACE, or a guarded DO block, so
-- applying it again changes nothing. Works on PostgreSQL 14 through 18 (no MERGE, no
-- NULLS NOT DISTINCT). All times are timestamptz in UTC; nothing here depends on the session's
-- TimeZone setting (partition bounds and day boundaries are computed AT TIME ZONE 'UTC').
--
-- Layers: bronze (raw events, append-only, duplicates allowed) -> silver (one row per
-- exchange/symbol/minute, chosen by source precedence) -> gold (5m/15m/30m/1h/4h/1d derived from
-- silver) -> monitoring (completeness, what Looker Studio and the TUI read). ops holds the
-- ledgers.
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

-- Make the CHECK constraint p_name of p_table p_check unless its definition already mentions
-- p_needle. A no-op once done, so it is safe at every start; otherwise the old constraint is
-- dropped and the new one added, which validates every row once (on a partitioned table, every
-- partition).
CREATE OR REPLACE FUNCTION ops.replace_check(
    p_table text, p_name text, p_needle text, p_check text)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    v_now text;
BEGIN
    SELECT pg_get_constraintdef(oid) INTO v_now FROM pg_constraint
    WHERE conrelid = p_table::regclass AND conname = p_name;
    IF v_now IS NOT NULL AND strpos(v_now, p_needle) > 0 THEN
        RETURN false;
    END IF;
    IF v_now IS NOT NULL THEN
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', p_table, p_name);
    END IF;
    EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I %s', p_table, p_name, p_check);
    RETURN true;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- ops: schema version, configured pairs, ledgers

CREATE TABLE IF NOT EXISTS ops.schema_version (
    version     integer PRIMARY KEY,
    description text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- The configured pairs, synced from the config at start (klined.db.sync_pairs). Completeness
-- expects 60 minutes for every closed hour of a pair's coverage, [coverage_start,
-- coverage_end), unless the pair is known to be unlisted (klined.warehouse.coverage).
CREATE TABLE IF NOT EXISTS ops.pairs (
    exchange      text NOT NULL,
    symbol        text NOT NULL,              -- canonical BASE/QUOTE
    quote_asset   text NOT NULL,
    native_symbol text NOT NULL,
    active        boolean NOT NULL DEFAULT true,   -- configured right now
    listed        boolean,                    -- exchange listing check: NULL = not checked yet
    note          text NOT NULL DEFAULT '',
    updated_at    timestamptz NOT NULL DEFAULT now(),
    -- the first hour klined tracked the pair: captured by the daemon (its start, or a lake part
    -- loaded into bronze) or asked for by a backfill; NULL = never tracked
    coverage_start timestamptz,
    -- set when the pair leaves the configuration: the hour its coverage ended (exclusive)
    coverage_end  timestamptz,
    -- hours [completeness_from, completeness_to) have a monitoring.hourly_completeness row
    -- (processed or pending), so new pending rows are only ever added outside that span
    completeness_from timestamptz,
    completeness_to   timestamptz,
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

-- Every run of every chain step: running -> ok | failed | skipped, or abandoned (the process
-- that ran it is gone; marked by the next chain).
CREATE TABLE IF NOT EXISTS ops.job_runs (
    run_id      bigserial PRIMARY KEY,
    hour_start  timestamptz,                   -- NULL for steps not tied to one hour
    step        text NOT NULL,
    -- incomplete: the step ran, but requests failed and left minutes missing (gap-fill)
    -- abandoned: the process recording it is gone (a later chain marks it)
    status      text NOT NULL
                CHECK (status IN ('running', 'ok', 'incomplete', 'failed', 'skipped',
                                  'abandoned')),
    rows        bigint,
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz,
    duration_ms bigint,
    error       text,
    trigger     text NOT NULL DEFAULT 'schedule',  -- schedule | catchup | dirty | manual | backfill | rebuild
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
-- buckets containing them) must be recomputed. Written by every silver writer (the hourly
-- merge, the live writer) in the same transaction as the silver change, consumed by the gold
-- refresh in the same transaction as the gold change. An append-only queue: a mark is a new
-- row (the same bucket may be marked several times), and a refresh deletes exactly the rows
-- (seq) it read, so writers never wait for a refresh nor a refresh for a writer
-- (klined.jobs.gold). Databases created before the queue had a primary key on the bucket; the
-- guarded ALTERs below turn such a table into the queue, idempotently.
CREATE SEQUENCE IF NOT EXISTS ops.gold_dirty_seq;
CREATE TABLE IF NOT EXISTS ops.gold_dirty (
    exchange     text NOT NULL,
    symbol       text NOT NULL,
    bucket_start timestamptz NOT NULL,         -- 5-minute aligned, UTC
    marked_at    timestamptz NOT NULL DEFAULT now(),
    seq          bigint NOT NULL DEFAULT nextval('ops.gold_dirty_seq')
);
DO $$
BEGIN
    -- guarded, so a start with the queue in place takes no table lock
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'ops.gold_dirty'::regclass
                   AND attname = 'seq' AND NOT attisdropped) THEN
        ALTER TABLE ops.gold_dirty
            ADD COLUMN seq bigint NOT NULL DEFAULT nextval('ops.gold_dirty_seq');
    END IF;
    IF EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'ops.gold_dirty'::regclass
               AND conname = 'gold_dirty_pkey') THEN
        ALTER TABLE ops.gold_dirty DROP CONSTRAINT gold_dirty_pkey;
    END IF;
END
$$;
CREATE UNIQUE INDEX IF NOT EXISTS gold_dirty_seq_idx ON ops.gold_dirty (seq);
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
-- bronze: every captured event and every REST/archive/trades/no_trades row, as is

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
    source           text NOT NULL
                     CHECK (source IN ('ws', 'rest', 'archive', 'trades', 'no_trades')),
    session_id       text,
    event_ts         timestamptz NOT NULL,
    ingestion_ts     timestamptz NOT NULL,
    lake_key         text,                     -- the lake part it came from (every producer,
                                               -- gap-fill and archive imports too, writes the
                                               -- lake first; NULL only for rows a test or
                                               -- tool inserted)
    -- no NaN or infinities (PostgreSQL sorts NaN above Infinity)
    CONSTRAINT bronze_finite CHECK (
        greatest(open, high, low, close, volume, quote_volume, vwap) < 'Infinity'
        AND least(open, high, low, close, volume, quote_volume, vwap) > '-Infinity')
) PARTITION BY RANGE (interval_start);
-- Tables created before the archive source (issue 18) allow it too.
SELECT ops.replace_check('bronze.bronze_ohlcv_native', 'bronze_ohlcv_native_source_check',
    '''archive''', 'CHECK (source IN (''ws'', ''rest'', ''archive'', ''trades'', ''no_trades''))');

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
                     CHECK (source IN ('ws_final', 'rest', 'archive', 'trades', 'no_trades',
                                       'ws_partial')),
    rank             smallint NOT NULL,        -- klined.model.SOURCE_RANK: lower wins
    event_ts         timestamptz NOT NULL,     -- tie-break within a rank: latest wins
    ingestion_ts     timestamptz NOT NULL,     -- then latest ingestion
    updated_at       timestamptz NOT NULL DEFAULT now(),  -- when this row last changed
    PRIMARY KEY (exchange, symbol, interval_start)
) PARTITION BY RANGE (interval_start);
SELECT ops.replace_check('silver.fact_ohlcv', 'fact_ohlcv_source_check', '''archive''',
    'CHECK (source IN (''ws_final'', ''rest'', ''archive'', ''trades'', ''no_trades'','
    ' ''ws_partial''))');

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
-- notional: quote value traded, exact: the sum over minutes with volume of quote_volume, or of
-- vwap * volume where the exchange gives no quote volume (Kraken); NULL when such a minute has
-- neither. vwap = ops.vwap(notional, volume): volume-weighted from silver, 18 decimal places.
-- vwap * volume is the way to estimate a Kraken bucket's quote volume.
ALTER TABLE gold.ohlcv_5m ADD COLUMN IF NOT EXISTS notional numeric;
ALTER TABLE gold.ohlcv_5m ADD COLUMN IF NOT EXISTS vwap numeric;
ALTER TABLE gold.ohlcv_15m ADD COLUMN IF NOT EXISTS notional numeric;
ALTER TABLE gold.ohlcv_15m ADD COLUMN IF NOT EXISTS vwap numeric;
ALTER TABLE gold.ohlcv_30m ADD COLUMN IF NOT EXISTS notional numeric;
ALTER TABLE gold.ohlcv_30m ADD COLUMN IF NOT EXISTS vwap numeric;
ALTER TABLE gold.ohlcv_1h ADD COLUMN IF NOT EXISTS notional numeric;
ALTER TABLE gold.ohlcv_1h ADD COLUMN IF NOT EXISTS vwap numeric;

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
    completion_rate numeric NOT NULL,  -- (ws_final+rest+archive+trades+no_trades)/expected
    refreshed_at    timestamptz NOT NULL DEFAULT now(),  -- when the counts last changed
    -- true: a closed hour of the pair's coverage the chain has not processed yet; its minutes
    -- count as missing until it does
    pending         boolean NOT NULL DEFAULT false,
    -- after pending, as on a table created before either (ADD COLUMN, below)
    archive         integer NOT NULL DEFAULT 0,
    PRIMARY KEY (exchange, symbol, hour_start),
    CONSTRAINT hourly_completeness_check
        CHECK (ws_final + rest + archive + trades + no_trades + ws_partial + missing = expected),
    CHECK (completion_rate >= 0 AND completion_rate <= 1)
);
CREATE INDEX IF NOT EXISTS hourly_completeness_hour_idx
    ON monitoring.hourly_completeness (hour_start);
-- Tables created before pending hours (issue 14) and the archive source (issue 18): the
-- columns in the order a new table has them (the views below read both), and the sum check.
ALTER TABLE monitoring.hourly_completeness
    ADD COLUMN IF NOT EXISTS pending boolean NOT NULL DEFAULT false;
ALTER TABLE monitoring.hourly_completeness ADD COLUMN IF NOT EXISTS archive integer NOT NULL DEFAULT 0;
SELECT ops.replace_check(
    'monitoring.hourly_completeness', 'hourly_completeness_check', 'archive',
    'CHECK (ws_final + rest + archive + trades + no_trades + ws_partial + missing = expected)');

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

-- Days are UTC days, whatever the session's TimeZone. Every closed hour of a pair's coverage
-- has a row (pending ones count 60 missing), so a covered day expects 1,440 minutes per pair;
-- the first day counts from the coverage start, the current day its closed hours so far.
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
       round(sum(ws_final + rest + archive + trades + no_trades)::numeric
             / nullif(sum(expected), 0), 4) AS completion_rate,
       count(*)::integer        AS hours,
       (count(*) FILTER (WHERE pending))::integer AS pending_hours,
       sum(archive)::integer    AS archive  -- last: CREATE OR REPLACE VIEW only appends
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
       round(sum(ws_final + rest + archive + trades + no_trades)::numeric
             / nullif(sum(expected), 0), 4) AS completion_rate,
       (count(*) FILTER (WHERE pending))::integer AS pending_pairs,
       sum(archive)::integer    AS archive  -- last: CREATE OR REPLACE VIEW only appends
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
                WHEN 'ws' THEN CASE WHEN p_is_final THEN 1 ELSE 6 END
                WHEN 'rest' THEN 2
                WHEN 'archive' THEN 3
                WHEN 'trades' THEN 4
                WHEN 'no_trades' THEN 5
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
-- completeness coverage and pending hours (issue 14)
--
-- Warehouses created before these columns existed get them here. Once, when coverage_start
-- is added, each pair's coverage starts at the earliest hour the chain counted for it (what
-- the warehouse itself proves was tracked); from then on capture and backfill record it.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'ops.pairs'::regclass AND attname = 'coverage_start'
                     AND NOT attisdropped) THEN
        ALTER TABLE ops.pairs ADD COLUMN coverage_start timestamptz;
        UPDATE ops.pairs p SET coverage_start = h.first_hour
        FROM (SELECT exchange, symbol, min(hour_start) AS first_hour
              FROM monitoring.hourly_completeness GROUP BY exchange, symbol) h
        WHERE h.exchange = p.exchange AND h.symbol = p.symbol;
    END IF;
END
$$;
ALTER TABLE ops.pairs ADD COLUMN IF NOT EXISTS coverage_end timestamptz;
ALTER TABLE ops.pairs ADD COLUMN IF NOT EXISTS completeness_from timestamptz;
ALTER TABLE ops.pairs ADD COLUMN IF NOT EXISTS completeness_to timestamptz;
CREATE INDEX IF NOT EXISTS hourly_completeness_pending_idx
    ON monitoring.hourly_completeness (hour_start) WHERE pending;

-- A pending row (60 minutes missing) for every closed hour of every pair's coverage that has
-- no monitoring.hourly_completeness row yet, up to p_closed_end (exclusive): completeness
-- never hides an hour the chain has not processed. Returns the rows added. Only hours outside
-- the span already done ([completeness_from, completeness_to)) are looked at, so calling it
-- every minute costs next to nothing; rows the chain wrote are never touched.
CREATE OR REPLACE FUNCTION ops.mark_pending_hours(p_closed_end timestamptz)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    v_added integer;
BEGIN
    WITH p AS (
        SELECT exchange, symbol, coverage_start AS cs,
               least(coalesce(coverage_end, p_closed_end), p_closed_end) AS ce,
               completeness_from AS mf, completeness_to AS mt
        FROM ops.pairs
        WHERE coverage_start IS NOT NULL AND listed IS DISTINCT FROM false
    ),
    spans AS (
        SELECT exchange, symbol, cs AS a,
               CASE WHEN mf IS NULL OR mt IS NULL THEN ce ELSE least(mf, ce) END AS b
        FROM p
        UNION ALL
        SELECT exchange, symbol, greatest(mt, cs), ce
        FROM p WHERE mf IS NOT NULL AND mt IS NOT NULL
    ),
    added AS (
        INSERT INTO monitoring.hourly_completeness
            (exchange, symbol, hour_start, expected, ws_final, rest, trades, no_trades,
             ws_partial, missing, completion_rate, pending)
        SELECT s.exchange, s.symbol, g.hour, 60, 0, 0, 0, 0, 0, 60, 0, true
        FROM spans s
        CROSS JOIN LATERAL generate_series(s.a, s.b - interval '1 hour', interval '1 hour')
            AS g(hour)
        WHERE s.a < s.b
        ON CONFLICT (exchange, symbol, hour_start) DO NOTHING
        RETURNING 1
    )
    SELECT count(*) INTO v_added FROM added;
    UPDATE ops.pairs
    SET completeness_from = coverage_start,
        completeness_to = greatest(completeness_to,
                                   least(coalesce(coverage_end, p_closed_end), p_closed_end))
    WHERE coverage_start IS NOT NULL AND listed IS DISTINCT FROM false
      AND (completeness_from IS DISTINCT FROM coverage_start
           OR completeness_to IS DISTINCT FROM
              greatest(completeness_to, least(coalesce(coverage_end, p_closed_end), p_closed_end)));
    RETURN v_added;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- robustness: quarantined lake parts, abandoned job runs, events the lake had to drop (issue 15)

-- A part that cannot be read is quarantined (status, reason) instead of failing its hour; the
-- loader claims it again on every later run and loads it exactly once when it reads.
ALTER TABLE ops.lake_parts ADD COLUMN IF NOT EXISTS status text NOT NULL DEFAULT 'loaded';
ALTER TABLE ops.lake_parts ADD COLUMN IF NOT EXISTS reason text NOT NULL DEFAULT '';
ALTER TABLE ops.lake_parts ADD COLUMN IF NOT EXISTS attempts integer NOT NULL DEFAULT 1;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'ops.lake_parts'::regclass
                     AND conname = 'lake_parts_status_check') THEN
        ALTER TABLE ops.lake_parts ADD CONSTRAINT lake_parts_status_check
            CHECK (status IN ('loaded', 'quarantined'));
    END IF;
END
$$;
CREATE INDEX IF NOT EXISTS lake_parts_quarantined_idx
    ON ops.lake_parts (hour_start) WHERE status = 'quarantined';

-- Who ran a step (process id and host), so a run left 'running' by a killed process can be
-- told apart and marked 'abandoned' by the next chain. Databases made before the statuses
-- 'incomplete' (a gap-fill whose requests failed) and 'abandoned' existed get the wider status
-- check here (idempotent: replaced only while it lacks one of them).
ALTER TABLE ops.job_runs ADD COLUMN IF NOT EXISTS pid integer;
ALTER TABLE ops.job_runs ADD COLUMN IF NOT EXISTS host text;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_constraint
               WHERE conrelid = 'ops.job_runs'::regclass AND conname = 'job_runs_status_check'
                 AND (pg_get_constraintdef(oid) NOT LIKE '%abandoned%'
                      OR pg_get_constraintdef(oid) NOT LIKE '%incomplete%')) THEN
        ALTER TABLE ops.job_runs DROP CONSTRAINT job_runs_status_check;
        ALTER TABLE ops.job_runs ADD CONSTRAINT job_runs_status_check
            CHECK (status IN ('running', 'ok', 'incomplete', 'failed', 'skipped', 'abandoned'));
    END IF;
END
$$;
CREATE INDEX IF NOT EXISTS job_runs_running_idx ON ops.job_runs (run_id) WHERE status = 'running';

-- kind 'lake_dropped': minutes [started_at, ended_at) of one pair whose events the daemon
-- had to drop (the lake's disk refused them past lake.max_held_bytes). The chain gap-fills
-- those hours over REST and sets repaired_at once nothing in the range is missing.
ALTER TABLE monitoring.stream_incidents ADD COLUMN IF NOT EXISTS repaired_at timestamptz;
CREATE INDEX IF NOT EXISTS stream_incidents_unrepaired_idx
    ON monitoring.stream_incidents (started_at) WHERE kind = 'lake_dropped' AND repaired_at IS NULL;
-- live warehouse (issue 16)

-- The hour in progress, so far: for every configured pair, how many of the minutes that have
-- closed already have a final answer in silver (with the live path on, finals land within
-- seconds; without it, only after the hourly chain). A minute counts as elapsed once it
-- closed 10 seconds ago (its final needs a moment to arrive and be committed), so the view
-- moves to a new hour 10 s after the hour turns. Closed hours keep their own semantics in
-- monitoring.hourly_completeness; completion_rate is NULL before the first minute elapsed.
CREATE OR REPLACE VIEW monitoring.current_hour_completeness AS
WITH t AS (
    SELECT date_bin('1 hour', now() - interval '10 seconds', timestamptz 'epoch') AS hour_start,
           date_bin('1 minute', now() - interval '10 seconds', timestamptz 'epoch') AS as_of
),
c AS (
    SELECT p.exchange, p.symbol, t.hour_start, t.as_of,
           (extract(epoch FROM t.as_of - t.hour_start) / 60)::integer AS minutes_elapsed,
           count(s.interval_start) FILTER (WHERE s.source = 'ws_final')::integer AS ws_final,
           count(s.interval_start) FILTER (WHERE s.source = 'rest')::integer AS rest,
           count(s.interval_start) FILTER (WHERE s.source = 'trades')::integer AS trades,
           count(s.interval_start) FILTER (WHERE s.source = 'no_trades')::integer AS no_trades,
           count(s.interval_start) FILTER (WHERE s.source = 'ws_partial')::integer AS ws_partial
    FROM ops.pairs p
    CROSS JOIN t
    LEFT JOIN silver.fact_ohlcv s
           ON s.exchange = p.exchange AND s.symbol = p.symbol
          AND s.interval_start >= t.hour_start AND s.interval_start < t.as_of
    WHERE p.active AND p.listed IS DISTINCT FROM false
    GROUP BY p.exchange, p.symbol, t.hour_start, t.as_of
)
SELECT exchange, symbol, hour_start, as_of, minutes_elapsed,
       ws_final, rest, trades, no_trades, ws_partial,
       minutes_elapsed - (ws_final + rest + trades + no_trades + ws_partial) AS missing,
       round((ws_final + rest + trades + no_trades)::numeric / nullif(minutes_elapsed, 0), 4)
           AS completion_rate
FROM c;

-- ---------------------------------------------------------------------------------------------

INSERT INTO ops.schema_version (version, description)
VALUES (1, 'bronze, silver, gold, ops, monitoring; hourly partitions')
ON CONFLICT (version) DO NOTHING;

-- ---------------------------------------------------------------------------------------------
-- candles out: gold 4h and 1d, vwap, published datasets, the reader role (issue 17)

-- 4h and 1d buckets (UTC-aligned), built from the exact 1h rows (klined.jobs.gold).
CREATE TABLE IF NOT EXISTS gold.ohlcv_4h (LIKE gold.ohlcv_5m INCLUDING ALL);
CREATE TABLE IF NOT EXISTS gold.ohlcv_1d (LIKE gold.ohlcv_5m INCLUDING ALL);

-- notional / volume rounded half up to 18 decimal places, exactly (an integer division, so no
-- intermediate rounding); NULL without volume or notional. Prices and volumes are positive.
CREATE OR REPLACE FUNCTION ops.vwap(p_notional numeric, p_volume numeric)
RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN p_volume > 0 AND p_notional IS NOT NULL
                THEN trim_scale(div(p_notional * 2000000000000000000 + p_volume, p_volume * 2)
                                * 0.000000000000000001) END
$$;

-- Days of the Parquet datasets (klined.datasets.publish) to write again: marked by the gold
-- refresh in the transaction that changed their rows, cleared by the publish step once the
-- day's file is written (and mirrored to S3); seq makes clearing exact, as for dirty hours.
CREATE SEQUENCE IF NOT EXISTS ops.publish_seq;
CREATE TABLE IF NOT EXISTS ops.publish_dirty (
    dataset    text NOT NULL,                  -- ohlcv_1m, ohlcv_5m, ... ohlcv_1d
    exchange   text NOT NULL,
    day        date NOT NULL,                  -- UTC day of the candles' interval_start
    marked_at  timestamptz NOT NULL DEFAULT now(),
    seq        bigint NOT NULL DEFAULT nextval('ops.publish_seq'),
    PRIMARY KEY (dataset, exchange, day)
);

-- The files the publish step wrote: one per dataset, exchange and day.
CREATE TABLE IF NOT EXISTS ops.published (
    dataset      text NOT NULL,
    exchange     text NOT NULL,
    day          date NOT NULL,
    path         text NOT NULL,                -- relative to the datasets root (and S3 prefix)
    rows         bigint NOT NULL,
    bytes        bigint NOT NULL,
    sha256       text NOT NULL,                -- hex, of the file as written
    s3_key       text,                         -- NULL while S3 is not configured
    published_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dataset, exchange, day)
);

-- The reader role (NOLOGIN, like the Looker role; give it a login by hand): SELECT on silver,
-- gold and monitoring, also on tables created there later (silver's hourly partitions). It
-- never sees bronze or ops. The Looker role keeps monitoring only (ops.grant_readonly).
CREATE OR REPLACE FUNCTION ops.grant_reader(p_role text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_schema text;
BEGIN
    PERFORM ops.grant_readonly(p_role);  -- the role, NOLOGIN, and the monitoring schema
    FOREACH v_schema IN ARRAY ARRAY['silver', 'gold'] LOOP
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', v_schema, p_role);
        EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA %I TO %I', v_schema, p_role);
        EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT SELECT ON TABLES TO %I',
                       v_schema, p_role);
    END LOOP;
END
$$;

-- One-time data migrations, each recorded here once done.
CREATE TABLE IF NOT EXISTS ops.data_migrations (
    name       text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Gold rows written before notional/vwap and 4h/1d existed: queue every 5-minute bucket for
-- the gold refresh, which fills the new columns, builds 4h and 1d, and marks the days for
-- publishing (idempotent: done once, under the schema lock).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ops.data_migrations WHERE name = 'gold_vwap_4h_1d') THEN
        INSERT INTO ops.gold_dirty (exchange, symbol, bucket_start)
        SELECT exchange, symbol, interval_start FROM gold.ohlcv_5m
        ON CONFLICT DO NOTHING;
        INSERT INTO ops.data_migrations (name) VALUES ('gold_vwap_4h_1d');
    END IF;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- archive imports (issue 18): the exchanges' published history files

-- One row per archive file loaded (klined.jobs.archive): a Binance US daily or monthly zip,
-- or one CSV of a Kraken OHLCVT zip or folder. name is the file's own name (a Kraken CSV is
-- named with its container, 'Kraken_OHLCVT_Q1_2026.zip/XBTUSD_1.csv'); sha256 is the checksum
-- of the bytes read (Binance: verified against its .CHECKSUM file first). [range_start,
-- range_end) is the span the load covered (a backfill may load part of a Kraken file);
-- first_minute/last_minute are the first and last minute it wrote (rows, and minutes the file
-- omits between rows, as no_trades). The rows enter the lake first, as sealed 'archive_'
-- parts, and bronze from there through ops.lake_parts (744 hours of parts per transaction);
-- this row is inserted in the transaction that loads the file's last parts, so a file is in
-- the ledger only once all of its parts are loaded. An interruption before that leaves no row:
-- the next import writes the file again as new parts, and the hours loaded before the
-- interruption are then in bronze twice (identical rows but for their later event time; silver
-- keeps one). A file whose checksum changed is loaded again and its older row becomes
-- 'superseded'.
CREATE TABLE IF NOT EXISTS ops.archive_files (
    file_id      bigserial PRIMARY KEY,
    exchange     text NOT NULL,
    symbol       text NOT NULL,
    name         text NOT NULL,
    sha256       text NOT NULL,
    range_start  timestamptz NOT NULL,
    range_end    timestamptz NOT NULL,
    first_minute timestamptz,                  -- NULL: the file wrote nothing
    last_minute  timestamptz,
    rows         bigint NOT NULL,              -- bronze rows written (file rows + no_trades)
    no_trades    bigint NOT NULL DEFAULT 0,    -- of them: minutes the file omits (Kraken)
    status       text NOT NULL DEFAULT 'loaded' CHECK (status IN ('loaded', 'superseded')),
    loaded_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS archive_files_name_idx ON ops.archive_files (exchange, name);
CREATE INDEX IF NOT EXISTS archive_files_sha_idx ON ops.archive_files (exchange, sha256);

-- Schema version 2: silver ranks renumbered once for the archive source (ws_final 1, rest 2,
-- archive 3, trades 4, no_trades 5, ws_partial 6; trades, no_trades and ws_partial were 3, 4
-- and 5). The rank follows from the stored source, so the update is idempotent; the version row
-- keeps later starts from scanning silver again.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM ops.schema_version WHERE version = 2) THEN
        UPDATE silver.fact_ohlcv
        SET rank = CASE source WHEN 'ws_final' THEN 1 WHEN 'rest' THEN 2 WHEN 'archive' THEN 3
                               WHEN 'trades' THEN 4 WHEN 'no_trades' THEN 5 ELSE 6 END
        WHERE rank IS DISTINCT FROM
              CASE source WHEN 'ws_final' THEN 1 WHEN 'rest' THEN 2 WHEN 'archive' THEN 3
                          WHEN 'trades' THEN 4 WHEN 'no_trades' THEN 5 ELSE 6 END;
        INSERT INTO ops.schema_version (version, description)
        VALUES (2, 'archive source: ops.archive_files, completeness archive, silver ranks')
        ON CONFLICT (version) DO NOTHING;
    END IF;
END
$$;
