"""Property-based fuzzing of the image path: whatever bytes or raw pixels arrive, the answer is
a result or INVALID_ARGUMENT with a BadRequest field violation, never a crash, another code,
or a dead server."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FIXTURES
from dxserve.v1 import diagnostics_pb2 as pb

PNG = sorted((FIXTURES / "cells").glob("*.png"))[0].read_bytes()
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def mutated_png(draw) -> bytes:
    """A real cell's PNG, cut short, with bytes overwritten, or with junk after a valid header."""
    data = bytearray(PNG)
    kind = draw(st.sampled_from(["truncate", "flip", "header"]))
    if kind == "truncate":
        return bytes(data[:draw(st.integers(0, len(data) - 1))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 20))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    return bytes(data[:draw(st.integers(8, 64))]) + draw(st.binary(max_size=256))


encoded = st.one_of(st.binary(max_size=2048), mutated_png()).map(lambda b: pb.Image(encoded=b))
raw = st.builds(lambda w, h, c, extra: pb.Image(raw=pb.RawImage(width=w, height=h, channels=c,
                                                                pixels=bytes(max(w * h * c + extra, 0) % 200_000))),
                st.integers(0, 300), st.integers(0, 300), st.integers(0, 5), st.integers(-3, 3))


def check(stub, request: pb.ClassifyRequest) -> None:
    try:
        response = stub.Classify(request, timeout=60)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{error.code()}: {error.details()}"
        details = rpc_status.from_call(error).details
        assert any(d.Is(error_details_pb2.BadRequest.DESCRIPTOR) for d in details)
        return
    assert abs(sum(p.probability for p in response.probabilities) - 1) < 1e-4


@pytest.mark.parametrize("plugin", ["brightness", "lymphoblast"])
def test_fuzzed_images_get_a_result_or_invalid_argument(client, plugin):
    @FUZZ
    @given(image=st.one_of(encoded, raw))
    def fuzz(image):
        check(client.stub, pb.ClassifyRequest(plugin=plugin, image=image))

    fuzz()
    assert client.classify(PNG, plugin=plugin).ok  # and the server still serves
