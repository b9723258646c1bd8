# Minimal image: the broker on the simulator backend. (The VFIO backend needs /dev/vfio
# passed in and a kernel with VFIO_IOMMU_PASID_REQUEST.)
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY broker broker
COPY clients clients
COPY proto proto
# Two distributions: pasid-client (clients/, with proto/ through its symlink) and the server.
RUN pip install --no-cache-dir ./clients .
VOLUME ["/var/lib/pasid-broker", "/run/pasid-broker"]
# Metrics: loopback by default on a host; inside the container's own network namespace,
# on all its addresses so that a published port (-p 9464:9464) reaches them.
ENV PASID_BROKER_METRICS_ADDRESS=0.0.0.0:9464
EXPOSE 9464
ENTRYPOINT ["pasid-broker"]
CMD ["--backend", "simulator", "--log-format", "json"]
