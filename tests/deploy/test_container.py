"""The real image: build the Dockerfile with podman, run it, talk to it over gRPC
from the host, stop it with SIGTERM; and the deployment files parse and agree.

The container tests need podman and a base image. On these machines
../shared/container/make-base-image.sh (beside the repository, on CI too) installs
podman and builds a local Debian base; where it is missing or fails (a user's
laptop) they skip with the reason, unless GRADSERVE_REQUIRE_CONTAINER=1 (set by
.ci/run), which turns the skip into a failure.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client import Client, GraphBuilder
from support import REPO

# podman asks runc for its own open-files and process limits (above this sandbox's
# hard limits, which runc may not raise: "error setting rlimit ... operation not
# permitted"); the container gets the test process's own limits instead.
HOST_ULIMITS = tuple(
    f"--ulimit={name}={soft}:{hard}"
    for name, (soft, hard) in (("nofile", resource.getrlimit(resource.RLIMIT_NOFILE)),
                               ("nproc", resource.getrlimit(resource.RLIMIT_NPROC)))
    if hard != resource.RLIM_INFINITY)

MAKE_BASE_IMAGE = REPO.parent / "shared" / "container" / "make-base-image.sh"
IMAGE = "localhost/gradserve:test"
REQUIRED = os.environ.get("GRADSERVE_REQUIRE_CONTAINER") == "1"
# What the build context may hold (.dockerignore): the package and what its build reads.
CONTEXT = {"pyproject.toml", "README.md", "engine", "server", "client", "cli", "proto"}


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason} (GRADSERVE_REQUIRE_CONTAINER=1: the container test must run)")
    pytest.skip(reason)


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


@pytest.fixture(scope="module")
def podman():
    """run(*args, check=True, timeout=120) -> CompletedProcess of `podman args...`,
    with the environment make-base-image.sh prints (CONTAINERS_CONF, GRADSERVE_BASE_IMAGE)."""
    if not MAKE_BASE_IMAGE.is_file():
        _unavailable(f"no {MAKE_BASE_IMAGE}: it installs podman and builds the base image "
                     "on this kind of machine")
    started = time.monotonic()
    try:
        made = subprocess.run(["bash", str(MAKE_BASE_IMAGE)], capture_output=True, text=True,
                              timeout=900)
    except subprocess.TimeoutExpired:
        _unavailable(f"{MAKE_BASE_IMAGE.name} took more than 900 s")
    if made.returncode != 0:
        _unavailable(f"{MAKE_BASE_IMAGE.name} failed (exit {made.returncode}; it needs root "
                     f"and Debian's package registry):\n{_tail(made.stderr)}")
    env = dict(os.environ)
    for line in made.stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line[len("export "):].partition("=")
            env[key.strip()] = value.strip().strip("'\"")
    if "GRADSERVE_BASE_IMAGE" not in env or shutil.which("podman", path=env.get("PATH")) is None:
        _unavailable(f"{MAKE_BASE_IMAGE.name} left no podman or no GRADSERVE_BASE_IMAGE "
                     f"(stdout: {made.stdout!r})")
    print(f"\n[container] base image ready in {time.monotonic() - started:.1f} s")

    def run(*args, check=True, timeout=120):
        done = subprocess.run(["podman", *args], capture_output=True, text=True, env=env,
                              timeout=timeout)
        if check and done.returncode != 0:
            pytest.fail(f"podman {' '.join(args)} exited {done.returncode}:\n{_tail(done.stderr)}")
        return done

    run.env = env
    # make-base-image.sh's containers.conf sets the limits itself (capped to what runc may
    # set here); passing --ulimit on top of it fails with "error setting rlimit type 6".
    conf = env.get("CONTAINERS_CONF")
    run.ulimits = () if conf and "default_ulimits" in Path(conf).read_text() else HOST_ULIMITS
    return run


@pytest.fixture(scope="module")
def image(podman) -> str:
    started = time.monotonic()
    podman("build", "--format", "docker", "--build-arg",
           f"BASE={podman.env['GRADSERVE_BASE_IMAGE']}", "-t", IMAGE, str(REPO), timeout=900)
    print(f"\n[container] podman build in {time.monotonic() - started:.1f} s")
    return IMAGE


def _wait_serving(address: str, podman, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            if state != "running":
                logs = podman("logs", name, check=False)
                pytest.fail(f"container {state} before serving:\n{_tail(logs.stdout + logs.stderr)}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
            time.sleep(0.2)
    logs = podman("logs", name, check=False)
    pytest.fail(f"{address} not SERVING after {timeout:g} s ({last}):\n"
                f"{_tail(logs.stdout + logs.stderr)}")


@pytest.mark.container
@pytest.mark.timeout(1200)
def test_image_serves_the_seed_example_and_stops_cleanly_on_sigterm(podman, image):
    config = podman("image", "inspect", "--format",
                    "{{.Config.User}}|{{.Config.ExposedPorts}}|{{.Config.Healthcheck}}",
                    image).stdout
    user, ports, healthcheck = config.strip().split("|", 2)
    assert user and user.split(":")[0] not in ("", "0", "root"), config
    assert "50051/tcp" in ports, config
    assert "gradserve health" in healthcheck, (
        f"HEALTHCHECK lost (build with --format docker): {config}")

    name = f"gradserve-test-{uuid.uuid4().hex[:12]}"
    try:
        started = time.monotonic()
        podman("run", "-d", *podman.ulimits, "--name", name, "-p", "127.0.0.1::50051", image)
        host_port = podman("port", name, "50051/tcp").stdout.strip().splitlines()[0]
        assert host_port.startswith("127.0.0.1:"), f"published beyond loopback: {host_port}"
        address = host_port
        _wait_serving(address, podman, name)
        print(f"\n[container] SERVING on {address} {time.monotonic() - started:.1f} s after run")

        # The image's own HEALTHCHECK (a grpc.health.v1 check inside the container).
        # podman's timers for it need systemd, so run it by hand.
        check = podman("healthcheck", "run", name, check=False)
        assert check.returncode == 0, f"HEALTHCHECK failed: {check.stdout}{check.stderr}"

        # Not root, and the Python server is PID 1 (so SIGTERM reaches it).
        assert podman("exec", name, "id", "-u").stdout.strip() not in ("", "0")
        pid1 = podman("exec", name, "cat", "/proc/1/cmdline").stdout.split("\0")
        assert "python" in Path(pid1[0]).name and "serve" in pid1, pid1

        g = GraphBuilder()
        x, y = g.input("x", "float32", [1]), g.input("y", "float32", [1])
        g.output("o", (x + y) * g.sin(x))
        pi = np.float32([np.pi])
        with Client(address, timeout=30.0) as client:
            r = client.differentiate(g, {"x": pi, "y": pi})
        dx, dy = r.jacobian["o", "x"], r.jacobian["o", "y"]
        assert dx.dtype == np.float32 and dy.dtype == np.float32
        assert abs(dx.item() - (-6.2832)) < 1e-4, dx
        assert abs(dy.item() - (-8.7423e-08)) < 1e-11, dy

        # SIGTERM (podman stop sends the image's STOPSIGNAL, SIGKILL only after 20 s):
        # health NOT_SERVING, a short grace, exit 0.
        stopping = time.monotonic()
        podman("stop", "-t", "20", name, timeout=60)
        took = time.monotonic() - stopping
        exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        logs = podman("logs", name, check=False)
        assert exit_code == "0", (f"exit code {exit_code} after SIGTERM ({took:.1f} s):\n"
                                  f"{_tail(logs.stdout + logs.stderr)}")
        assert took < 15, f"stop took {took:.1f} s: SIGTERM did not end the server"
        print(f"[container] stopped by SIGTERM in {took:.1f} s, exit code 0")
    finally:
        podman("rm", "-f", "-t", "0", name, check=False, timeout=60)


@pytest.mark.container
@pytest.mark.timeout(600)
def test_build_context_holds_only_what_the_image_needs(podman, tmp_path):
    """.dockerignore: COPY . of the real context into a throwaway image and list it."""
    dockerfile = tmp_path / "Dockerfile.context"
    dockerfile.write_text(textwrap.dedent("""\
        ARG BASE
        FROM ${BASE}
        COPY . /context
        """))
    tag = f"localhost/gradserve-context:{uuid.uuid4().hex[:12]}"
    podman("build", "--build-arg", f"BASE={podman.env['GRADSERVE_BASE_IMAGE']}",
           "-f", str(dockerfile), "-t", tag, str(REPO), timeout=300)
    try:
        top = podman("run", "--rm", *podman.ulimits, tag, "ls", "-A", "/context").stdout.split()
        caches = podman("run", "--rm", *podman.ulimits, tag, "find", "/context",
                        "-name", "__pycache__", "-o", "-name", "*.pyc",
                        "-o", "-name", "*.egg-info").stdout.split()
    finally:
        podman("rmi", "-f", tag, check=False)
    assert set(top) <= CONTEXT, f"unexpected in the build context: {sorted(set(top) - CONTEXT)}"
    assert CONTEXT <= set(top)
    assert not caches, caches


# --- the deployment files (no container engine needed) -----------------------------


def _yaml():
    return pytest.importorskip("yaml", reason="PyYAML parses compose.yaml and the manifests")


def test_compose_builds_once_and_runs_three_healthchecked_replicas_on_loopback():
    compose = _yaml().safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    assert len(services) == 3, sorted(services)
    builders = [name for name, service in services.items() if "build" in service]
    assert len(builders) == 1, f"build the image once, not per replica: {builders}"
    build = services[builders[0]]["build"]
    assert build["context"] == "."
    assert "GRADSERVE_BASE_IMAGE" in build["args"]["BASE"]
    assert {service["image"] for service in services.values()} == {_image_tag()}
    published = set()
    for name, service in services.items():
        # docs/deploy.md's `docker exec gradserve-1 ...` and `podman healthcheck run gradserve-1`
        # name the containers: the same with docker compose and podman-compose.
        assert service["container_name"] == name
        assert service["stop_grace_period"], name
        assert "gradserve" in " ".join(service["healthcheck"]["test"]), name
        for port in service["ports"]:
            host_ip, host_port, container_port = str(port).split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"
            if container_port == "50051":
                published.add(int(host_port))
    assert len(published) == 3


def _image_tag() -> str:
    """The image name and tag compose.yaml runs."""
    return _yaml().safe_load((REPO / "compose.yaml").read_text())["x-gradserve"]["image"]


def _seconds(text) -> float:
    """compose durations ("20s", "1m30s") and plain numbers, in seconds."""
    text = str(text)
    if text.replace(".", "", 1).isdigit():
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", text))


def _kubernetes_docs() -> list[dict]:
    yaml = _yaml()
    return [doc for path in sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_the_default_grace_is_shorter_than_every_stop_timeout_shipped():
    """A call the grace lets finish must not be killed by the orchestrator's SIGKILL."""
    from gradserve.cli.serve import DEFAULT_GRACE

    docker_stop = 10.0  # `docker stop` and `podman stop` without -t
    compose = _yaml().safe_load((REPO / "compose.yaml").read_text())
    by_kind = {doc["kind"]: doc for doc in _kubernetes_docs()}
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    kubernetes = pod["terminationGracePeriodSeconds"]
    configured = float(by_kind["ConfigMap"]["data"].get("GRADSERVE_GRACE", DEFAULT_GRACE))
    assert DEFAULT_GRACE < docker_stop
    for name, service in compose["services"].items():
        grace = float(service.get("environment", {}).get("GRADSERVE_GRACE", DEFAULT_GRACE))
        assert grace < _seconds(service["stop_grace_period"]), name
    assert max(DEFAULT_GRACE, configured) < kubernetes
    deploy = (REPO / "docs" / "deploy.md").read_text()
    assert f"The default grace, {DEFAULT_GRACE:g} s, is shorter than every stop timeout" in deploy


def test_one_image_tag_everywhere():
    tag = _image_tag()
    name, version = tag.rsplit(":", 1)
    deploy = (REPO / "docs" / "deploy.md").read_text()
    built = set(re.findall(r"build .* -t (\S+) \.$", deploy, re.M))
    assert built == {tag}, built
    run = set(re.findall(r"run -d .* (\S+:\S+)$", deploy, re.M))
    assert run == {tag}, run
    (container,) = [doc for doc in _kubernetes_docs()
                    if doc["kind"] == "Deployment"][0]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == tag
    pushed = set(re.findall(r"REGISTRY/(\S+)", deploy))
    assert pushed == {f"{name.split('/')[-1]}:{version}"}, pushed
    # what a new user needs for podman and for a base image other than Docker Hub's
    for needed in ("GRADSERVE_BASE_IMAGE", "BUILDAH_FORMAT=docker", "--format docker",
                   "podman exec", "podman-compose up"):
        assert needed in deploy, needed


def test_kubernetes_manifests_probe_the_health_service_and_balance_on_the_client():
    docs = _kubernetes_docs()
    by_kind = {}
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("metadata", {}).get("name"), doc
        by_kind.setdefault(doc["kind"], []).append(doc)

    (deployment,) = by_kind["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    labels = spec["selector"]["matchLabels"]
    assert labels.items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051, probe
    ports = {p["containerPort"] for p in container["ports"]}
    assert 50051 in ports
    assert pod["securityContext"]["runAsNonRoot"] is True

    services = by_kind["Service"]
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    assert headless, "a headless Service (clusterIP: None) for client-side balancing"
    for service in headless:
        assert service["spec"]["selector"].items() <= labels.items()
        assert any(p["port"] == 50051 for p in service["spec"]["ports"])


def test_kubernetes_settings_keep_a_pod_within_its_memory_limit():
    """The ConfigMap's limits, combined as docs/security.md counts them
    (requests in progress x message size, workers x (intermediates + request and
    reply), the graph cache and residuals), leave room under the Deployment's memory
    limit for the interpreter, NumPy and gRPC (512 MiB)."""
    from gradserve.server.limits import Limits

    docs = _kubernetes_docs()
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Gi"), limit
    pod_bytes = int(limit[:-2]) << 30
    env = {k: v for k, v in config["data"].items() if k.startswith("GRADSERVE_")}
    limits = Limits.from_env(env)
    workers = int(env.get("GRADSERVE_MAX_WORKERS", 16))
    # Every server process holds all of it; unset, there is one per CPU of the limit.
    processes = int(env.get("GRADSERVE_PROCESSES")
                    or -(-int(container["resources"]["limits"]["cpu"]) // 1))
    peak = processes * (limits.max_concurrent_rpcs * limits.max_message_bytes
                        + workers * (limits.max_intermediate_bytes + 2 * limits.max_message_bytes)
                        + limits.max_cache_bytes + getattr(limits, "max_residual_bytes", 0))
    assert peak + processes * (512 << 20) <= pod_bytes, (processes, peak >> 20, pod_bytes >> 20)
    assert 0 < limits.stream_idle_seconds and 0 < limits.max_streams_per_client
