"""The long-running process (``klined run``): supervision, the chain plug-in, status, metrics.

:mod:`~klined.daemon.process` owns the top-level task group (streams, lake writer and
uploader, scheduler, servers); :mod:`~klined.daemon.chain` plugs the hourly chain into it;
:mod:`~klined.daemon.streams` builds and supervises the exchanges' streams;
:mod:`~klined.daemon.held` sees the events the lake's disk refused through to the end;
:mod:`~klined.daemon.status_server` serves (and reads) the status socket;
:mod:`~klined.daemon.metrics` the Prometheus endpoint; :mod:`~klined.daemon.systemd` readiness
and watchdog notifications.
"""
