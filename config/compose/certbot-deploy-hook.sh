#!/bin/sh
# certbot --deploy-hook in compose.yaml's certbot service (profile tls): install the renewed
# private key and full chain as one PEM file, $PIXELCRAFT_TLS_DIR/gateway.pem (default
# /tls/gateway.pem, the gateway's /etc/pixelcraft/tls/gateway.pem), mode 0640, owned by the
# image's user (10001; PIXELCRAFT_TLS_OWNER), by a rename: the gateway never reads a new
# certificate with an old key, nor a half-written file. It loads the new file on its next poll
# (GATEWAY_TLS_POLL_SECONDS). certbot sets RENEWED_LINEAGE (its live/<name> directory).
set -eu
: "${RENEWED_LINEAGE:?certbot sets RENEWED_LINEAGE}"
dir=${PIXELCRAFT_TLS_DIR:-/tls}
owner=${PIXELCRAFT_TLS_OWNER:-10001:10001}
umask 077
tmp="$dir/.gateway.pem.$$"
trap 'rm -f "$tmp"' EXIT
cat "$RENEWED_LINEAGE/privkey.pem" "$RENEWED_LINEAGE/fullchain.pem" >"$tmp"
chown "$owner" "$tmp"
chmod 0640 "$tmp"
mv -f "$tmp" "$dir/gateway.pem"
trap - EXIT
