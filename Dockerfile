# DotMac Sidecar image: `docker build -t ghcr.io/dotmac/sidecar:0.1.0 .`
# Multi-stage: the package is installed the README's way (pip install .) into a virtualenv
# in a build stage; the final stage copies only that virtualenv onto the same slim base, so
# no compiler, pip cache or source tree ships. Runs as a non-root user, writes nothing
# outside /tmp (mount an emptyDir there), so readOnlyRootFilesystem works.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/dotmac
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY dotmac ./dotmac
RUN /opt/dotmac/bin/pip install . \
    && /opt/dotmac/bin/python -m compileall -q /opt/dotmac/lib \
    && /opt/dotmac/bin/python -c "import aiohttp.http_parser as p; assert p.HttpRequestParser is not p.HttpRequestParserPy"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="dotmac-sidecar" \
      org.opencontainers.image.description="Authenticating, authorizing reverse proxy sidecar" \
      org.opencontainers.image.licenses="MIT"
RUN groupadd --gid 10001 dotmac \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin dotmac
COPY --from=build /opt/dotmac /opt/dotmac
ENV PATH=/opt/dotmac/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000 9090
ENTRYPOINT ["dotmac-sidecar", "run"]
