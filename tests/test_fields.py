"""Plugins that call plugins: a field plugin finds objects and the server has another plugin
classify each (the `tiles` test plugin, 16 px tiles classified by `brightness`), over the wire:
per-object results and errors, the field's counts, the bound per field, audit rows per
object, specimen counts over fields, and responses of other plugins unchanged."""

from __future__ import annotations

import io
import sqlite3
import time

import grpc
import numpy as np
import pytest
from conftest import png_bytes
from PIL import Image

from dxserve_client import Client
from dxserve_client.client import DxServeError


def field(tiles: list[list[int]]) -> bytes:
    """A PNG of 16 px tiles of the given grey levels (0: a black tile, which tiles hands over as a bad crop)."""
    rows = [np.concatenate([np.full((16, 16, 3), level, np.uint8) for level in row], axis=1) for row in tiles]
    return png_bytes(np.concatenate(rows, axis=0))


def test_each_object_is_classified_by_the_objects_plugin(client):
    result = client.classify(field([[200, 30], [0, 220]]), plugin="tiles", request_id="field-1")
    assert [o.box for o in result.objects] == [(0, 0, 16, 16), (16, 0, 16, 16), (0, 16, 16, 16), (16, 16, 16, 16)]
    assert [o.plugin for o in result.objects] == ["brightness"] * 4
    labels = [o.result.decision if o.result.ok else o.result.error_code for o in result.objects]
    assert labels == ["bright", "dark", "INVALID_ARGUMENT", "bright"]  # one bad crop costs that object only
    assert [o.result.request_id for o in result.objects] == [f"field-1/{i}" for i in range(4)]
    alone = client.classify(png_bytes(np.full((16, 16, 3), 200, np.uint8)), plugin="brightness")
    assert result.objects[0].result.probabilities == pytest.approx(alone.probabilities)  # as if sent alone
    assert result.field.found == 4 and result.field.classified == 3 and result.field.failed == 1
    assert result.field.objects_plugin == "brightness" and result.field.objects_model_version == alone.model_version
    assert result.decision == "classified" and not result.indeterminate
    assert "4 found: 3 classified (bright 2, dark 1), 0 indeterminate, 1 failed" in result.reason
    mask = np.asarray(Image.open(io.BytesIO(result.objects[0].mask_png)))
    assert mask.shape == (16, 16) and mask.min() == 255


def test_a_field_failing_its_own_gate_classifies_nothing(client):
    result = client.classify(field([[255, 255]]), plugin="tiles")
    assert result.indeterminate and not result.quality_passed and result.quality_issues[0][0] == "BLANK"
    assert result.field.found == 0 and result.objects == ()


def test_more_objects_than_the_bound_is_a_clear_error(client):
    with pytest.raises(DxServeError) as refused:  # 9 x 9 = 81 tiles, the session server allows 64
        client.classify(field([[100] * 9] * 9), plugin="tiles")
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and refused.value.reason == "TOO_MANY_OBJECTS"
    assert "found 81 objects" in refused.value.message and "max_objects_per_field" in refused.value.message


def test_other_plugins_answer_as_before(client):
    result = client.classify(field([[200]]), plugin="brightness")
    assert result.objects == () and result.field is None
    listed = {p.name: p for p in client.list_plugins()}
    assert listed["tiles"].objects_plugin == "brightness" and listed["brightness"].objects_plugin == ""


def test_every_object_is_an_audit_row_beside_its_fields(server, client):
    client.classify(field([[200, 0]]), plugin="tiles", request_id="audited-field")
    deadline, rows = time.monotonic() + 10, []
    while time.monotonic() < deadline and len(rows) < 3:
        with sqlite3.connect(server.audit_path) as connection:
            rows = connection.execute("SELECT request_id, plugin, status FROM audit WHERE request_id LIKE 'audited-field%' "
                                      "ORDER BY seq").fetchall()
        time.sleep(0.2)
    assert sorted(rows) == [("audited-field", "tiles", "OK"), ("audited-field/0", "brightness", "OK"),
                            ("audited-field/1", "brightness", "INVALID_ARGUMENT")]


def test_a_stream_counts_every_object_in_its_specimen(client):
    fields = [("f0", field([[200, 30]]), "S-9"), ("f1", field([[0, 220]]), "S-9"), ("f2", b"not an image", "S-9")]
    finals = []
    results = list(client.classify_stream(fields, plugin="tiles", final_summaries=finals))
    assert [r.ok for r in results] == [True, True, False]
    (summary,) = finals
    # The cells are brightness's: 4 objects seen (the unreadable field found none), 1 bad crop.
    assert (summary.plugin, summary.cells_seen, summary.cells_failed) == ("brightness", 4, 1)
    assert summary.labels["bright"][0] == 2 and summary.labels["dark"][0] == 1
    assert results[1].specimen.cells_seen == 4  # the running summary after the second field


def test_the_objects_plugin_authorises_its_own_use(tmp_path):
    """A caller may use the field plugin but not the objects plugin: each object is refused."""
    from conftest import ServerProcess, wait_serving

    from dxserve.auth import KeyFile

    keys = KeyFile.load(tmp_path / "callers.json")
    token = keys.add("field-only", ["tiles"])
    keys.save()
    server = ServerProcess("--auth-keys-file", str(tmp_path / "callers.json"), "--plugins", "tiles,brightness", tmp=tmp_path)
    try:
        wait_serving(server.address, [None, "tiles"])
        with Client(server.address, token=token) as caller:
            result = caller.classify(field([[200, 30]]), plugin="tiles")
        assert [o.result.error_code for o in result.objects] == ["PERMISSION_DENIED"] * 2 and result.field.failed == 2
        assert result.indeterminate
    finally:
        assert server.stop() == 0


def test_explanations_are_asked_of_each_object(client):
    """explain on a field asks each object's plugin; brightness cannot: each object says so alone."""
    result = client.classify(field([[200, 30]]), plugin="tiles", explain=True)
    assert [o.result.error_code for o in result.objects] == ["UNIMPLEMENTED"] * 2 and result.field.failed == 2


def test_a_field_plugin_that_raises_fails_that_field_only(client):
    """find_objects raising is that field's INTERNAL error; the stream's other fields are answered."""
    broken = png_bytes(np.full((16, 17, 3), 100, np.uint8))
    results = list(client.classify_stream([("ok-1", field([[200]])), ("broken", broken), ("ok-2", field([[30]]))],
                                          plugin="tiles"))
    assert [r.error_code for r in results] == ["", "INTERNAL", ""]
    assert "tiles cannot cut" in results[1].error_message
    assert [r.objects[0].result.decision for r in (results[0], results[2])] == ["bright", "dark"]
