"""Rate limiting: exact across gateway replicas because the state lives in Redis.

`policies` reads ratelimits.toml, plans included (validated at boot and on SIGHUP). `limiter`
plans which buckets a request takes from (its plan's version of each policy, then any override)
and decides; `decisions` is what it answers (verdicts, the 429); `breaker` decides whether Redis
is asked at all, each policy following its failure_mode while it is not; `settlement` releases
leases and settles token budgets after the response; `usage` reads the tokens an answer really
used. The Redis side: `buckets` (the token-bucket script, coalesced round trips, and the
in-process fallback), `leases` (concurrency caps), `overrides` (per-user overrides, cached per
process), `scripts` (the Lua files in `lua/`), `resp` (the limiter's own RESP connection),
`backend` (the client: one Redis, a Cluster or Sentinel). `headers` renders the RateLimit fields.
The operator's side: `operator` (show, set, unset, reset, audit) behind `cli` (`python -m gateway
limits`) and `admin` (the `/limits` API on the admin port).
"""
