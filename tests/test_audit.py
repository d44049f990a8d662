"""The audit trail: every outcome recorded and hash-chained, tampering found, SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading

import grpc
import numpy as np
import pytest

from dxserve.audit import AuditTrail, SQLiteStore, open_store, verify
from dxserve.cli import main as dxserve
from dxserve_client import Client, DxServeError
from dxserve_client.client import encode_png
from test_lifecycle import light_server


def test_every_outcome_is_recorded_with_who_what_and_which_weights(client, server, cell_paths):
    """On the session server: a result, a refused image and an unknown plugin, each with its row."""
    image = cell_paths[0].read_bytes()
    result = client.classify(image, request_id="audit-1", specimen_id="smear-9")
    with pytest.raises(DxServeError):
        client.classify(b"not an image", request_id="audit-2")
    with pytest.raises(DxServeError):
        client.classify(image, request_id="audit-3", plugin="x" * 5000)
    rows = {r["request_id"]: r for r in open_store(str(server.audit_path)).rows() if r["request_id"].startswith("audit-")}
    ok = rows["audit-1"]
    assert ok["status"] == "OK" and ok["caller"].startswith("anonymous@") and ok["method"] == "Classify"
    assert ok["input_sha256"] == hashlib.sha256(image).hexdigest() and ok["specimen_id"] == "smear-9"
    assert (ok["model_version"], ok["weights_sha256"], ok["decision"]) == (result.model_version, result.weights_sha256, result.decision)
    assert json.loads(ok["probabilities"]) == pytest.approx(result.probabilities, abs=1e-5)
    assert json.loads(ok["quality"]) == [] and ok["latency_ms"] > 0
    assert rows["audit-2"]["status"] == "INVALID_ARGUMENT" and rows["audit-2"]["detail"].startswith("invalid image")
    assert rows["audit-3"]["status"] == "NOT_FOUND"
    assert all("image" not in key for key in ok) and b"not an image".hex() not in json.dumps(rows)  # hashes, never pixels


def _trail(path, n=6) -> None:
    store = SQLiteStore(str(path))
    store.append([{"event": "classify", "request_id": f"r{i}", "status": "OK", "latency_ms": 1.5 * i} for i in range(n)])
    store.close()


@pytest.mark.parametrize("tamper, found", [
    ("UPDATE audit SET decision = 'normal' WHERE seq = 3", "row 3: its content does not match its hash (edited)"),
    ("DELETE FROM audit WHERE seq = 4", "rows 4 to 4 are missing (deleted)"),
    ("UPDATE audit SET seq = -seq WHERE seq IN (2, 5); UPDATE audit SET seq = CASE seq WHEN -2 THEN 5 ELSE 2 END WHERE seq < 0",
     "row 2: its link to the previous row is broken"),  # rows 2 and 5 swapped
])
def test_verify_names_the_row_that_was_edited_deleted_or_reordered(tmp_path, capsys, tamper, found):
    path = tmp_path / "audit.sqlite3"
    _trail(path)
    assert dxserve(["audit", "verify", "--db", str(path)]) == 0
    assert "6 rows checked, chain intact" in capsys.readouterr().err
    with sqlite3.connect(path) as db:
        db.executescript(tamper)
    assert dxserve(["audit", "verify", "--db", str(path)]) == 1
    out, err = capsys.readouterr()
    assert found in out and "TAMPERED" in err


def test_export_as_csv_and_jsonl_since_a_time(tmp_path, capsys):
    path = tmp_path / "audit.sqlite3"
    _trail(path, 3)
    assert dxserve(["audit", "export", "--db", str(path), "--format", "jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["request_id"] for r in rows] == ["r0", "r1", "r2"] and rows[1]["prev_hash"] == rows[0]["hash"]
    assert dxserve(["audit", "export", "--db", str(path), "--format", "csv", "--since", "2999-01-01"]) == 0
    assert capsys.readouterr().out.strip().startswith("seq,time,event")  # a header, no rows
    assert dxserve(["audit", "export", "--db", str(path), "--format", "csv", "--since", rows[1]["time"]]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3  # header + rows 2 and 3


def test_no_result_without_a_record_unless_configured(tmp_path):
    unwritable = str(tmp_path / "no-such-dir" / "audit.sqlite3")
    grey = np.full((8, 8, 3), 128, np.uint8)
    with light_server(tmp_path, "--audit-db", unwritable) as server, Client(server.address) as client:
        with pytest.raises(DxServeError) as caught:
            client.classify(grey, plugin="brightness")
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE and "audit trail" in caught.value.message
        results = list(client.classify_stream([grey, grey], plugin="brightness"))
        assert [r.error_code for r in results] == ["UNAVAILABLE"] * 2
    with light_server(tmp_path, "--audit-db", unwritable, "--audit-required", "false") as server, Client(server.address) as client:
        assert client.classify(grey, plugin="brightness").ok
    assert "audit records not written" in server.logs()


def test_records_are_batched_and_chained_across_threads(tmp_path):
    """Many concurrent writers, one intact chain, every record committed once."""
    import asyncio

    trail = AuditTrail(SQLiteStore(str(tmp_path / "a.sqlite3")))

    async def burst():
        await asyncio.gather(*(trail.record(event="classify", request_id=f"r{i}", status="OK") for i in range(500)))

    threads = [threading.Thread(target=asyncio.run, args=(burst(),)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trail.close()
    count, _, problems = verify(open_store(str(tmp_path / "a.sqlite3")))
    assert count == 1500 and problems == []


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A real PostgreSQL server (the pgserver wheel's binaries), one database per test."""
    pgserver = pytest.importorskip("pgserver", reason="pgserver (a dev dependency) runs PostgreSQL for these tests")
    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    yield server
    server.cleanup()


def _database(postgres, name: str) -> str:
    postgres.psql(f"CREATE DATABASE {name};")
    return postgres.get_uri(name)


def test_postgresql_trail_from_two_replicas_is_one_intact_chain(tmp_path, postgres, capsys):
    url = _database(postgres, "replicas")
    grey = np.full((8, 8, 3), 128, np.uint8)
    with light_server(tmp_path, "--audit-db", url) as first, light_server(tmp_path, "--audit-db", url) as second:
        def send(address, tag):
            with Client(address) as client:
                for i in range(25):
                    client.classify(encode_png(grey + i), plugin="brightness", request_id=f"{tag}{i}")

        threads = [threading.Thread(target=send, args=(s.address, tag)) for s, tag in ((first, "a"), (second, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert dxserve(["audit", "verify", "--db", url]) == 0
    assert "50 rows checked, chain intact" in capsys.readouterr().err
    rows = list(open_store(url).rows())
    assert sorted(r["request_id"] for r in rows) == sorted([f"a{i}" for i in range(25)] + [f"b{i}" for i in range(25)])
    assert all(r["status"] == "OK" and r["weights_sha256"] for r in rows)
    postgres.psql("\\c replicas\nUPDATE audit SET caller = 'someone else' WHERE seq = 7;")
    assert dxserve(["audit", "verify", "--db", url]) == 1
    assert "row 7: its content does not match its hash (edited)" in capsys.readouterr().out
