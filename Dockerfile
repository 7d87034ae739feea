# syntax=docker/dockerfile:1
# PixelCraft gateway and chat service: one image, two entry points.
#
#   scripts/build-image                     # or: make image   (builds the wheels, then this file)
#   podman run IMAGE                        # python -m gateway (the default command)
#   podman run IMAGE python -m upstream     # the chat service
#
# The build installs only the runtime wheel and its dependencies, from wheels built beforehand
# into the build context's wheels/ folder (scripts/build-image does it): no network is needed
# inside the build, and no certificate authority is ever copied into the image. BASE is any
# Debian-like image with python3 (3.11+) and its venv module; the wheels must match its Python.
ARG BASE=python:3.12-slim-bookworm

FROM ${BASE} AS build
COPY wheels/ /tmp/wheels/
# python3, not python: Debian's own python3 has no `python`; the venv provides one either way.
# pip and setuptools leave the venv afterwards: nothing installs at run time.
RUN python3 -m venv /opt/pixelcraft \
 && /opt/pixelcraft/bin/python -m pip install --no-index --find-links /tmp/wheels \
        --no-cache-dir --disable-pip-version-check --no-warn-script-location pixelcraft-gateway \
 && /opt/pixelcraft/bin/python -m pip uninstall --yes --quiet --disable-pip-version-check \
        pip setuptools \
 && /opt/pixelcraft/bin/python -c "import gateway.__main__, upstream.__main__"

FROM ${BASE}
ARG BASE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
# The repository's URL (scripts/build-image passes `git remote get-url origin` when there is one).
ARG SOURCE=
LABEL org.opencontainers.image.title="pixelcraft-gateway" \
      org.opencontainers.image.description="PixelCraft rate-limiting TLS gateway (python -m gateway, the default) and the chat service behind it (python -m upstream)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Proprietary" \
      org.opencontainers.image.vendor="PixelCraft" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="${BASE}"

# The service user (no login, no home). Written directly: a minimal Debian base may lack useradd.
RUN echo 'pixelcraft:x:10001:10001:PixelCraft:/nonexistent:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'pixelcraft:x:10001:' >> /etc/group

COPY --from=build /opt/pixelcraft /opt/pixelcraft
COPY docker/healthcheck.py /opt/pixelcraft/healthcheck.py
# The working directory holds config/ratelimits.toml, so GATEWAY_RATELIMIT_CONFIG's default
# (a relative path) works; mount your own policies over it, or a .env beside it. Root-owned:
# the service reads its configuration, it never writes it.
COPY config/ratelimits.toml /srv/pixelcraft/config/ratelimits.toml
WORKDIR /srv/pixelcraft

ENV PATH=/opt/pixelcraft/bin:$PATH \
    VIRTUAL_ENV=/opt/pixelcraft \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001

# Gateway: HTTP (ACME challenges and the redirect when TLS is on), HTTPS, admin (/metrics; set
# GATEWAY_ADMIN_HOST=0.0.0.0 to scrape it from another container). Chat service: 8000
# (set UPSTREAM_HOST=0.0.0.0 when the gateway runs in another container).
EXPOSE 8080 8443 9100 8000

# GET /healthz of whichever service the container runs, on the port and scheme its settings say
# (the HTTPS port when TLS is on, since the HTTP port then answers a 308). urllib: no curl here.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/pixelcraft/bin/python", "/opt/pixelcraft/healthcheck.py"]

# SIGTERM drains in-flight requests and streams (GATEWAY_DRAIN_SECONDS / UPSTREAM_DRAIN_SECONDS,
# 30 s by default): give `stop` a longer timeout than that (podman stop -t 40, compose's
# stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "gateway"]
