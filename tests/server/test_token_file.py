"""The auth token file: every token read_token accepts authenticates over real gRPC,
and a token no client could send (non-ASCII, control characters, longer than client
metadata holds) is refused when the file is read, with a message that says why, not
at the first call by a client that can never get in."""

from __future__ import annotations

import grpc
import pytest

from gradserve.client import Client
from gradserve.server.app import create_server
from gradserve.server.auth import MAX_TOKEN_CHARS, TokenFileError, read_token


GOOD = {
    "plain": "s3cr3t-token",
    "inner-space": "two words",
    "punctuation": "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "longest": "t" * MAX_TOKEN_CHARS,
    "surrounding-newline": "\n  tok\n",  # stripped, as an editor leaves it
}
BAD = {
    "non-ascii": ("caf\N{LATIN SMALL LETTER E WITH ACUTE}".encode(), "not ASCII"),
    "latin-1-byte": (b"tok\xe9n", "not ASCII"),
    "tab": (b"to\tken", "not printable ASCII"),
    "nul": (b"to\x00ken", "not printable ASCII"),
    "delete": (b"to\x7fken", "not printable ASCII"),
    "empty": (b" \n", "empty"),
    "too-long": (b"t" * (MAX_TOKEN_CHARS + 1), "over 4,096"),
}


@pytest.mark.parametrize("name", list(GOOD))
def test_every_accepted_token_authenticates(tmp_path, name):
    path = tmp_path / "token"
    path.write_text(GOOD[name])
    token = read_token(path)
    assert token == GOOD[name].strip()
    with create_server("127.0.0.1:0", auth_token=token) as server, \
            Client(f"127.0.0.1:{server.port}", token=token, retries=0, timeout=10) as client:
        assert client.server_info().version


@pytest.mark.parametrize("name", list(BAD))
def test_unusable_token_is_refused_when_read(tmp_path, name):
    data, says = BAD[name]
    path = tmp_path / "token"
    path.write_bytes(data)
    with pytest.raises(TokenFileError) as info:
        read_token(path)
    assert says in str(info.value) and str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_token_file_is_a_token_file_error(tmp_path):
    with pytest.raises(TokenFileError, match="No such file"):
        read_token(tmp_path / "absent")


@pytest.mark.parametrize("token", ["caf\N{LATIN SMALL LETTER E WITH ACUTE}", "to\tken"],
                         ids=["non-ascii", "tab"])
def test_what_is_refused_could_not_authenticate(token):
    """Why: a server started with such a token (as before read_token checked) answers no
    client that holds the same token."""
    with create_server("127.0.0.1:0", auth_token=token) as server, \
            Client(f"127.0.0.1:{server.port}", token=token, retries=0, timeout=10) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.server_info()
        assert info.value.code() == grpc.StatusCode.INTERNAL  # "Invalid metadata", client-side
