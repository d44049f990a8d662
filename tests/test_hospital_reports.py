"""Results as a hospital stores them: an HL7 FHIR R4 Bundle and an HL7 v2.5.1 ORU^R01 of one
specimen, made by `dxserve-client classify --specimen-id ... --fhir ... --hl7 ...` against the
session server, holding exactly that stream's counts, hashes, versions and audit rows."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3

import pytest
from conftest import ROOT
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.codesystem import CodeSystem
from hl7apy.parser import parse_message

from dxserve_client import Client
from dxserve_client.cli import main
from dxserve_client.codes import CODES, HL7_SYSTEM, NOT_A_DIAGNOSIS, SYSTEM
from dxserve_client.fhir import AI_PROVENANCE, AUDIT_SEQ_EXTENSION, INPUT_SYSTEM, code_system


@pytest.fixture(scope="module")
def reports(server, cell_paths, tmp_path_factory):
    """One specimen (the fixture cells and one unreadable file) streamed through the CLI."""
    tmp = tmp_path_factory.mktemp("reports")
    smear = tmp / "smear-17"
    smear.mkdir()
    for path in cell_paths:
        shutil.copy(path, smear / path.name)
    (smear / "zz-broken.png").write_bytes(b"not a png")
    out = {name: tmp / name for name in ("bundle.json", "oru.hl7", "summary.json")}
    code = main(["--server", server.address, "classify", str(smear), "--specimen-id", "smear-17", "--quiet",
                 "--fhir", str(out["bundle.json"]), "--fhir-per-cell", "--hl7", str(out["oru.hl7"]), "--patient", "P-42",
                 "--specimen-output", str(out["summary.json"]), "--format", "jsonl", "--output", str(tmp / "cells.jsonl")])
    assert code == 1  # the unreadable file is an item that failed; the rest are reported
    rows = [json.loads(line) for line in (tmp / "cells.jsonl").read_text().splitlines()]
    return {"summary": json.loads(out["summary.json"].read_text())[0], "rows": rows, "smear": smear,
            "bundle": out["bundle.json"].read_text(), "hl7": out["oru.hl7"].read_bytes().decode()}  # segments end in \r


def resources(bundle: Bundle, kind: str) -> list:
    return [e.resource for e in bundle.entry if e.resource.get_resource_type() == kind]


def component(observation, code: str):
    return next(c for c in observation.component if c.code.coding[0].code == code)


def test_fhir_bundle_validates_round_trips_and_holds_the_stream(reports, server, cell_paths):
    bundle = Bundle.model_validate_json(reports["bundle"])  # validated by fhir.resources' models
    again = Bundle.model_validate_json(bundle.model_dump_json())
    assert again.model_dump() == bundle.model_dump()
    assert bundle.type == "transaction" and all(e.request.method == "POST" and e.fullUrl.startswith("urn:uuid:")
                                                 for e in bundle.entry)
    urls = {e.fullUrl for e in bundle.entry}
    summary = reports["summary"]

    (report,) = resources(bundle, "DiagnosticReport")
    assert report.status == "preliminary" and NOT_A_DIAGNOSIS in report.conclusion
    assert f"{summary['cells_seen']} cells sent" in report.conclusion and report.subject.reference == "Patient/P-42"
    assert {r.reference for r in report.result} <= urls and report.specimen[0].reference in urls
    if summary["call"]:
        assert f"Specimen call: {summary['call']}" in report.conclusion and report.conclusionCode[0].text == summary["call"]
    assert report.meta.security[0].code == "AIAST"
    (specimen,) = resources(bundle, "Specimen")
    assert specimen.identifier[0].value == "smear-17"

    observations = resources(bundle, "Observation")
    by_code = {}
    for o in observations:
        by_code.setdefault(o.code.coding[0].code, []).append(o)
    assert all(o.status == "preliminary" and o.code.coding[0].system == SYSTEM for o in observations)
    counts = {"cells-seen": "cells_seen", "cells-failed": "cells_failed", "cells-passed-gate": "cells_passed_gate",
              "cells-indeterminate": "indeterminate"}
    for code, key in counts.items():
        assert by_code[code][0].valueQuantity.value == summary[key], code
    assert summary["cells_seen"] == len(cell_paths) + 1 and summary["cells_failed"] == 1
    fractions = {component(o, "label").valueString: o for o in by_code["label-fraction"]}
    assert set(fractions) == set(summary["labels"])
    for label, (count, fraction, low, high) in summary["labels"].items():
        o = fractions[label]
        assert float(o.valueQuantity.value) == pytest.approx(fraction * 100, abs=0.006) and o.valueQuantity.unit == "%"
        assert component(o, "label-count").valueQuantity.value == count
        assert float(component(o, "ci-low").valueQuantity.value) == pytest.approx(low * 100, abs=0.006)
        assert float(component(o, "ci-high").valueQuantity.value) == pytest.approx(high * 100, abs=0.006)
    answered = [r for r in reports["rows"] if not r["error_code"]]
    assert len(by_code["cell-classification"]) == len(answered) == len(cell_paths)
    assert sorted(o.valueString for o in by_code["cell-classification"]) == sorted(r["label"] for r in answered)

    (device,) = resources(bundle, "Device")
    with Client(server.address) as client:
        plugin = next(p for p in client.list_plugins() if p.name == "lymphoblast")
    served = next(v for v in plugin.model_versions if v.version == plugin.default_model_version)
    assert [v.value for v in device.version] == [served.version, served.weights_sha256]
    assert device.identifier[0].value == served.weights_sha256 and served.model_card in device.note[0].text

    # The AI Provenance: the device as author, each input image's SHA-256 and its audit row.
    (provenance,) = resources(bundle, "Provenance")
    assert provenance.meta.profile == [AI_PROVENANCE] and provenance.agent[0].who.reference == next(
        e.fullUrl for e in bundle.entry if e.resource.get_resource_type() == "Device")
    made = {e.fullUrl for e in bundle.entry if e.resource.get_resource_type() in ("DiagnosticReport", "Observation")}
    assert {t.reference for t in provenance.target} == made
    hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in cell_paths}
    entities = {e.what.identifier.value: e for e in provenance.entity}
    assert set(entities) == hashes and all(e.what.identifier.system == INPUT_SYSTEM for e in provenance.entity)
    with sqlite3.connect(server.audit_path) as connection:
        rows = dict(connection.execute("SELECT seq, input_sha256 FROM audit WHERE specimen_id = 'smear-17' AND status = 'OK'"))
    for digest, entity in entities.items():
        (extension,) = entity.extension
        assert extension.url == AUDIT_SEQ_EXTENSION and rows[extension.valueInteger] == digest  # the row that made it


def test_every_code_is_in_the_published_code_system(reports):
    published = CodeSystem.model_validate_json((ROOT / "docs" / "fhir" / "CodeSystem-dxserve.json").read_text())
    assert published.model_dump() == code_system().model_dump(), "regenerate: python -m dxserve_client.fhir > docs/fhir/CodeSystem-dxserve.json"
    defined = {c.code for c in published.concept}
    used = {c["code"] for c in _codings(json.loads(reports["bundle"])) if c.get("system") == SYSTEM}
    assert used and used <= defined == set(CODES)
    assert not any("loinc" in c.get("system", "") for c in _codings(json.loads(reports["bundle"])))  # none invented


def _codings(node):
    if isinstance(node, dict):
        if "code" in node and "system" in node:
            yield node
        for value in node.values():
            yield from _codings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _codings(value)


def test_hl7_v2_oru_parses_back_with_the_same_values(reports, server):
    message = parse_message(reports["hl7"].strip("\r"), find_groups=True)
    assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and message.msh.msh_12.to_er7() == "2.5.1"
    result = message.ORU_R01_PATIENT_RESULT
    assert result.ORU_R01_PATIENT.pid.pid_3.to_er7() == "P-42"
    order = result.ORU_R01_ORDER_OBSERVATION
    assert order.obr.obr_25.to_er7() == "P" and order.obr.obr_3.to_er7().startswith("smear-17^")
    assert NOT_A_DIAGNOSIS in order.nte.nte_3.to_er7()
    obx = [group.obx for group in order.ORU_R01_OBSERVATION]
    values = {}
    for segment in obx:
        code, _, system = segment.obx_3.to_er7().split("^")
        assert system == HL7_SYSTEM and code in CODES and segment.obx_11.to_er7() == "P"
        values.setdefault(code, []).append(segment.obx_5.to_er7())
    summary = reports["summary"]
    assert values["cells-seen"] == [str(summary["cells_seen"])] and values["cells-failed"] == ["1"]
    assert values["label"] == list(summary["labels"])
    assert [float(v) for v in values["label-fraction"]] == pytest.approx([f[1] * 100 for f in summary["labels"].values()], abs=0.006)
    with Client(server.address) as client:
        weights = client.classify((reports["smear"] / sorted(p.name for p in reports["smear"].glob("UID*"))[0]).read_bytes()).weights_sha256
    assert {s.obx_18.to_er7() for s in obx} == {f"lymphoblast/{summary['model_version']}/sha256:{weights}^DXSERVE"}


def test_reports_need_one_specimen(server, cell_paths, tmp_path, capsys):
    assert main(["--server", server.address, "classify", str(cell_paths[0]), "--fhir", str(tmp_path / "b.json")]) == 2
    assert "--specimen-id" in capsys.readouterr().err and not (tmp_path / "b.json").exists()
