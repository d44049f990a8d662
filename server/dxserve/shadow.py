"""Shadow before promotion (issue 33): a candidate version answers beside the served one.

For a plugin named in the `shadow` setting ({plugin: candidate version}), every image answered
by another version of it (a request that named no version, so got the caller's or the plugin's
default) is classified again by the candidate, after the served answer has been recorded and
sent: only the served answer is ever returned. The two decisions are compared and counted:
`dxserve_shadow_total{plugin, served, candidate, outcome}` (agree, disagree, error, skipped) and
one audit row (event `shadow`) per image with the candidate's decision, probabilities and
weights, the served version and decision, and the specimen. `dxserve site shadow-report` reads
those rows: agreement per cell and per specimen. `dxserve site promote` (AdminService.
SetDefaultVersion, recorded in the trail) then makes the candidate the default.

The shadow never holds up the served answer or another caller: it runs after the answer, takes
a place in the candidate's queue only when one is free (never waits for one), and at most
`MAX_IN_FLIGHT` shadows run at once; beyond that an image is counted `skipped`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable

from prometheus_client import Counter

from . import errors
from .v1 import diagnostics_pb2 as pb

log = logging.getLogger("dxserve.shadow")

MAX_IN_FLIGHT = 32
EVENT = "shadow"
SHADOWED = Counter("dxserve_shadow_total", "Images classified in shadow by a candidate version beside the served one, "
                   "by outcome (agree, disagree: the decisions' labels; error: the candidate failed; skipped: too many "
                   "shadows at once)", ["plugin", "served", "candidate", "outcome"])


class Shadow:
    """`classify(request, request_id)` answers a request as the service does, without recording
    it; `record(**row)` writes an audit row (None: no trail)."""

    def __init__(self, candidates: dict[str, str], classify: Callable[[pb.ClassifyRequest, str], Awaitable[pb.ClassifyResponse]],
                 record: Callable[..., Awaitable] | None):
        self.candidates, self.classify, self.record = dict(candidates), classify, record
        self.in_flight: set[asyncio.Task] = set()

    def observe(self, request: pb.ClassifyRequest, served: pb.ClassifyResponse, caller: str) -> None:
        """After `served` was recorded: classify the same image with the plugin's candidate, in the background."""
        candidate = self.candidates.get(served.plugin)
        if not candidate or request.model_version or served.model_version == candidate:
            return
        if len(self.in_flight) >= MAX_IN_FLIGHT:
            SHADOWED.labels(served.plugin, served.model_version, candidate, "skipped").inc()
            return
        task = asyncio.ensure_future(self._guarded(request, served, candidate, caller))
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    async def _guarded(self, *args) -> None:
        try:
            await self._compare(*args)
        except Exception:  # a shadow's own bug is logged, never raised into the served path
            log.exception("shadow comparison failed")

    async def _compare(self, request: pb.ClassifyRequest, served: pb.ClassifyResponse, candidate: str, caller: str) -> None:
        shadowed = pb.ClassifyRequest()
        shadowed.CopyFrom(request)
        shadowed.model_version, shadowed.explain = candidate, False
        request_id = f"{served.request_id}/shadow"
        detail = {"served_version": served.model_version, "served_decision": served.decision.label}
        row = {"event": EVENT, "caller": caller, "method": "Shadow", "request_id": request_id,
               "specimen_id": request.specimen_id, "plugin": served.plugin, "model_version": candidate,
               "input_sha256": served.input_sha256}
        try:
            answer = await self.classify(shadowed, request_id)
        except errors.ServingError as error:
            outcome = "skipped" if error.code.name == "RESOURCE_EXHAUSTED" else "error"  # busy: never waits for a place
            row.update(status=error.code.name, detail=json.dumps({**detail, "error": error.message}))
        except Exception as error:  # a shadow must never touch the served path
            log.exception("shadow classification failed", extra={"plugin": served.plugin, "candidate": candidate})
            outcome = "error"
            row.update(status="INTERNAL", detail=json.dumps({**detail, "error": f"{type(error).__name__}: {error}"}))
        else:
            outcome = "agree" if answer.decision.label == served.decision.label else "disagree"
            row.update(status="OK", weights_sha256=answer.weights_sha256, decision=answer.decision.label,
                       probabilities=json.dumps({p.label: round(float(p.probability), 6) for p in answer.probabilities}),
                       detail=json.dumps({**detail, "agree": outcome == "agree"}))
        SHADOWED.labels(served.plugin, served.model_version, candidate, outcome).inc()
        if self.record is not None:
            try:
                await self.record(**row)
            except Exception as error:  # the trail's own health says why; a shadow row is never a result
                log.warning("shadow row not recorded", extra={"error": f"{type(error).__name__}: {error}"})


def report(rows: Iterable[dict]) -> dict:
    """Agreement of a trail's shadow rows, per candidate: per cell, and per specimen (the share of
    each specimen's cells whose decisions agree; specimens whose cells all agree)."""
    out: dict[str, dict] = {}
    for row in rows:
        if row.get("event") != EVENT:
            continue
        key = f"{row['plugin']} {json.loads(row['detail'] or '{}').get('served_version', '?')} -> {row['model_version']}"
        entry = out.setdefault(key, {"cells": 0, "agree": 0, "not_compared": 0, "specimens": {}})
        detail = json.loads(row["detail"] or "{}")
        entry["cells"] += 1
        if row["status"] != "OK":
            entry["not_compared"] += 1
            continue
        agree = bool(detail.get("agree"))
        entry["agree"] += agree
        if row.get("specimen_id"):
            cells, agreed = entry["specimens"].get(row["specimen_id"], (0, 0))
            entry["specimens"][row["specimen_id"]] = (cells + 1, agreed + agree)
    for entry in out.values():
        compared = entry["cells"] - entry["not_compared"]
        entry["agreement"] = entry["agree"] / compared if compared else None
        specimens = entry.pop("specimens")
        entry["specimens"] = {s: {"cells": c, "agreement": a / c} for s, (c, a) in sorted(specimens.items())}
        entry["specimens_all_agree"] = sum(a == c for c, a in specimens.values())
    return out
