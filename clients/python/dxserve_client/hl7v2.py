"""One specimen's results as an HL7 v2.5.1 ORU^R01 message, analyzer to LIS (as in IHE LAW).

    message = to_oru(summary, results)
    Path("out.hl7").write_bytes(message.to_er7().encode())

Built and checked with hl7apy. Segments: MSH, PID, OBR (the specimen report, result status
P = preliminary), an NTE with the conclusion (the call, the counts, what it is not), and OBX
per quantity: the cell counts, each label's fraction with its 95 % interval (OBX-4 groups one label's rows), and the
specimen call. Every OBX names the model in OBX-18 (equipment instance identifier):
"<plugin>/<model version>/sha256:<weights SHA-256>^DXSERVE". Codes: codes.py, in the local
coding system 99DXS. Needs `pip install 'dxserve-client[hl7]'`.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Sequence

from hl7apy.core import Message

from .client import Result, Specimen
from .codes import HL7_SYSTEM, display, report_conclusion

SENDING_APPLICATION = "DXSERVE"
UCUM = "UCUM"


def equipment(plugin: str, version: str, weights_sha256: str) -> str:
    """OBX-18: the model that produced the value."""
    return f"{plugin}/{version}/sha256:{weights_sha256}^{SENDING_APPLICATION}"


def _text(value: str) -> str:
    """A value safe inside an HL7 v2 field: its delimiters and line ends replaced."""
    for delimiter in "|^~\\&\r\n":
        value = value.replace(delimiter, " ")
    return value


def to_oru(summary: Specimen, results: Sequence[Result] = (), *, patient_id: str = "", receiving_application: str = "LIS",
           specimen_system: str = SENDING_APPLICATION, when: datetime.datetime | None = None) -> Message:
    """The ORU^R01 of one specimen (validated by hl7apy before it is returned).

    `patient_id`: PID-3 (empty: "UNKNOWN", for the LIS to match by specimen);
    `results`: the stream's results, only to name the weights in OBX-18."""
    when = when or datetime.datetime.now(datetime.timezone.utc)
    stamp = when.strftime("%Y%m%d%H%M%S")
    weights = next((r.weights_sha256 for r in results if r.ok and r.specimen_id == summary.specimen_id), "")
    model = equipment(summary.plugin, summary.model_version, weights)

    message = Message("ORU_R01", version="2.5.1")
    message.msh.msh_3 = SENDING_APPLICATION
    message.msh.msh_5 = _text(receiving_application)
    message.msh.msh_7 = stamp
    message.msh.msh_9 = "ORU^R01^ORU_R01"
    message.msh.msh_10 = uuid.uuid4().hex[:20]
    message.msh.msh_11 = "P"
    message.msh.msh_12 = "2.5.1"
    result = message.add_group("ORU_R01_PATIENT_RESULT")
    patient = result.add_group("ORU_R01_PATIENT")
    patient.pid.pid_1 = "1"
    patient.pid.pid_3 = _text(patient_id) or "UNKNOWN"
    patient.pid.pid_5 = "UNKNOWN"
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    order.obr.obr_1 = "1"
    order.obr.obr_3 = f"{_text(summary.specimen_id)}^{_text(specimen_system)}"  # filler order number: the specimen
    order.obr.obr_4 = f"specimen-report^{display('specimen-report')}^{HL7_SYSTEM}"
    order.obr.obr_7 = stamp
    order.obr.obr_25 = "P"
    note = order.add_segment("NTE")
    note.nte_1 = "1"
    note.nte_3 = _text(report_conclusion(summary))

    rows = [("NM", "cells-seen", "", str(summary.cells_seen), "{cells}"),
            ("NM", "cells-failed", "", str(summary.cells_failed), "{cells}"),
            ("NM", "cells-passed-gate", "", str(summary.cells_passed_gate), "{cells}"),
            ("NM", "cells-indeterminate", "", str(summary.indeterminate), "{cells}")]
    for group, (label, (count, fraction, low, high)) in enumerate(summary.labels.items(), start=1):
        rows += [("ST", "label", str(group), _text(label), ""),
                 ("NM", "label-fraction", str(group), f"{fraction * 100:.2f}", "%"),
                 ("NM", "ci-low", str(group), f"{low * 100:.2f}", "%"),
                 ("NM", "ci-high", str(group), f"{high * 100:.2f}", "%"),
                 ("NM", "label-count", str(group), str(count), "{cells}")]
    if summary.call:
        rows.append(("ST", "specimen-call", "", _text(summary.call), ""))
    for index, (kind, code, sub_id, value, unit) in enumerate(rows, start=1):
        obx = order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1 = str(index)
        obx.obx_2 = kind
        obx.obx_3 = f"{code}^{display(code)}^{HL7_SYSTEM}"
        if sub_id:
            obx.obx_4 = sub_id
        obx.obx_5 = value
        if unit:
            obx.obx_6 = f"{unit}^{unit}^{UCUM}"
        obx.obx_11 = "P"
        obx.obx_14 = stamp
        obx.obx_18 = model
    if not message.validate():
        raise ValueError("the ORU^R01 message does not validate")
    return message
