"""Signed checkpoints of the audit chain's head: what makes the trail prove itself.

The hash chain (`audit.py`) shows that a row was edited, deleted or reordered, but someone
who can write the database can also rewrite a row and re-chain every row after it, cut rows
from the end, or append rows of their own: the chain is then consistent again. A checkpoint is
the chain head (sequence number and hash) at a moment, signed with an Ed25519 key that lives
outside the database (`audit_checkpoint_key`), appended as one JSON line to a file
(`audit_checkpoints`) that belongs on other storage than the database and should be
append-only (`chattr +a`, a WORM bucket, a log shipper). The server writes one at start,
every `audit_checkpoint_interval_s` while rows are added, and at shutdown.

`dxserve audit verify --checkpoints FILE --public-key KEY` then also checks, per checkpoint,
its signature, and that the row it names still has the hash it signed:

- a row rewritten and the chain re-chained after it: the first checkpoint at or after it
  no longer matches (named, with its time);
- rows cut from the end: a checkpointed row is missing;
- a forged append: rows after a `stop` checkpoint that no later checkpoint covers were not
  written by a running server; rows older than the last checkpoint but after it in the chain
  were back-dated;
- an edited, reordered or forged checkpoint: its signature or its order fails.

Each checkpoint also counts the rows its writer appended since its previous one (`rows`), and
a start checkpoint names the last row any checkpoint in the file had signed (`after`), so
(issue 32):

- a row inserted while the server runs: between two checkpoints of the only writer, more rows
  than it wrote (a problem);
- rows a start found past the file's last checkpoint (written after a crash's last checkpoint,
  or forged while no server ran): reported as unsigned, never signed as if the server wrote
  them; the server also logs them at start;
- a writer that stopped without its final checkpoint (a crash, kill -9): the rows it wrote after
  its last checkpoint could have been cut without trace; reported as such.

Threat model. It holds against anyone who can change the database (and the file's past lines)
but not the private key. It does not prove rows written after the last checkpoint (at most
one interval's worth, or what a crash left uncovered: reported as unsigned, not as intact), an
attacker who holds the private key, or one who deletes the checkpoint file's last lines (keep it
where lines cannot be removed, or ship them off the machine). With several writers on one chain
(workers, PostgreSQL replicas) each writes its own checkpoints; the last one to stop covers the
head, and rows are counted per writer only where one writer ran alone.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNED = ("seq", "hash", "time", "reason", "writer")  # the fields a signature covers, in order
COUNTED = ("rows", "after")  # covered too when present (checkpoints written since issue 32)
BACKDATING_TOLERANCE_S = 5.0  # a row committed just after a checkpoint read the head may carry an earlier time


def generate_key(path: Path) -> Path:
    """Write a new Ed25519 private key (PEM, mode 0600) at `path` and its public key beside it
    (`path`.pub); returns the public key's path. Refuses to overwrite a key."""
    if path.exists():
        raise FileExistsError(f"{path} exists: refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(pem)
    public = path.with_name(path.name + ".pub")
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return public


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(raw)
    return digest.finalize().hex()[:16]


def _message(checkpoint: dict) -> bytes:
    fields = SIGNED + (COUNTED if "rows" in checkpoint else ())
    return json.dumps([checkpoint.get(f) for f in fields], separators=(",", ":")).encode()


def last_signed(file: Path, public: Ed25519PublicKey) -> tuple[int, str] | None:
    """(seq, hash) of the file's last checkpoint whose signature verifies; None without one."""
    try:
        lines = Path(file).read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            checkpoint = json.loads(line)
            public.verify(bytes.fromhex(checkpoint["signature"]), _message(checkpoint))
            return int(checkpoint["seq"]), checkpoint["hash"]
        except (ValueError, KeyError, InvalidSignature):
            continue
    return None


class Checkpointer:
    """Signs chain heads and appends them to the checkpoint file (one JSON line each)."""

    def __init__(self, key_path: Path, file: Path):
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{key_path} is not an Ed25519 private key (make one with `dxserve audit keygen`)")
        self.key, self.file = key, Path(file)
        self.key_id = key_id(key.public_key())
        self.writer = f"{socket.gethostname()}:{os.getpid()}"
        self.last: tuple[int, str] | None = None
        self.prior = last_signed(self.file, key.public_key())  # what the file had signed before this server started
        self.rows = 0  # rows this writer appended since its last checkpoint (`count`)

    def count(self, rows: int) -> None:
        self.rows += rows

    def write(self, seq: int, head: str, reason: str) -> dict:
        checkpoint = {"seq": seq, "hash": head, "time": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                      "reason": reason, "writer": self.writer, "rows": self.rows,
                      "after": (self.prior[0] if self.prior else 0) if reason == "start" else None}
        checkpoint.update(key_id=self.key_id, signature=self.key.sign(_message(checkpoint)).hex())
        with self.file.open("a") as f:  # one line, one write, flushed to disk before it counts
            f.write(json.dumps(checkpoint, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.last, self.rows = (seq, head), 0
        return checkpoint


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def verify(rows: list[dict], file: Path, public: Ed25519PublicKey) -> tuple[int, list[str], list[str]]:
    """Check the chain's `rows` (in order) against the signed checkpoints in `file`:
    (checkpoints checked, problems, notes). Problems mean tampering; notes are facts to know
    (rows not yet covered by a checkpoint)."""
    problems, notes = [], []
    by_seq = {int(r["seq"]): r for r in rows}
    last_seq = max(by_seq, default=0)
    checkpoints, previous = [], None
    for number, line in enumerate(Path(file).read_text().splitlines(), 1):
        try:
            checkpoint = json.loads(line)
            public.verify(bytes.fromhex(checkpoint["signature"]), _message(checkpoint))
        except (ValueError, KeyError, InvalidSignature):
            problems.append(f"checkpoint line {number}: its signature does not verify (forged or edited checkpoint)")
            continue
        if previous is not None and checkpoint["seq"] < previous["seq"] and checkpoint["writer"] == previous["writer"]:
            problems.append(f"checkpoint line {number}: row {checkpoint['seq']} comes after row {previous['seq']} of the "
                            "same writer (checkpoints reordered, or the chain was cut and rebuilt)")
        seq, row = int(checkpoint["seq"]), by_seq.get(int(checkpoint["seq"]))
        if seq and row is None:
            problems.append(f"row {seq}, signed at {checkpoint['time']}, is missing: rows were deleted "
                            f"(the chain ends at row {last_seq})" if seq > last_seq else f"row {seq} is missing")
        elif seq and row["hash"] != checkpoint["hash"]:
            problems.append(f"row {seq} differs from its checkpoint signed at {checkpoint['time']}: it or a row "
                            "before it was rewritten and the chain re-chained")
        checkpoints.append(checkpoint)
        previous = checkpoint
    if not checkpoints:
        return 0, problems + [f"{file} holds no valid checkpoint"], notes
    for stopped, started in zip(checkpoints, checkpoints[1:]):
        found = started["seq"] - started.get("rows", 0)  # the head a start found, before its own rows (server_start)
        if stopped["reason"] == "stop" and started["reason"] == "start" and found > stopped["seq"]:
            problems.append(f"rows {stopped['seq'] + 1} to {found} were added between the server's stop at "
                            f"{stopped['time']} and the next start at {started['time']}, while no server ran (forged append)")
        elif started["reason"] == "start" and started.get("after") is not None and found > started["after"]:
            notes.append(f"rows {started['after'] + 1} to {found} were unsigned when a server started at "
                         f"{started['time']}: written after the last checkpoint by a server that then stopped without "
                         "its final one (a crash), or forged while none ran; not proven")
    sessions: dict[str, list[dict]] = {}  # each writer's checkpoints, in the order it wrote them
    for checkpoint in checkpoints:
        sessions.setdefault(checkpoint["writer"], []).append(checkpoint)
    problems += _counted(sessions)
    starts = [c for c in checkpoints if c["reason"] == "start"]
    for writer, own in sessions.items():
        if own[-1]["reason"] != "stop" and any(s["time"] > own[-1]["time"] and s["writer"] != writer for s in starts):
            notes.append(f"writer {writer} stopped without its final checkpoint after row {own[-1]['seq']} "
                         f"({own[-1]['time']}): rows it wrote after that could have been cut without trace")
    final = max(checkpoints, key=lambda c: (c["seq"], c["time"]))
    after = [r for r in rows if int(r["seq"]) > final["seq"]]
    if after:
        final_time = datetime.fromisoformat(final["time"])
        backdated = [r for r in after if (final_time - datetime.fromisoformat(r["time"])).total_seconds() > BACKDATING_TOLERANCE_S]
        if backdated:
            problems.append(f"rows {', '.join(str(r['seq']) for r in backdated[:5])} come after the checkpoint of row "
                            f"{final['seq']} ({final['time']}) but are dated before it: back-dated (forged) rows")
        if final["reason"] == "stop" and final is checkpoints[-1]:
            problems.append(f"{len(after)} rows after the server's final checkpoint (row {final['seq']}, stopped "
                            f"{final['time']}) are covered by no later checkpoint: not written by a running server (forged append)")
        else:
            notes.append(f"{len(after)} rows after the last checkpoint (row {final['seq']}, {final['time']}) are "
                         "unsigned: not covered by a signature yet")
    return len(checkpoints), problems, notes


def _counted(sessions: dict[str, list[dict]]) -> list[str]:
    """Between two checkpoints of a writer that ran alone, the chain grew by exactly the rows it
    wrote: more means rows inserted by someone else while it ran."""
    problems = []
    spans = {writer: (own[0]["time"], own[-1]["time"]) for writer, own in sessions.items()}
    for writer, own in sessions.items():
        for before, checkpoint in zip(own, own[1:]):
            if "rows" not in checkpoint:
                continue
            alone = not any(w != writer and first <= checkpoint["time"] and last >= before["time"]
                            for w, (first, last) in spans.items())
            grown = checkpoint["seq"] - before["seq"]
            if alone and grown != checkpoint["rows"]:
                problems.append(f"rows {before['seq'] + 1} to {checkpoint['seq']}: the chain grew by {grown} rows between two "
                                f"checkpoints of writer {writer} ({before['time']}, {checkpoint['time']}), which wrote "
                                f"{checkpoint['rows']} of them alone: rows were inserted (or removed) by someone else")
    return problems
