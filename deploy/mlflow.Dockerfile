# The MLflow tracking server: PostgreSQL backend store, artifacts served from a volume.
# Built by deploy/compose.yaml; the factory's clients run the same MLflow version.
FROM python:3.11.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

COPY mlflow-server.txt /tmp/mlflow-server.txt
RUN pip install --no-cache-dir -r /tmp/mlflow-server.txt

# The artifact volume is created from this folder, so it starts owned by the server's user.
ARG UID=10001
RUN useradd --no-log-init --create-home --uid "${UID}" mlflow \
 && mkdir /mlartifacts \
 && chown mlflow /mlartifacts
USER ${UID}
EXPOSE 5000

ENTRYPOINT ["mlflow", "server"]
