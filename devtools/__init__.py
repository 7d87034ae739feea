"""Development tools, not part of the runtime wheel: `services` starts private Redis,
PostgreSQL and nginx instances (for `make run`, the tests and the benchmarks); `harness` holds
what the benchmark and the load test share (processes, CPU accounting, ports)."""
