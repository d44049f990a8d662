"""Open Inference Protocol facade vs dxserve.v1: the same images, the same server, one run.

    python benchmarks/open_inference.py [--seconds 8] [--callers 1 16] [--rounds 2]

For each number of callers, unary calls back to back for `--seconds`: dxserve.v1 Classify
(dxserve_client), OIP ModelInfer (an encoded PNG as a BYTES tensor, through the generated
inference stubs: the same wire as tritonclient, without its Python-side work), and the same
request over HTTP/REST (`rest.py`; Triton's binary tensor extension, as tritonclient.http sends
it, on one kept-alive connection per caller). The three alternate for `--rounds` rounds, so
drift on a shared machine falls on all. Printed: each one's images/s and p50, and the ratios
OIP / v1 and REST / v1 (throughput: 1 means the door costs nothing; p50: 1 means the same
latency). The issue's bar for the gRPC facade: it costs < 5 %.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import concurrently, sample_images, start_server  # noqa: E402

from dxserve.inference import serialize_bytes  # noqa: E402
from dxserve.oip import grpc_service_pb2 as oip  # noqa: E402
from dxserve.oip import grpc_service_pb2_grpc as oip_grpc  # noqa: E402
from dxserve_client import Client  # noqa: E402


def v1_caller(address: str):
    client = Client(address)
    return client.classify, client.close


def oip_caller(address: str):
    channel = grpc.insecure_channel(address)
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    tensor = oip.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[1, 1])

    def infer(image: bytes):
        response = stub.ModelInfer(oip.ModelInferRequest(model_name="lymphoblast", inputs=[tensor],
                                                         raw_input_contents=[serialize_bytes([image])]), timeout=60)
        return np.frombuffer(response.raw_output_contents[0], "<f4")

    return infer, channel.close


def rest_caller(address: str):
    """POST /v2/models/lymphoblast/infer with the image as binary data after a JSON header."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)

    def infer(image: bytes):
        header = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1],
                                         "parameters": {"binary_data_size": len(image) + 4}}],
                             "outputs": [{"name": "PROBABILITIES"}]}).encode()
        connection.request("POST", "/v2/models/lymphoblast/infer", body=header + serialize_bytes([image]),
                           headers={"Inference-Header-Content-Length": str(len(header))})
        answer = connection.getresponse()
        body = json.loads(answer.read())
        assert answer.status == 200, body
        return np.array(body["outputs"][0]["data"], "<f4")

    return infer, connection.close


def load(make, address: str, images: list[bytes], callers: int, seconds: float) -> tuple[float, float]:
    """(images/s, p50 ms) with `callers` threads calling back to back."""
    latencies: list[list[float]] = [[] for _ in range(callers)]
    stop = time.monotonic() + seconds

    def caller(k: int) -> None:
        call, close = make(address)
        call(images[k])  # the connection is up before timing
        i = k
        while time.monotonic() < stop:
            started = time.perf_counter()
            call(images[i % len(images)])
            latencies[k].append((time.perf_counter() - started) * 1000)
            i += callers
        close()

    elapsed = concurrently(callers, caller)
    flat = [x for per in latencies for x in per]
    return len(flat) / elapsed, statistics.median(flat)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=50097)
    args = parser.parse_args()
    images = sample_images(64)
    server = start_server(args.port, "--http-port", str(args.port + 1))
    address, http_address = f"127.0.0.1:{args.port}", f"127.0.0.1:{args.port + 1}"
    try:
        with Client(address) as client:  # the same answer both ways, or the comparison means nothing
            expected = [client.classify(image).probabilities["lymphoblast"] for image in images[:4]]
        call, close = oip_caller(address)
        assert np.allclose([call(image)[0] for image in images[:4]], expected, atol=1e-6)
        close()
        call, close = rest_caller(http_address)
        assert np.allclose([call(image)[0] for image in images[:4]], expected, atol=1e-6)
        close()
        for callers in args.callers:
            figures: dict[str, list[tuple[float, float]]] = {"v1": [], "oip": [], "rest": []}
            for _ in range(args.rounds):
                figures["v1"].append(load(v1_caller, address, images, callers, args.seconds))
                figures["oip"].append(load(oip_caller, address, images, callers, args.seconds))
                figures["rest"].append(load(rest_caller, http_address, images, callers, args.seconds))
            for name, runs in figures.items():
                print(f"{callers:3d} callers, {name:3s}: " + "; ".join(f"{rate:6.1f} images/s p50 {p50:6.1f} ms"
                                                                      for rate, p50 in runs))
            for door in ("oip", "rest"):
                ratios = [(o[0] / v[0], o[1] / v[1]) for o, v in zip(figures[door], figures["v1"], strict=True)]
                print(f"{callers:3d} callers, {door.upper()} / v1: throughput " + ", ".join(f"{r:.3f}" for r, _ in ratios)
                      + "; p50 " + ", ".join(f"{p:.3f}" for _, p in ratios), flush=True)
    finally:
        server.terminate()
        server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
