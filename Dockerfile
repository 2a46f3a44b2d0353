# metergate: the gateway, its simulated providers and the `metergate demo` command.
#   docker build -t metergate .
#   docker run --rm -p 8080:8080 -p 9102:9102 metergate          # the demo: no config, no API key
#   docker run --rm -p 8080:8080 -p 9102:9102 -v "$PWD/metergate.yaml:/etc/metergate/metergate.yaml:ro" \
#     -e OPENAI_API_KEY metergate metergate serve --config /etc/metergate/metergate.yaml
# For `serve`, the config's server.listen and server.metrics_listen must use 0.0.0.0 to be reachable.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
# constraints.txt pins every dependency to the versions the tests ran with.
RUN pip install -c constraints.txt . \
    && groupadd --system --gid 10001 metergate \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin metergate \
    && install -d -o 10001 -g 10001 /var/lib/metergate \
    && rm -rf /src

# The working directory is writable: a relative ledger path (the default sqlite:///metergate.db) lands here.
WORKDIR /var/lib/metergate
USER 10001:10001

# 8080: the LLM APIs; 9102: /metrics, /healthz, /readyz
EXPOSE 8080 9102

CMD ["metergate", "demo", "--listen", "0.0.0.0:8080", "--metrics-listen", "0.0.0.0:9102"]
