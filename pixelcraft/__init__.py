"""What both PixelCraft services share at run time.

`contract`: the facts the gateway and the chat service must agree on (user and request ids,
header names, the anonymous namespace). `problems`: the one RFC 9457 problem renderer. `aio`:
background tasks with an owner. `boot`: checking configuration at startup (exit 78) and
reaching dependencies with bounded retries. `fields`, `logs`, `openapi`, `serve`: settings
validators, logging, the OpenAPI helpers and the aiohttp serve loop.

Development and operations code is not here: `devtools/` (local Redis/PostgreSQL/nginx for
`make run`, the tests and the benchmarks) and `ops/` (backup and restore) ship with the
repository, not in the wheel.
"""
