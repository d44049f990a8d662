"""Specimen summaries in streams and explanations on request, against the real server."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image
from scipy.stats import binomtest

from dxserve.v1 import diagnostics_pb2 as pb
from dxserve_client import DxServeError


def test_stream_keeps_a_running_summary_per_specimen_and_a_final_one(client, cell_paths):
    items = [(f"a{i}", path, "smear-A") for i, path in enumerate(cell_paths)]
    items.insert(2, ("bad", b"not an image", "smear-A"))
    items += [("b0", cell_paths[0], "smear-B"), ("plain", cell_paths[1], "")]
    finals = []
    results = list(client.classify_stream(items, final_summaries=finals))
    assert [r.request_id for r in results] == [i[0] for i in items]  # one result per image, in order

    in_a = [r for r in results if r.specimen and r.specimen.specimen_id == "smear-A"]
    assert [r.specimen.cells_seen for r in in_a] == list(range(1, len(cell_paths) + 2))  # each includes its own item
    assert in_a[2].specimen.cells_failed == 1 and not in_a[2].ok
    assert results[-1].specimen is None  # no specimen_id, no summary

    assert [f.specimen_id for f in finals] == ["smear-A", "smear-B"] and all(f.final for f in finals)
    final_a = finals[0]
    assert (final_a.cells_seen, final_a.cells_failed) == (len(cell_paths) + 1, 1)
    ok = [r for r in in_a if r.ok]
    called = [r.decision for r in ok if not r.indeterminate]
    assert final_a.indeterminate == sum(r.indeterminate for r in ok)
    assert final_a.cells_passed_gate == sum(r.quality_passed for r in ok)
    count, fraction, low, high = final_a.labels["lymphoblast"]
    assert count == called.count("lymphoblast") and fraction == pytest.approx(count / len(called))
    wilson = binomtest(count, len(called)).proportion_ci(0.95, method="wilson")
    assert (low, high) == pytest.approx((wilson.low, wilson.high))
    assert final_a.labels == in_a[-1].specimen.labels  # the final summary is the last running one
    # Six cells are too few for the specimen rule: it says so rather than calling.
    assert final_a.call == "indeterminate" and "fewer than the 20" in final_a.call_reason
    assert final_a.rule and final_a.model_version in final_a.rule
    assert finals[1].cells_seen == 1


def test_final_summaries_come_after_every_item_on_the_wire(client, cell_paths):
    requests = [pb.ClassifyRequest(request_id=str(i), plugin="lymphoblast", specimen_id="S",
                                   image=pb.Image(encoded=cell_paths[i].read_bytes())) for i in range(3)]
    responses = list(client.stub.ClassifyStream(iter(requests), timeout=60))
    assert [r.WhichOneof("outcome") for r in responses] == ["result"] * 3 + ["final_summary"]
    assert responses[-1].index == 3 and responses[-1].final_summary.final and not responses[2].specimen.final
    assert responses[2].result.specimen_id == "S"


def test_a_specimen_of_many_cells_gets_a_call(client, cell_paths):
    """25 blast images (the three blast fixtures, rotated) make a specimen the rule can call."""
    blasts = [np.rot90(np.asarray(Image.open(p).convert("RGB")), k)
              for p in cell_paths if p.stem.endswith("_all") for k in range(4)] * 3
    finals = []
    results = list(client.classify_stream(blasts[:25], specimen_id="blasty", final_summaries=finals))
    assert all(r.ok for r in results)
    called = sum(not r.indeterminate for r in results)
    assert called >= 20, "the blast fixtures should mostly be called"
    (final,) = finals
    assert final.labels["lymphoblast"][2] >= 0.5  # Wilson lower end
    assert final.call == "lymphoblast" and "predominate" in final.call_reason


def test_specimen_id_limits(client, cell_paths):
    with pytest.raises(DxServeError) as caught:
        client.classify(cell_paths[0], specimen_id="x" * 129)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details[0].field_violations[0].field == "specimen_id"
    results = list(client.classify_stream([("long", cell_paths[0], "x" * 129), ("fine", cell_paths[0], "ok")]))
    assert results[0].error_code == "INVALID_ARGUMENT" and results[1].ok
    assert client.classify(cell_paths[0], specimen_id="S-1").specimen_id == "S-1"  # echoed by unary calls too


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_explanation_has_the_image_size_and_lies_on_the_cell(client, cell_paths):
    from dxserve_lymphoblast.preprocess import foreground_mask

    for path in (cell_paths[0], cell_paths[3]):  # a blast and a normal cell
        rgb = np.asarray(Image.open(path).convert("RGB"))
        canvas = np.zeros((500, 620, 3), np.uint8)  # not square, the cell off-centre
        canvas[30:30 + rgb.shape[0], 150:150 + rgb.shape[1]] = rgb
        result = client.classify(canvas, explain=True)
        heat, overlay = _png(result.explanation.heatmap_png), _png(result.explanation.overlay_png)
        assert heat.shape == canvas.shape[:2] and heat.dtype == np.uint8
        assert overlay.shape == canvas.shape
        assert result.explanation.label == result.top_label and "occlusion" in result.explanation.method
        cell = foreground_mask(canvas)
        on_cell = heat[cell].astype(float).sum() / heat.astype(float).sum()
        assert on_cell > 0.5, f"only {on_cell:.0%} of the heat lies on the cell ({cell.mean():.0%} of the image)"
        assert heat[cell].mean() > 3 * heat[~cell].mean()
    assert client.classify(cell_paths[0]).explanation is None  # only on request


def test_explanations_where_a_plugin_has_none(client, cell_paths):
    plugins = {p.name: p for p in client.list_plugins()}
    assert plugins["lymphoblast"].explains and not plugins["brightness"].explains
    with pytest.raises(DxServeError) as caught:
        client.classify(np.full((16, 16, 3), 200, np.uint8), plugin="brightness", explain=True)
    assert caught.value.code == grpc.StatusCode.UNIMPLEMENTED
    results = list(client.classify_stream([np.full((16, 16, 3), 200, np.uint8)], plugin="brightness", explain=True))
    assert results[0].error_code == "UNIMPLEMENTED"


def test_the_specimen_interval_is_scipys_wilson_interval():
    """SpecimenCounts.fraction computes the Wilson interval directly; scipy's binomtest is the reference."""
    from dxserve.runtime import SpecimenCounts, wilson_interval

    for n in (*range(1, 60), 137, 500, 4809):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            for confidence in (0.9, 0.95, 0.99):
                expected = binomtest(k, n).proportion_ci(confidence, method="wilson")
                assert wilson_interval(k, n, confidence) == pytest.approx((expected.low, expected.high), rel=1e-12, abs=1e-15), (k, n)
    counts = SpecimenCounts(seen=12, failed=1, passed_gate=10, indeterminate=3, called={"lymphoblast": 6, "normal": 2})
    assert counts.fraction("lymphoblast") == pytest.approx((0.75, *wilson_interval(6, 8)))
    assert SpecimenCounts(1, 0, 0, 1, {"lymphoblast": 0}).fraction("lymphoblast") == (0.0, 0.0, 1.0)
