"""PixelCraft gateway: the rate-limiting TLS edge in front of the chat service.

The packages are the architecture:

- `edge`: the data plane. The public listeners (asyncio Protocols on llhttp), one exchange per
  request, the relay to the upstream pool, WebSocket tunnels, the routes the gateway answers
  itself, the access log.
- `auth`: whom a request is from: a verified JWT, a believed X-User-Id, or the client address.
- `limiting`: what a request may do: policies, the limiter and its breaker, Redis buckets and
  leases, token budgets settled after the answer, the RateLimit header fields.
- `tls`: certificates (loaded, checked, hot-reloaded), ACME challenges, OpenSSL settings.
- `serving`: the process: server lifecycle, the multi-worker supervisor, reloads, the pid file.

At the top: `app` (the composition root: settings in, a wired application out), `settings`,
`keys` (every AppKey), `errors` (every error a client or operator sees), `metrics` and
`openapi` (the merged document at /openapi.json).
"""
