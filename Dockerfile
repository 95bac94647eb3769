# gradserve: the gRPC gradient service in a container (docs/deploy.md).
#
#   docker build --build-arg BASE="${GRADSERVE_BASE_IMAGE:-python:3.12-slim}" \
#       -t localhost/gradserve:0.1.0 .
#   (podman: `podman build --format docker ...`; its default OCI format drops HEALTHCHECK)
#   docker run --rm -p 127.0.0.1:50051:50051 localhost/gradserve:0.1.0
#
# BASE is any Debian-like image with python3 (>= 3.11), venv and pip; the
# official python image by default (GRADSERVE_BASE_IMAGE names another, e.g. a
# local base where Docker Hub is out of reach). Only `python3` is used (some
# bases have no plain `python`).
ARG BASE=python:3.12-slim

# --- build: every wheel the service needs -------------------------------------
FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# The dependencies first, from pyproject.toml alone: this layer is reused until
# the dependencies change, whatever happens to the code.
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
        > requirements.txt \
 && python3 -m pip wheel --wheel-dir /wheels -r requirements.txt
# Then the package itself.
COPY README.md ./
COPY engine/ engine/
COPY server/ server/
COPY client/ client/
COPY cli/ cli/
COPY proto/ proto/
RUN python3 -m pip wheel --no-deps --wheel-dir /wheels .

# --- runtime: the wheels installed into a virtual environment ------------------
FROM ${BASE}
ENV VIRTUAL_ENV=/opt/gradserve \
    PATH=/opt/gradserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Only the wheels cross over from the build stage; the install needs no network.
# (Not `RUN --mount=type=bind,from=build`: podman 4.3's buildah mounts nothing
# when the build stage comes from its cache.)
COPY --from=build /wheels /tmp/wheels
RUN python3 -m venv /opt/gradserve \
 && /opt/gradserve/bin/python3 -m pip install --no-cache-dir --no-index \
        --find-links /tmp/wheels gradserve \
 && rm -rf /tmp/wheels \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gradserve

# Inside a container the service listens on every interface (the command's own
# default, outside a container, stays 127.0.0.1). Every `gradserve serve` flag
# can be set this way: GRADSERVE_<FLAG>, e.g. GRADSERVE_MAX_NODES.
ENV GRADSERVE_HOST=0.0.0.0 \
    GRADSERVE_PORT=50051
EXPOSE 50051
USER 10001:10001
WORKDIR /tmp

# A real grpc.health.v1 check of the whole server, with the installed package
# (exit 0 only when SERVING; NOT_SERVING while it shuts down). Without --server it
# checks 127.0.0.1:$GRADSERVE_PORT, so it follows the port if that is changed.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["gradserve", "health", "--timeout", "3"]

# Exec form: the Python process is PID 1 and gets SIGTERM itself (health turns
# NOT_SERVING, calls in flight get GRADSERVE_GRACE seconds, default 8: less than
# `docker stop`'s and `podman stop`'s 10 s before SIGKILL; then exit 0).
# `docker run IMAGE` serves; `docker run IMAGE demo` or `... health --server H:P` work too.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gradserve"]
CMD ["serve"]
