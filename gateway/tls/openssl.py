"""Points OPENSSL_CONF at the gateway's OpenSSL configuration, gateway/tls/openssl.cnf.

`python -m gateway` imports this module first, before anything loads OpenSSL: OpenSSL reads its
configuration once per process, when the first module that uses it (hashlib, ssl) is imported,
and that file is the only way Python can set the TLS key-exchange groups. Worker processes inherit
the variable. Nothing else imports this module (gateway.tls.certificates checks the variable without
setting it), so tests and tools that import the gateway keep their own OpenSSL setup. An
OPENSSL_CONF the operator set is left alone (a FIPS setup, say).
"""

from __future__ import annotations

import os
from pathlib import Path

PATH = Path(__file__).with_name("openssl.cnf")

os.environ.setdefault("OPENSSL_CONF", str(PATH))
