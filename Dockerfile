# One image for the worker and the scoring service (docker-compose.yml runs both).
FROM python:3.11-slim
WORKDIR /app
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# the CPU build of torch (an unpinned torch from the default index is a multi-GB CUDA build)
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
# every folder pyproject's package-dir installs (the layers of README "Layers")
COPY driftrec driftrec
COPY contract contract
COPY models models
COPY storage storage
COPY streams streams
COPY serving serving
RUN pip install --no-cache-dir ".[baselines]"
ENTRYPOINT ["driftrec"]
