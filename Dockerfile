# Minimal image: the broker on the simulator backend. (The VFIO backend needs /dev/vfio
# passed in and a kernel with VFIO_IOMMU_PASID_REQUEST.)
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY broker broker
COPY clients clients
COPY proto proto
RUN pip install --no-cache-dir .
VOLUME ["/var/lib/pasid-broker", "/run/pasid-broker"]
ENTRYPOINT ["pasid-broker"]
CMD ["--backend", "simulator", "--log-format", "json"]
