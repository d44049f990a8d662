"""One specimen's results as an HL7 FHIR R4 Bundle, for a lab information system or an EHR.

    bundle = to_fhir(results, summary, per_cell=True)
    Path("bundle.json").write_text(bundle.model_dump_json(indent=2))

Built from fhir.resources' validated models (its R4B package: FHIR 4.3.0, whose
DiagnosticReport, Observation, Specimen, Device and Provenance are R4's). The Bundle is a
`transaction` a FHIR server can take as it is (POST /): entries refer to each other by
urn:uuid. What each element means is in docs/hospital-integration.md; the codes in codes.py.
Needs `pip install 'dxserve-client[hl7]'`.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Sequence

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.codesystem import CodeSystem
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.provenance import Provenance
from fhir.resources.R4B.specimen import Specimen as FhirSpecimen

from .client import Result, Specimen
from .codes import CODES, SYSTEM, display, report_conclusion

#: Identifier systems of what dxserve names (a site may pass its own specimen system).
SPECIMEN_SYSTEM = "urn:dxserve:specimen-id"
INPUT_SYSTEM = "urn:dxserve:input-sha256"
WEIGHTS_SYSTEM = "urn:dxserve:weights-sha256"
#: Extension on a Provenance entity: the audit-trail row (sequence number) that recorded the result.
AUDIT_SEQ_EXTENSION = "urn:dxserve:fhir:StructureDefinition:audit-seq"
#: AI Transparency on FHIR: the Provenance profile, and the security label "asserted by AI".
AI_PROVENANCE = "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/AI-Provenance"
AI_ASSERTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "AIAST",
               "display": "Artificial Intelligence asserted"}
LABORATORY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}
HEMATOLOGY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "HM", "display": "Hematology"}]}
UCUM = "http://unitsofmeasure.org"


def concept(code: str, text: str = "") -> dict:
    return {"coding": [{"system": SYSTEM, "code": code, "display": display(code)}], "text": text or display(code)}


def cells(count: int) -> dict:
    return {"value": count, "unit": "cells", "system": UCUM, "code": "{cells}"}


def percent(fraction: float) -> dict:
    return {"value": round(fraction * 100, 2), "unit": "%", "system": UCUM, "code": "%"}


def to_fhir(results: Sequence[Result], summary: Specimen, *, patient: str = "", specimen_system: str = SPECIMEN_SYSTEM,
            per_cell: bool = False, model_card: str = "", issued: datetime.datetime | None = None) -> Bundle:
    """A transaction Bundle for one specimen: its Specimen, the model's Device, a preliminary
    DiagnosticReport (conclusion: the specimen call and its rule), Observations of the counts
    and of each label's fraction with its 95 % interval (and with `per_cell`, one per cell),
    and an AI Provenance naming the model and each input image's SHA-256 and audit row.

    `results`: the stream's results of this specimen (Result.specimen_id == summary.specimen_id);
    `patient`: a reference for the subject, e.g. "Patient/123" (none: no subject);
    `model_card`: where the model card is (ModelVersion.model_card)."""
    mine = [r for r in results if r.specimen_id == summary.specimen_id]
    answered = [r for r in mine if r.ok]
    versions = {(r.plugin, r.model_version, r.weights_sha256) for r in answered}
    if len(versions) > 1:
        raise ValueError(f"one specimen's results come from {len(versions)} model versions: {sorted(versions)}")
    plugin, version, weights = next(iter(versions), (summary.plugin, summary.model_version, ""))
    issued = issued or datetime.datetime.now(datetime.timezone.utc)
    url = {name: f"urn:uuid:{uuid.uuid4()}" for name in ("specimen", "device", "report", "provenance")}
    subject = {"subject": {"reference": patient}} if patient else {}
    meta = {"security": [AI_ASSERTED]}

    specimen = FhirSpecimen(identifier=[{"system": specimen_system, "value": summary.specimen_id}], **subject)
    device = Device(
        identifier=[{"system": WEIGHTS_SYSTEM, "value": weights}] if weights else None,
        deviceName=[{"name": f"dxserve plugin {plugin}, model {version}", "type": "model-name"}],
        type={"text": "AI decision-support model (dxserve plugin)"},
        version=[{"type": {"text": "model version"}, "value": version},
                 *([{"type": {"text": "weights SHA-256"}, "value": weights}] if weights else [])],
        note=[{"text": f"Model card: {model_card}"}] if model_card else None)

    def observation(code: str, text: str = "", **value) -> Observation:
        return Observation(status="preliminary", category=[LABORATORY], code=concept(code, text), meta=meta,
                           specimen={"reference": url["specimen"]}, device={"reference": url["device"]},
                           effectiveDateTime=issued, issued=issued, **subject, **value)

    observations = [observation(code, valueQuantity=cells(count)) for code, count in (
        ("cells-seen", summary.cells_seen), ("cells-failed", summary.cells_failed),
        ("cells-passed-gate", summary.cells_passed_gate), ("cells-indeterminate", summary.indeterminate))]
    for label, (count, fraction, low, high) in summary.labels.items():
        observations.append(observation(
            "label-fraction", f"Fraction of called cells labelled {label} (model-derived)", valueQuantity=percent(fraction),
            component=[{"code": concept("label"), "valueString": label},
                       {"code": concept("label-count"), "valueQuantity": cells(count)},
                       {"code": concept("ci-low"), "valueQuantity": percent(low)},
                       {"code": concept("ci-high"), "valueQuantity": percent(high)}]))
    if summary.call:
        observations.append(observation("specimen-call", valueString=summary.call,
                                        note=[{"text": f"{summary.call_reason} Rule: {summary.rule}"}]))
    if per_cell:
        for r in answered:
            observations.append(observation(
                "cell-classification", valueString=r.decision, identifier=[{"system": INPUT_SYSTEM, "value": r.input_sha256}]
                if r.input_sha256 else None, note=[{"text": r.reason}] if r.reason else None,
                component=[{"code": concept("confidence"), "valueQuantity": {"value": round(r.confidence, 6), "unit": "1",
                                                                            "system": UCUM, "code": "1"}},
                           {"code": concept("screen-positive"), "valueBoolean": r.screen_positive}]))
    obs_urls = [f"urn:uuid:{uuid.uuid4()}" for _ in observations]

    conclusion = report_conclusion(summary)
    report = DiagnosticReport(
        status="preliminary", category=[HEMATOLOGY], code=concept("specimen-report"), meta=meta, **subject,
        specimen=[{"reference": url["specimen"]}], result=[{"reference": u} for u in obs_urls],
        effectiveDateTime=issued, issued=issued, conclusion=conclusion,
        conclusionCode=[concept("specimen-call", summary.call)] if summary.call else None,
        text={"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{_escape(conclusion)}</p>'
                                            f"<p>Rule: {_escape(summary.rule)}</p></div>"})
    provenance = Provenance(
        meta={"profile": [AI_PROVENANCE]}, recorded=issued,
        target=[{"reference": url["report"]}, *({"reference": u} for u in obs_urls)],
        agent=[{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                     "code": "author", "display": "Author"}]},
                "who": {"reference": url["device"], "display": f"{plugin} {version}"}}],
        entity=[{"role": "source", "what": {"identifier": {"system": INPUT_SYSTEM, "value": r.input_sha256},
                                            "display": f"cell image {r.request_id}"},
                 "extension": [{"url": AUDIT_SEQ_EXTENSION, "valueInteger": r.audit_seq}] if r.audit_seq else None}
                for r in answered if r.input_sha256] or None)

    entries = [(url["specimen"], specimen), (url["device"], device), *zip(obs_urls, observations, strict=True),
               (url["report"], report), (url["provenance"], provenance)]
    return Bundle(type="transaction", timestamp=issued, entry=[
        {"fullUrl": full_url, "resource": resource, "request": {"method": "POST", "url": resource.get_resource_type()}}
        for full_url, resource in entries])


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def code_system() -> CodeSystem:
    """dxserve's code system (codes.py) as a FHIR CodeSystem resource, as published in docs/fhir/."""
    return CodeSystem(
        url=SYSTEM, name="DxserveCodes", title="dxserve result codes", status="active", content="complete",
        description="Codes of the quantities dxserve's plugins report (model-derived; not laboratory counts).",
        caseSensitive=True, concept=[{"code": code, "display": d, "definition": definition}
                                     for code, (d, definition) in CODES.items()])


if __name__ == "__main__":  # python -m dxserve_client.fhir > docs/fhir/CodeSystem-dxserve.json
    print(code_system().model_dump_json(indent=2))
