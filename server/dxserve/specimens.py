"""Running per-specimen summaries within one ClassifyStream.

Acquisition software streams a smear cell by cell; a reviewer also wants the picture of the
whole specimen: how many cells were seen and usable, how many were called each label, the
fraction of each with its Wilson interval, and the plugin's specimen-level call
(`ModelRuntime.decide_specimen`). Summaries live only as long as their stream.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from . import errors
from .runtime import ModelRuntime, SpecimenCounts
from .v1 import diagnostics_pb2 as pb

# Longest accepted ClassifyRequest.specimen_id, and most specimens one stream may summarise:
# a client must not be able to grow the server's memory through either.
MAX_SPECIMEN_ID = 128
MAX_SPECIMENS_PER_STREAM = 1024


def check_specimen_id(specimen_id: str) -> None:
    if len(specimen_id) > MAX_SPECIMEN_ID:
        raise errors.invalid_field("specimen_id", "SPECIMEN_ID_TOO_LONG",
                                   f"specimen_id has {len(specimen_id)} characters; the limit is {MAX_SPECIMEN_ID}")


@dataclass
class Tally:
    """The counts of one (specimen, plugin, model version) in one stream."""

    specimen_id: str
    plugin: str
    model_version: str
    runtime_of: Callable[[], ModelRuntime | None]  # the version's runtime once loaded; None if unknown: counts, no call
    seen: int = 0
    failed: int = 0
    passed_gate: int = 0
    indeterminate: int = 0
    called: dict[str, int] = field(default_factory=dict)

    def add(self, response: pb.ClassifyStreamResponse) -> None:
        """Count one answered item; a field plugin's item counts each object it found."""
        if response.HasField("result") and response.result.HasField("field"):
            for found in response.result.objects:
                if found.HasField("result") or found.HasField("error"):
                    self._count(found.error if found.HasField("error") else None, found.result)
            return
        self._count(response.error if response.HasField("error") else None, response.result)

    def _count(self, error, result: pb.ClassifyResponse) -> None:
        self.seen += 1
        if error is not None:
            self.failed += 1
            return
        self.passed_gate += result.quality.passed
        if result.decision.indeterminate:
            self.indeterminate += 1
        else:
            self.called[result.decision.label] = self.called.get(result.decision.label, 0) + 1

    def counts(self, runtime: ModelRuntime | None) -> SpecimenCounts:
        labels = runtime.info.labels if runtime else tuple(sorted(self.called))
        return SpecimenCounts(self.seen, self.failed, self.passed_gate, self.indeterminate,
                              {label: self.called.get(label, 0) for label in labels})

    def summary(self, final: bool = False) -> pb.SpecimenSummary:
        runtime = self.runtime_of()
        counts = self.counts(runtime)
        message = pb.SpecimenSummary(
            specimen_id=self.specimen_id, plugin=self.plugin, model_version=self.model_version, cells_seen=counts.seen,
            cells_failed=counts.failed, cells_passed_gate=counts.passed_gate, indeterminate=counts.indeterminate, final=final)
        for label, count in counts.called.items():
            fraction, low, high = counts.fraction(label)
            message.labels.add(label=label, count=count, fraction=fraction, ci_low=low, ci_high=high)
        decision = runtime.decide_specimen(counts) if runtime else None
        if decision is not None:
            message.decision.CopyFrom(pb.Decision(**dataclasses.asdict(decision)))
        return message


@dataclass
class FieldTally:
    """A field plugin's view of its objects plugin's Tally: each field adds the objects it
    found; a field that failed as a whole (unreadable, refused) found no cells and adds none."""

    tally: Tally

    def add(self, response: pb.ClassifyStreamResponse) -> None:
        if not response.HasField("error"):
            self.tally.add(response)

    def summary(self, final: bool = False) -> pb.SpecimenSummary:
        return self.tally.summary(final)


class StreamSpecimens:
    """The running summaries of one stream: one Tally per (specimen, plugin, model version)."""

    def __init__(self, plugins: dict):
        self.plugins = plugins  # name -> registry.PluginEntry
        self.tallies: dict[tuple[str, str, str], Tally] = {}

    def tally_for(self, request: pb.ClassifyRequest) -> Tally | FieldTally | None:
        """The summary this stream item counts into; None without a specimen_id. Raises
        INVALID_ARGUMENT for a too long id, or one specimen too many for the stream."""
        if not request.specimen_id:
            return None
        entry = self.plugins.get(request.plugin)
        version = request.model_version or (entry.default_version if entry else "")
        plugin, fields = request.plugin, entry is not None and entry.info is not None and bool(entry.info.objects_plugin)
        if fields:
            # A field plugin's objects are the cells: summarised under the plugin that classifies them.
            plugin = entry.info.objects_plugin
            entry = self.plugins.get(plugin)
            version = entry.default_version if entry else ""
        key = (request.specimen_id, plugin, version)
        if key not in self.tallies:
            check_specimen_id(request.specimen_id)
            if len(self.tallies) >= MAX_SPECIMENS_PER_STREAM:
                raise errors.invalid_field("specimen_id", "TOO_MANY_SPECIMENS", f"this stream already summarises "
                                           f"{MAX_SPECIMENS_PER_STREAM} specimens, the limit: start a new stream")
            self.tallies[key] = Tally(request.specimen_id, errors.clip(plugin), errors.clip(version),
                                      functools.partial(_loaded_runtime, entry, version))
        return FieldTally(self.tallies[key]) if fields else self.tallies[key]

    def finals(self) -> list[pb.SpecimenSummary]:
        return [tally.summary(final=True) for tally in self.tallies.values()]


def _loaded_runtime(entry, version: str) -> ModelRuntime | None:
    """The version's runtime once it is loaded (versions load on first use)."""
    batcher = entry.batchers.get(version) if entry else None
    return batcher.runtime if batcher else None
