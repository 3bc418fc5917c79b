# import-status-exporter. Build: docker build -t import-status-exporter .
# Run:   docker run -v $PWD/config.yaml:/etc/import-status-exporter/config.yaml:ro \
#          -v import-state:/var/lib/import-status-exporter -p 10451:10451 import-status-exporter
# Flags go after the image name and keep the config and storage paths:
#        docker run ... import-status-exporter --log.level=debug
# The base image is pinned by version; pin it by digest too in your registry
# mirror if you need byte-for-byte rebuilds.
FROM python:3.12.8-slim-bookworm

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="import-status-exporter" \
      org.opencontainers.image.description="Prometheus exporter for long-running SaaS data imports (Voyado Elevate, Zilliant, Rocket.Chat)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/import-status-exporter/import-status-exporter" \
      org.opencontainers.image.url="https://github.com/import-status-exporter/import-status-exporter" \
      org.opencontainers.image.documentation="https://github.com/import-status-exporter/import-status-exporter#deploying" \
      org.opencontainers.image.base.name="docker.io/library/python:3.12.8-slim-bookworm"

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    IMPORT_STATUS_EXPORTER_CONFIG_FILE=/etc/import-status-exporter/config.yaml \
    IMPORT_STATUS_EXPORTER_STORAGE_PATH=/var/lib/import-status-exporter/imports.db
WORKDIR /app
# The versions CI tested (constraints.txt), not whatever is newest today.
COPY constraints.txt pyproject.toml README.md LICENSE ./
COPY exporter ./exporter
COPY docker/healthcheck.py /usr/local/bin/import-status-healthcheck
# The postgres extra (psycopg): storage.url works in the image too.
RUN pip install --disable-pip-version-check --constraint constraints.txt ".[postgres]" \
 && chmod 0755 /usr/local/bin/import-status-healthcheck \
 && useradd --system --uid 10001 --no-create-home exporter \
 && mkdir -p /etc/import-status-exporter /var/lib/import-status-exporter \
 && chown 10001 /var/lib/import-status-exporter

USER 10001
EXPOSE 10451
# Mount your config at /etc/import-status-exporter/config.yaml (a bind mount,
# not a VOLUME: an anonymous volume would be left behind at every run). Keep
# /var/lib/import-status-exporter, the SQLite store, on a named volume.
# The check reads the port from the exporter's own flags and speaks TLS when
# the web config turns it on; with basic auth a 401 counts as alive.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
  CMD ["import-status-healthcheck"]
# The config and storage paths are the program's defaults in this image (the
# two ENV above), so flags given to `docker run` add to them, not replace them.
ENTRYPOINT ["import-status-exporter"]
CMD ["--web.listen-address=:10451"]
