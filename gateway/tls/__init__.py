"""TLS on the public port: the certificate certbot manages, and what it needs from the gateway.

`certificates` loads and checks the certificate, key and chain (Mozilla intermediate settings),
exports their expiry, and hot-reloads them on SIGHUP or when the files change, without dropping
a connection. `acme` serves HTTP-01 challenges from certbot's webroot on the HTTP port.
`openssl` points OpenSSL at `openssl.cnf` (the key-exchange groups) before it is first used.
"""
