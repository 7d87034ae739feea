"""The data plane: the gateway's public listeners, built from asyncio Protocols on llhttp.

Every byte a client sends to the HTTP and HTTPS ports goes through here, and nothing of
aiohttp's request or response machinery: aiohttp alone costs about 11x nginx per request, and the
gateway's job is bytes in, bytes out (issue 12). One module per part:

- `wire`: bytes that never change (status lines, framing) and pure renderers.
- `request`: a request head as llhttp parsed it, checked once and read once.
- `flow`: the one flow-control helper both sides use.
- `connection`: the client side: parsing, pipelining, keep-alive, connection deadlines.
- `exchange`: one request from head to finish(): identity, limits, body, forwarding, relaying.
- `upstream`: the upstream side: a keep-alive pool of response-parsing connections.
- `tunnel`: WebSocket after the upstream's 101, a byte tunnel both ways.
- `routes`: what the gateway answers itself (/healthz, /readyz, /openapi.json, /docs, ACME).
- `plane`: the shared state, the listeners, drain and close.

aiohttp stays where it serves well: the composition root (gateway.app), the admin port, and
outbound clients (JWKS, the upstream's OpenAPI document).
"""
