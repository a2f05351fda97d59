# ledgergate: the gateway and the consumers (`ledgergate run`, `ledgergate consume ...`), with the
# example upstream (whatsapp-mcp-server, stdio) installed. compose.yaml runs it; the RUN steps
# are the README's install steps ("Scale out"), checked by tests/test_compose.py.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY consumers consumers
COPY schemas schemas
COPY eventlog eventlog
COPY ledgergate ledgergate
COPY scripts scripts
COPY examples examples

RUN python3 -m venv .venv
RUN .venv/bin/python -m pip install '.[kafka,fast]'
RUN bash scripts/install-upstreams.sh

ENV PATH=/app/.venv/bin:$PATH
# the data dir (event-log spool, embedded store if used) is a volume
VOLUME /data
EXPOSE 8080
ENTRYPOINT ["ledgergate"]
CMD ["run", "-c", "examples/ledgergate.toml"]
