"""The gateway as a process: serve, reload, drain, stop.

`server` runs one process's listeners, its admin port, SIGHUP reloads and the SIGTERM drain.
`supervisor` runs GATEWAY_WORKERS such processes on one port and serves their summed metrics.
`lifecycle` counts requests in flight and runs the reloaders; `pidfile` is for the certbot hook.
"""
