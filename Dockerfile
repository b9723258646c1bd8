# syntax=docker/dockerfile:1
# pasid-broker's image: a builder stage makes the wheels (pasid-broker and its pinned
# dependencies, constraints.txt), the runtime stage installs them into a venv and runs as
# an unprivileged user. Build: `docker build -t pasid-broker .`, or `buildah bud --format
# docker` (the OCI format drops HEALTHCHECK). `make image-test` builds it with buildah on a
# local Debian base and runs it (tests/deploy/test_image_build.py); `make test` runs its
# install steps in a clean venv and lints this file with hadolint (test_image.py).
# The base is pinned by digest; to move it, `docker buildx imagetools inspect
# python:3.11-slim-bookworm` and replace the digest (in both stages: one ARG).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY proto proto
COPY clients clients
COPY broker broker
# PIP_CONSTRAINT reaches the isolated build environment too (the pinned setuptools).
ENV PIP_CONSTRAINT=/src/constraints.txt \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Two distributions: pasid-client (clients/, with proto/ through its symlink) and the
# server, which requires it.
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels ./clients . \
    && cp constraints.txt /wheels/

FROM ${PYTHON_IMAGE}
ARG UID=10001
# The socket directory is shared with the host (VMMs connect there); its group decides
# who may connect (PASID_BROKER_SOCKET_GROUP, mode 0660).
RUN groupadd --system --gid "${UID}" pasid-broker \
    && useradd --system --uid "${UID}" --gid "${UID}" --home-dir /var/lib/pasid-broker \
       --no-create-home --shell /usr/sbin/nologin pasid-broker \
    && mkdir -p /var/lib/pasid-broker /run/pasid-broker \
    && chown "${UID}:${UID}" /var/lib/pasid-broker /run/pasid-broker
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/pasid-broker \
    && /opt/pasid-broker/bin/pip install --no-cache-dir --no-index --find-links /wheels \
       --constraint /wheels/constraints.txt /wheels/pasid_broker-*.whl \
    && /opt/pasid-broker/bin/pasid-broker --version
ENV PATH=/opt/pasid-broker/bin:$PATH \
    PASID_BROKER_DB=/var/lib/pasid-broker/broker.db \
    PASID_BROKER_SOCKET=/run/pasid-broker/broker.sock \
    PASID_BROKER_LOG_FORMAT=json \
    PASID_BROKER_METRICS_ADDRESS=0.0.0.0:9464 \
    PASID_BROKER_HEALTH_ADDRESS=0.0.0.0:9465
# Metrics and health listen on all of the container's addresses (its own network
# namespace), so a published port or a Kubernetes probe reaches them; the PASID API stays
# on the Unix socket.
VOLUME ["/var/lib/pasid-broker", "/run/pasid-broker"]
EXPOSE 9464 9465
USER ${UID}:${UID}
# grpc.health.v1 over the Unix socket: SERVING only after recovery, NOT_SERVING on drain.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["pasid-broker", "health", "--timeout", "4"]
ENTRYPOINT ["pasid-broker"]
CMD ["--backend", "simulator"]
