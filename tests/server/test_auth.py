"""Token authentication and TLS over real gRPC.

Token: a missing or wrong `authorization: Bearer <token>` is UNAUTHENTICATED (with
nothing computed), the right one is answered, health stays open for probes, and the
server keeps answering after refusals; the same through `gradserve serve
--auth-token-file`. TLS and mutual TLS with certificates generated at test time (a CA,
a server certificate for IP:127.0.0.1 and DNS:localhost, a client certificate): the
right CA works, a plaintext client or an untrusted CA fails, and with a client CA the
server refuses clients without a certificate. grpc reports handshake failures as
UNAVAILABLE (sometimes with vague details), so those tests assert that the call fails.
"""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import time

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client import TLS, Client, GraphBuilder
from gradserve.server.app import TLSConfig, create_server
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import gradient_service_pb2_grpc as pb_grpc
from gradserve.v1.codec import to_tensor

from support.server_process import ServerProcess

TOKEN = "s3cret-t0ken"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
SERVING = health_pb2.HealthCheckResponse.SERVING
PI = np.float32([np.pi])


def seed_graph():
    g = GraphBuilder()
    x, y = g.input("x", "float32", [1]), g.input("y", "float32", [1])
    g.output("o", (x + y) * g.sin(x))
    return g


def seed_request():
    return pb.DifferentiateRequest(graph=seed_graph().build(),
                                   inputs={"x": to_tensor(PI), "y": to_tensor(PI)})


def check_seed(client: Client):
    """The worked example through the real client: do/dx = -6.2832, do/dy = -8.7423e-08."""
    r = client.differentiate(seed_graph(), {"x": PI, "y": PI})
    assert abs(r.jacobian["o", "x"].item() - -6.2832) < 1e-4
    assert abs(r.jacobian["o", "y"].item() - -8.7423e-08) < 1e-11


def stderr_says(server: ServerProcess, text: str, timeout: float = 10.0) -> bool:
    """Whether the server's stderr (read by a thread, so maybe late) comes to contain `text`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in "".join(server.stderr):
            return True
        time.sleep(0.05)
    return False


def health_status(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                     timeout=10).status


# --- token ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server():
    with create_server("127.0.0.1:0", auth_token=TOKEN) as s:
        yield s


def raw_calls(stub, metadata):
    """One call of each RPC kind, with `metadata`."""
    request = seed_request()
    return {
        "GetServerInfo": lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10,
                                                    metadata=metadata),
        "RegisterGraph": lambda: stub.RegisterGraph(
            pb.RegisterGraphRequest(graph=request.graph), timeout=10, metadata=metadata),
        "Evaluate": lambda: stub.Evaluate(
            pb.EvaluateRequest(graph=request.graph, inputs=request.inputs), timeout=10,
            metadata=metadata),
        "Differentiate": lambda: stub.Differentiate(request, timeout=10, metadata=metadata),
        "DifferentiateStream": lambda: list(stub.DifferentiateStream(
            iter([request, request]), timeout=10, metadata=metadata)),
    }


WRONG = {
    "missing": (None, "missing"),
    "wrong-token": ((("authorization", "Bearer nope"),), "wrong token"),
    "no-bearer-prefix": ((("authorization", TOKEN),), "wrong token"),
    "token-as-prefix": ((("authorization", f"Bearer {TOKEN}x"),), "wrong token"),
    "other-header": ((("x-token", TOKEN),), "missing"),
}


@pytest.mark.parametrize("method", list(raw_calls(None, None)))
@pytest.mark.parametrize("case", list(WRONG))
def test_missing_or_wrong_token_is_unauthenticated(token_server, method, case):
    metadata, says = WRONG[case]
    with grpc.insecure_channel(f"127.0.0.1:{token_server.port}") as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            raw_calls(stub, metadata)[method]()
        assert info.value.code() == UNAUTHENTICATED, info.value.details()
        assert says in info.value.details()
        assert TOKEN not in info.value.details()  # the refusal never echoes the secret
        # right after: the right token is answered on the same channel
        raw_calls(stub, (("authorization", f"Bearer {TOKEN}"),))[method]()


def test_refused_calls_register_nothing(token_server):
    """A refused RegisterGraph has no effect: its graph id stays unknown (NOT_FOUND) to a
    caller with the token until that caller registers it."""
    g = GraphBuilder()
    g.output("o", g.cos(g.input("refused", "float64", [3])))
    _, graph_id = g.serialized()  # the server's id: sha256 of the canonical bytes
    address = f"127.0.0.1:{token_server.port}"
    with Client(address, token="nope", retries=0) as bad, Client(address, token=TOKEN) as good:
        with pytest.raises(grpc.RpcError) as info:
            bad.register(g)
        assert info.value.code() == UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            good.evaluate(graph_id, {"refused": np.zeros(3)})
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert good.register(g) == graph_id
        np.testing.assert_array_equal(good.evaluate(graph_id, {"refused": np.zeros(3)})["o"],
                                      np.ones(3))


def test_right_token_through_the_client(token_server):
    address = f"127.0.0.1:{token_server.port}"
    with Client(address, token=TOKEN) as c:
        check_seed(c)
        with c.stream(seed_graph()) as s:
            for _ in range(3):
                assert abs(s.differentiate({"x": PI, "y": PI}).jacobian["o", "x"].item()
                           - -6.2832) < 1e-4
        assert c.server_info().version


def test_client_without_token_is_unauthenticated(token_server):
    with Client(f"127.0.0.1:{token_server.port}", retries=0) as c:
        with pytest.raises(grpc.RpcError) as info:
            check_seed(c)
        assert info.value.code() == UNAUTHENTICATED


def test_health_is_open_without_a_token(token_server):
    with grpc.insecure_channel(f"127.0.0.1:{token_server.port}") as channel:
        assert health_status(channel) == SERVING
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
        assert next(watch).status == SERVING
        watch.cancel()


def test_reflection_is_not_open_without_a_token(token_server):
    """Only health is open: reflection describes the service, so it needs the token."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with grpc.insecure_channel(f"127.0.0.1:{token_server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert info.value.code() == UNAUTHENTICATED
        replies = list(stub.ServerReflectionInfo(
            iter([request]), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),)))
        names = {s.name for s in replies[0].list_services_response.service}
        assert "gradserve.v1.GradientService" in names


def test_many_refusals_then_still_answering(token_server):
    address = f"127.0.0.1:{token_server.port}"
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        request = seed_request()
        for i in range(200):
            metadata = None if i % 2 else (("authorization", f"Bearer {i}"),)
            with pytest.raises(grpc.RpcError) as info:
                stub.Differentiate(request, timeout=10, metadata=metadata)
            assert info.value.code() == UNAUTHENTICATED
    with Client(address, token=TOKEN) as c:
        check_seed(c)


def test_cli_auth_token_file(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")  # surrounding whitespace is not part of the token
    with ServerProcess("--port", "0", "--auth-token-file", str(token_file),
                       "--grace", "1") as server:
        host, port = server.address()
        assert "token required" in "".join(server.stderr)
        address = f"{host}:{port}"
        with grpc.insecure_channel(address) as channel:
            assert health_status(channel) == SERVING
            stub = pb_grpc.GradientServiceStub(channel)
            for metadata in (None, (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as info:
                    stub.Differentiate(seed_request(), timeout=10, metadata=metadata)
                assert info.value.code() == UNAUTHENTICATED
        with Client(address, token=TOKEN) as c:
            check_seed(c)
        assert server.terminate(timeout=30) == 0


def test_cli_refuses_an_empty_token_file(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with ServerProcess("--port", "0", "--auth-token-file", str(empty)) as server:
        try:
            code = server.proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail("gradserve serve started with an empty token file")
        assert code != 0
        assert stderr_says(server, "empty"), "".join(server.stderr)


# --- TLS --------------------------------------------------------------------------------


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject, key, issuer, issuer_key, *, ca=False, sans=(), usage=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path, cert, key=None):
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """PEM files: ca, server (SAN IP:127.0.0.1, DNS:localhost), client (signed by ca), and
    an unrelated CA `other_ca` with a client certificate `stranger` it signed."""
    d = tmp_path_factory.mktemp("pki")
    files = {}
    for ca_name in ("ca", "other_ca"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate(f"gradserve test {ca_name}", ca_key, f"gradserve test {ca_name}",
                          ca_key, ca=True)
        _write(d / ca_name, ca)
        files[ca_name] = (ca, ca_key)
    ca, ca_key = files["ca"]
    server_key = ec.generate_private_key(ec.SECP256R1())
    _write(d / "server", _certificate(
        "gradserve server", server_key, "gradserve test ca", ca_key,
        sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
        usage=ExtendedKeyUsageOID.SERVER_AUTH), server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    _write(d / "client", _certificate("gradserve client", client_key, "gradserve test ca",
                                      ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH), client_key)
    other, other_key = files["other_ca"]
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    _write(d / "stranger", _certificate("stranger", stranger_key, "gradserve test other_ca",
                                        other_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH),
           stranger_key)
    return d


def server_tls(pki, mutual=False):
    return TLSConfig(pki / "server.pem", pki / "server.key",
                     pki / "ca.pem" if mutual else None)


def check_fails(address, tls=None, token=None):
    """A call that must not get through (handshake refused or not TLS at all)."""
    with Client(address, tls=tls, token=token, retries=0, timeout=5) as c:
        with pytest.raises(grpc.RpcError) as info:
            check_seed(c)
    # Not OK is the point; grpc reports a failed handshake as UNAVAILABLE (or, when the
    # deadline passes first while it retries the connection, DEADLINE_EXCEEDED).
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                 grpc.StatusCode.DEADLINE_EXCEEDED), info.value
    return info.value


@pytest.fixture(scope="module")
def tls_server(pki):
    with create_server("127.0.0.1:0", tls=server_tls(pki)) as s:
        yield s


@pytest.fixture(scope="module")
def mtls_server(pki):
    with create_server("127.0.0.1:0", tls=server_tls(pki, mutual=True)) as s:
        yield s


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls_with_the_right_ca(pki, tls_server, host):
    with Client(f"{host}:{tls_server.port}", tls=TLS(ca=pki / "ca.pem")) as c:
        check_seed(c)
        with c.stream(seed_graph()) as s:
            s.differentiate({"x": PI, "y": PI})


def test_tls_health_over_tls(pki, tls_server):
    creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{tls_server.port}", creds) as channel:
        assert health_status(channel) == SERVING


def test_plaintext_client_fails_on_a_tls_port(tls_server):
    check_fails(f"127.0.0.1:{tls_server.port}")


def test_tls_client_with_an_untrusted_ca_fails(pki, tls_server):
    check_fails(f"127.0.0.1:{tls_server.port}", TLS(ca=pki / "other_ca.pem"))


def test_tls_client_fails_on_a_plaintext_port(pki, address):
    check_fails(address, TLS(ca=pki / "ca.pem"))


def test_tls_server_still_answers_after_failed_handshakes(pki, tls_server):
    for _ in range(3):
        check_fails(f"127.0.0.1:{tls_server.port}")
    with Client(f"127.0.0.1:{tls_server.port}", tls=TLS(ca=pki / "ca.pem")) as c:
        check_seed(c)


def test_mtls_with_a_client_certificate(pki, mtls_server):
    tls = TLS(ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key")
    with Client(f"127.0.0.1:{mtls_server.port}", tls=tls) as c:
        check_seed(c)


def test_mtls_without_a_client_certificate_fails(pki, mtls_server):
    check_fails(f"127.0.0.1:{mtls_server.port}", TLS(ca=pki / "ca.pem"))


def test_mtls_with_a_certificate_of_another_ca_fails(pki, mtls_server):
    check_fails(f"127.0.0.1:{mtls_server.port}",
                TLS(ca=pki / "ca.pem", cert=pki / "stranger.pem", key=pki / "stranger.key"))


def test_mtls_still_answers_after_refusals(pki, mtls_server):
    check_fails(f"127.0.0.1:{mtls_server.port}", TLS(ca=pki / "ca.pem"))
    check_fails(f"127.0.0.1:{mtls_server.port}")
    tls = TLS(ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key")
    with Client(f"127.0.0.1:{mtls_server.port}", tls=tls) as c:
        check_seed(c)


def test_tls_and_token_together(pki):
    with create_server("127.0.0.1:0", auth_token=TOKEN,
                       tls=server_tls(pki, mutual=True)) as s:
        tls = TLS(ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key")
        address = f"127.0.0.1:{s.port}"
        with Client(address, tls=tls, retries=0) as c:
            with pytest.raises(grpc.RpcError) as info:
                check_seed(c)
            assert info.value.code() == UNAUTHENTICATED
        with Client(address, tls=tls, token=TOKEN) as c:
            check_seed(c)
        check_fails(address, TLS(ca=pki / "ca.pem"), token=TOKEN)  # token without client cert


def test_cli_tls_and_mutual_tls(pki):
    with ServerProcess("--port", "0", "--grace", "1", "--tls-cert", str(pki / "server.pem"),
                       "--tls-key", str(pki / "server.key"), "--tls-client-ca",
                       str(pki / "ca.pem")) as server:
        host, port = server.address()
        assert "(TLS)" in "".join(server.stderr)
        address = f"{host}:{port}"
        tls = TLS(ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key")
        with Client(address, tls=tls) as c:
            check_seed(c)
        check_fails(address, TLS(ca=pki / "ca.pem"))
        check_fails(address)
        assert server.terminate(timeout=30) == 0


@pytest.mark.parametrize("args, says", [
    (["--tls-cert", "c.pem"], "go together"),
    (["--tls-key", "k.pem"], "go together"),
    (["--tls-client-ca", "ca.pem"], "needs --tls-cert"),
])
def test_cli_refuses_incomplete_tls_flags(args, says):
    with ServerProcess("--port", "0", *args) as server:
        try:
            code = server.proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail("gradserve serve started with incomplete TLS flags")
        assert code != 0
        assert stderr_says(server, says), "".join(server.stderr)
