"""Callers, authorization and per-caller limits (issue 8), against servers in their own processes."""

from __future__ import annotations

import shutil
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dxserve.auth import KeyFile
from dxserve.v1 import diagnostics_pb2 as pb
from dxserve.v1 import diagnostics_pb2_grpc as pb_grpc
from dxserve_client import Client, DxServeError
from conftest import make_certificates
from test_lifecycle import light_server

GREY = np.full((8, 8, 3), 128, np.uint8)


@pytest.fixture
def keys(tmp_path):
    """A key file with three callers; returns (path, {name: token})."""
    path = tmp_path / "callers.json"
    key_file = KeyFile.load(path)
    tokens = {name: key_file.add(name, plugins, admin) for name, plugins, admin in
              (("lab", ["brightness"], False), ("other", ["flaky"], False), ("ops", [], True))}
    key_file.save()
    return path, tokens


def test_key_file_stores_only_token_hashes(keys):
    path, tokens = keys
    text = path.read_text()
    assert all(token not in text for token in tokens.values())
    assert len({t for t in tokens.values()}) == 3 and all(len(t) > 40 for t in tokens.values())
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_tokens_command_prints_a_token_once_and_revokes(tmp_path, capsys):
    from dxserve.cli import main

    path = tmp_path / "k.json"
    assert main(["tokens", "add", "lab-7", "--plugins", "lymphoblast", "--keys-file", str(path)]) == 0
    token = capsys.readouterr().out.strip()
    caller = KeyFile.load(path).by_token(token)
    assert caller.name == "lab-7" and caller.may_use("lymphoblast") and not caller.may_use("brightness") and not caller.admin
    assert main(["tokens", "add", "lab-7", "--keys-file", str(path)]) == 2  # names are unique
    assert main(["tokens", "revoke", "lab-7", "--keys-file", str(path)]) == 0
    assert KeyFile.load(path).by_token(token) is None


def _code(call) -> grpc.StatusCode:
    with pytest.raises(DxServeError) as caught:
        call()
    return caught.value.code


def test_tokens_identify_callers_and_limit_their_plugins(tmp_path, keys):
    path, tokens = keys
    with light_server(tmp_path, "--auth-keys-file", str(path)) as server:
        with Client(server.address) as anonymous:
            assert _code(lambda: anonymous.classify(GREY, plugin="brightness")) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(anonymous.list_plugins) == grpc.StatusCode.UNAUTHENTICATED
            anonymous.wait_until_serving("brightness", timeout_s=5)  # health stays open
        with Client(server.address, token="dxs_not-a-token") as forged:
            assert _code(lambda: forged.classify(GREY, plugin="brightness")) == grpc.StatusCode.UNAUTHENTICATED
        with Client(server.address, token=tokens["lab"]) as lab:
            assert lab.classify(GREY, plugin="brightness").ok
            with pytest.raises(DxServeError) as caught:
                lab.classify(GREY, plugin="flaky")
            assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED and "lab" in caught.value.message
            assert caught.value.details[0].reason == "PERMISSION_DENIED"
            assert [p.name for p in lab.list_plugins()] == ["brightness"]  # it sees what it may use
            items = list(lab.classify_stream([("ok", GREY), ("no", GREY)], plugin="brightness"))
            assert all(r.ok for r in items)
            mixed = [pb.ClassifyRequest(request_id="a", plugin="brightness", image=pb.Image(encoded=_png())),
                     pb.ClassifyRequest(request_id="b", plugin="flaky", image=pb.Image(encoded=_png()))]
            responses = list(lab.stub.ClassifyStream(iter(mixed), metadata=lab.metadata, timeout=30))
            assert responses[0].HasField("result") and responses[1].error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        with Client(server.address, token=tokens["ops"]) as ops:
            assert {p.name for p in ops.list_plugins()} >= {"brightness", "broken_import"}  # "*": every plugin


def test_closed_health_needs_a_caller_too(tmp_path, keys):
    path, tokens = keys
    with light_server(tmp_path, "--auth-keys-file", str(path), "--auth-open-health", "false", ready=[]) as server:
        with grpc.insecure_channel(server.address) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            check = lambda metadata=(): health_pb2_grpc.HealthStub(channel).Check(  # noqa: E731
                health_pb2.HealthCheckRequest(service=""), timeout=10, metadata=metadata)
            assert check((("authorization", f"Bearer {tokens['lab']}"),)).status in (1, 2)  # SERVING or NOT_SERVING
            with pytest.raises(grpc.RpcError) as caught:
                check()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _png() -> bytes:
    from dxserve_client.client import encode_png

    return encode_png(GREY)


def _held_stream(address: str, token: str | None = None):
    """A stream that has sent one image, got its answer, and then stays open, idle, until released."""
    release = threading.Event()

    def requests():
        yield pb.ClassifyRequest(plugin="brightness", image=pb.Image(encoded=_png()))
        release.wait(60)

    channel = grpc.insecure_channel(address)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    responses = pb_grpc.DiagnosticsServiceStub(channel).ClassifyStream(requests(), metadata=metadata, timeout=60)
    first = next(responses)
    return first, lambda: (release.set(), list(responses), channel.close())


def test_one_caller_cannot_hold_every_stream(tmp_path, keys):
    path, tokens = keys
    flags = ("--auth-keys-file", str(path), "--max-streams-per-caller", "2", "--max-concurrent-calls", "3")
    with light_server(tmp_path, *flags) as server:
        held = [_held_stream(server.address, tokens["lab"]) for _ in range(2)]
        assert all(first.HasField("result") for first, _ in held)
        with Client(server.address, token=tokens["lab"]) as lab:  # its third stream is refused ...
            with pytest.raises(DxServeError) as caught:
                list(lab.classify_stream([GREY], plugin="brightness"))
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "lab" in caught.value.message
            assert any(d.DESCRIPTOR.name == "RetryInfo" for d in caught.value.details)
        with Client(server.address, token=tokens["ops"]) as ops:  # ... others still get in,
            assert ops.classify(GREY, plugin="brightness").ok
            other_held = _held_stream(server.address, tokens["ops"])  # up to the server's total,
            with pytest.raises(DxServeError) as caught:
                ops.classify(GREY, plugin="brightness")
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the server" in caught.value.message
            ops.wait_until_serving("brightness", timeout_s=5)  # and health is answered even then
        for _, release in held + [other_held]:
            release()
        with Client(server.address, token=tokens["lab"]) as lab:  # the slots come back when streams end
            assert all(r.ok for r in lab.classify_stream([GREY], plugin="brightness"))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_client_certificate_subject_is_an_identity(tmp_path):
    make_certificates(tmp_path, client_name="lab-9")
    keys = KeyFile.load(tmp_path / "callers.json")
    keys.add("lab-9", ["brightness"], certificate_subject="CN=lab-9")
    keys.save()
    read = lambda name: (tmp_path / name).read_bytes()  # noqa: E731
    flags = ("--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key"),
             "--tls-client-ca", str(tmp_path / "ca.pem"), "--auth-keys-file", str(tmp_path / "callers.json"))
    with light_server(tmp_path, *flags, root_certificates=read("ca.pem"),
                      client_certificate=(read("client.key"), read("client.pem"))) as server:
        with Client(server.address, root_certificates=read("ca.pem"), client_certificate=(read("client.key"), read("client.pem"))) as lab:
            assert lab.classify(GREY, plugin="brightness").ok
            assert _code(lambda: lab.classify(GREY, plugin="flaky")) == grpc.StatusCode.PERMISSION_DENIED
        # The command line speaks mTLS too: --tls-ca, --client-cert, --client-key.
        from dxserve_client.cli import main

        (tmp_path / "grey.png").write_bytes(_png())
        tls = ["--server", server.address, "--tls-ca", str(tmp_path / "ca.pem"), "--client-cert", str(tmp_path / "client.pem")]
        assert main([*tls, "--client-key", str(tmp_path / "client.key"), "classify", str(tmp_path / "grey.png"),
                     "--plugin", "brightness", "--quiet"]) == 0
        with pytest.raises(SystemExit):  # a certificate without its key is a usage error
            main([*tls, "classify", str(tmp_path / "grey.png"), "--plugin", "brightness"])
