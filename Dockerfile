# One image for the worker and the scoring service (docker-compose.yml runs both).
FROM python:3.11-slim
WORKDIR /app
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY driftrec driftrec
COPY streams streams
COPY models models
COPY serving serving
RUN pip install --no-cache-dir ".[baselines]"
ENTRYPOINT ["driftrec"]
