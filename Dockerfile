FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN pip install --disable-pip-version-check . \
 && useradd --system --uid 10001 --no-create-home exporter \
 && mkdir -p /var/lib/import-status-exporter \
 && chown 10001 /var/lib/import-status-exporter

USER 10001
EXPOSE 10451
# Mount your config at /etc/import-status-exporter/config.yaml; registrations
# and import state live in /var/lib/import-status-exporter (keep it on a volume).
VOLUME ["/etc/import-status-exporter", "/var/lib/import-status-exporter"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:10451/-/healthy', timeout=4).status != 200)"
ENTRYPOINT ["import-status-exporter"]
CMD ["--config.file=/etc/import-status-exporter/config.yaml", "--web.listen-address=:10451", \
     "--storage.path=/var/lib/import-status-exporter/imports.db"]
