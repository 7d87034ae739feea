"""Whom a request is from, decided once per request before any limit is checked.

`identity`: the client's address (through trusted proxies only), a believed X-User-Id
(GATEWAY_USER_ID_HEADER), and the `Identity` the limiter keys on. `tokens`: bearer JWTs verified
against a shared secret or a JWKS fetched and cached in the background; the `sub` claim names the
user and a token's absence or fault is a 401 that says which.
"""
