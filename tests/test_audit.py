"""The audit trail: every outcome recorded and hash-chained, tampering found, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
import threading

import grpc
import numpy as np
import pytest

from dxserve.audit import AuditTrail, SQLiteStore, open_store, verify
from dxserve.cli import main as dxserve
from dxserve_client import Client, DxServeError
from dxserve_client.client import encode_png
from test_faults import loaded
from test_lifecycle import light_server


def test_every_outcome_is_recorded_with_who_what_and_which_weights(client, server, cell_paths):
    """On the session server: a result, a refused image and an unknown plugin, each with its row."""
    image = cell_paths[0].read_bytes()
    result = client.classify(image, request_id="audit-1", specimen_id="smear-9")
    with pytest.raises(DxServeError):
        client.classify(b"not an image", request_id="audit-2")
    with pytest.raises(DxServeError):
        client.classify(image, request_id="audit-3", plugin="x" * 5000)
    rows = {r["request_id"]: r for r in open_store(str(server.audit_path)).rows() if (r["request_id"] or "").startswith("audit-")}
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
    with light_server(tmp_path, "--audit-db", unwritable, ready=[]) as server, Client(server.address) as client:
        loaded(client, "brightness")  # loaded, but never SERVING: the trail failed at start
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
    assert count == 1 + 1500 and problems == []  # the trail's server_start row, then every record


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
    assert "52 rows checked, chain intact" in capsys.readouterr().err  # each replica's server_start row, then 50 results
    rows = list(open_store(url).rows())
    assert open_store(url).head() == (52, rows[-1]["hash"])  # what a checkpoint signs, read in its own transaction
    assert [r["event"] for r in rows].count("server_start") == 2
    rows = [r for r in rows if r["event"] == "classify"]
    assert sorted(r["request_id"] for r in rows) == sorted([f"a{i}" for i in range(25)] + [f"b{i}" for i in range(25)])
    assert all(r["status"] == "OK" and r["weights_sha256"] for r in rows)
    postgres.psql("\\c replicas\nUPDATE audit SET caller = 'someone else' WHERE seq = 7;")
    assert dxserve(["audit", "verify", "--db", url]) == 1
    assert "row 7: its content does not match its hash (edited)" in capsys.readouterr().out


@pytest.fixture
def signed_trail(tmp_path):
    """A SQLite trail of 20 rows written with checkpoints (start, two periodic, stop)."""
    import asyncio

    from dxserve.checkpoints import Checkpointer, generate_key

    key = tmp_path / "signing.pem"
    public = generate_key(key)
    db, checkpoints = tmp_path / "audit.sqlite3", tmp_path / "checkpoints.jsonl"
    trail = AuditTrail(SQLiteStore(str(db)), checkpointer=Checkpointer(key, checkpoints), checkpoint_interval_s=0.05)

    async def write(n: int):
        for i in range(n):
            await trail.record(event="classify", request_id=f"r{i}", status="OK")

    asyncio.run(write(10))
    import time

    time.sleep(0.2)  # a periodic checkpoint of row 10
    asyncio.run(write(10))
    trail.close()  # the stop checkpoint: row 20
    return db, checkpoints, public


def _verify(db, checkpoints, public, capsys) -> tuple[int, str]:
    code = dxserve(["audit", "verify", "--db", str(db), "--checkpoints", str(checkpoints), "--public-key", str(public)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _rechain(db, from_seq: int) -> None:
    """What a forger with the database but not the key does: recompute every hash from `from_seq` on."""
    from dxserve.audit import COLUMNS, row_hash

    connection = sqlite3.connect(db)
    rows = [dict(zip(COLUMNS, r)) for r in connection.execute(f"SELECT {', '.join(COLUMNS)} FROM audit ORDER BY seq")]
    prev = rows[from_seq - 2]["hash"] if from_seq > 1 else "0" * 64
    for row in rows[from_seq - 1:]:
        row["prev_hash"], row["hash"] = prev, row_hash(prev, row)
        prev = row["hash"]
        connection.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE seq = ?", (row["prev_hash"], row["hash"], row["seq"]))
    connection.commit()
    connection.close()


def test_signed_checkpoints_pass_an_untouched_trail(signed_trail, capsys):
    db, checkpoints, public = signed_trail
    reasons = [json.loads(line)["reason"] for line in checkpoints.read_text().splitlines()]
    assert reasons[0] == "start" and reasons[-1] == "stop" and "periodic" in reasons
    code, out = _verify(*signed_trail, capsys)
    assert code == 0 and "chain intact" in out and "signed checkpoints" in out


@pytest.mark.parametrize("tamper, found", [
    ("rewrite", "differs from its checkpoint"),          # a row rewritten and the chain re-chained after it
    ("truncate", "is missing"),                          # rows cut from the end, the chain still consistent
    ("append", "forged append"),                         # rows added after the server stopped
    ("backdate", "back-dated"),                          # an appended row dated in the past
    ("forge_checkpoint", "signature does not verify"),   # a checkpoint line edited
])
def test_signed_checkpoints_find_what_the_chain_alone_cannot(signed_trail, capsys, tamper, found):
    from dxserve.audit import COLUMNS, row_hash

    db, checkpoints, public = signed_trail
    connection = sqlite3.connect(db)
    if tamper == "rewrite":
        connection.execute("UPDATE audit SET decision = 'normal' WHERE seq = 5")
        connection.commit()
        _rechain(db, 5)
    elif tamper == "truncate":
        connection.execute("DELETE FROM audit WHERE seq > 15")
        connection.commit()
    elif tamper in ("append", "backdate"):
        last = dict(zip(COLUMNS, connection.execute(f"SELECT {', '.join(COLUMNS)} FROM audit ORDER BY seq DESC LIMIT 1").fetchone()))
        when = "2020-01-01T00:00:00+00:00" if tamper == "backdate" else "2099-01-01T00:00:00+00:00"
        forged = {**last, "seq": last["seq"] + 1, "time": when, "request_id": "forged", "prev_hash": last["hash"]}
        forged["hash"] = row_hash(last["hash"], forged)
        connection.execute(f"INSERT INTO audit ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                           [forged[c] for c in COLUMNS])
        connection.commit()
    else:
        lines = checkpoints.read_text().splitlines()
        edited = json.loads(lines[-1])
        edited["seq"] -= 5
        checkpoints.write_text("\n".join(lines[:-1] + [json.dumps(edited)]) + "\n")
    connection.close()
    chain_alone = verify(open_store(str(db)))[2]
    if tamper != "forge_checkpoint":
        assert chain_alone == [], "the chain alone already finds this one: not a test of checkpoints"
    code, out = _verify(db, checkpoints, public, capsys)
    assert code == 1 and found in out, out


def test_keygen_never_overwrites_a_key(tmp_path, capsys):
    key = tmp_path / "k.pem"
    assert dxserve(["audit", "keygen", "--key", str(key)]) == 0
    assert (key.stat().st_mode & 0o777) == 0o600 and (tmp_path / "k.pem.pub").exists()
    first = key.read_bytes()
    assert dxserve(["audit", "keygen", "--key", str(key)]) == 2 and key.read_bytes() == first


def test_a_server_signs_its_chain_at_start_and_stop(tmp_path, capsys):
    from dxserve.checkpoints import generate_key

    key, checkpoints = tmp_path / "signing.pem", tmp_path / "checkpoints.jsonl"
    public = generate_key(key)
    flags = ("--audit-checkpoint-key", str(key), "--audit-checkpoints", str(checkpoints))
    with light_server(tmp_path, *flags) as server, Client(server.address) as client:
        client.classify(np.zeros((8, 8, 3), np.uint8), plugin="brightness")
    reasons = [json.loads(line)["reason"] for line in checkpoints.read_text().splitlines()]
    assert reasons[0] == "start" and reasons[-1] == "stop"
    assert json.loads(checkpoints.read_text().splitlines()[-1])["seq"] == open_store(str(server.audit_path)).head()[0] >= 1
    code, out = _verify(server.audit_path, checkpoints, public, capsys)
    assert code == 0 and "chain intact" in out


def test_checkpoints_count_rows_so_an_insert_while_running_and_a_crash_are_seen(tmp_path, capsys):
    """Issue 32: a row inserted (properly chained) while the server ran was signed by its next
    checkpoint; rows forged after a crash were signed by the next start's; rows after the last
    checkpoint read "chain intact". Now each checkpoint counts its writer's rows, a start names
    the last signed row and never vouches for what lies past it, and verify says "unsigned"."""
    from dxserve.audit import COLUMNS, AuditTrail, SQLiteStore, row_hash
    from dxserve.checkpoints import Checkpointer, generate_key

    key = tmp_path / "signing.pem"
    public = generate_key(key)
    db, checkpoints = tmp_path / "audit.sqlite3", tmp_path / "checkpoints.jsonl"

    def forge(request_id: str) -> None:
        connection = sqlite3.connect(db)
        last = dict(zip(COLUMNS, connection.execute(f"SELECT {', '.join(COLUMNS)} FROM audit ORDER BY seq DESC LIMIT 1").fetchone()))
        row = {**last, "seq": last["seq"] + 1, "request_id": request_id, "prev_hash": last["hash"]}
        row["hash"] = row_hash(last["hash"], row)
        connection.execute(f"INSERT INTO audit ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                           [row[c] for c in COLUMNS])
        connection.commit()
        connection.close()

    def session(writer: str, before_close=None, close: bool = True):
        checkpointer = Checkpointer(key, checkpoints)
        checkpointer.writer = writer  # another process
        trail = AuditTrail(SQLiteStore(str(db)), checkpointer=checkpointer, checkpoint_interval_s=3600)

        async def write(n: int):
            for i in range(n):
                await trail.record(event="classify", request_id=f"{writer}-{i}", status="OK")

        asyncio.run(write(5))
        if before_close:
            before_close(trail)
        if close:
            trail.close()
        return trail

    def insert_between_checkpoints(trail):
        trail._checkpoint("periodic")
        forge("inserted-while-running")
        asyncio.run(trail.record(event="classify", request_id="after", status="OK"))

    session("host:1", insert_between_checkpoints)
    code, out = _verify(db, checkpoints, public, capsys)
    assert code == 1 and "inserted (or removed) by someone else" in out, out

    db.unlink()
    checkpoints.unlink()
    session("host:2")  # a clean session, then one that crashes after a periodic checkpoint
    session("host:3", lambda trail: (trail._checkpoint("periodic"), asyncio.run(trail.record(event="classify", status="OK"))),
            close=False)
    code, out = _verify(db, checkpoints, public, capsys)
    assert code == 0 and "NOT PROVEN" in out and "unsigned" in out and "chain intact" not in out, out
    forge("forged-while-down")
    session("host:4")  # the next start: it does not sign what it found past the last checkpoint
    code, out = _verify(db, checkpoints, public, capsys)
    assert code == 0 and "were unsigned when a server started" in out and "stopped without its final checkpoint" in out, out
    assert "NOT PROVEN" in out


def test_a_postgresql_trail_without_its_driver_says_what_to_install(monkeypatch):
    """psycopg is the postgres extra (a serving install on SQLite does not carry it): a
    postgresql:// trail on an install without it names the extra to install."""
    import sys

    from dxserve import audit

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(RuntimeError, match=re.escape("pip install 'dxserve[postgres]'")):
        audit.PostgresStore("postgresql://dxserve@127.0.0.1:1/audit").connect()
