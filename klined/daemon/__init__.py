"""The long-running process (``klined run``): supervision, the chain plug-in, status, metrics.

:mod:`~klined.daemon.process` owns the top-level task group (streams, lake writer and
uploader, scheduler, servers); :mod:`~klined.daemon.chain` plugs the hourly chain into it;
:mod:`~klined.daemon.status_server` serves (and reads) the status socket;
:mod:`~klined.daemon.metrics` the Prometheus endpoint; :mod:`~klined.daemon.systemd` readiness
and watchdog notifications.
"""
