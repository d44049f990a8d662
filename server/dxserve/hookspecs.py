"""The hooks a dxserve plugin implements. This module is the plugin author's reference.

A plugin is a Python package that declares an entry point in the ``dxserve`` group and
implements hooks with the ``hookimpl`` marker::

    # pyproject.toml
    [project.entry-points.dxserve]
    my_plugin = "my_package.plugin"

    # my_package/plugin.py
    from dxserve import hookimpl

    @hookimpl
    def dxserve_model_runtimes():
        return [MyRuntime]

Installing the package is all it takes: the server finds it at start. The built-in
lymphoblast classifier registers itself exactly this way.
"""

from __future__ import annotations

import pluggy

PROJECT = "dxserve"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dxserve_model_runtimes() -> list[type]:
    """Return the model runtimes this plugin provides.

    Each is a subclass of :class:`dxserve.runtime.ModelRuntime` that declares:

    - ``info``: a :class:`~dxserve.runtime.PluginInfo` (unique name, version, labels,
      input expectations, intended use). Clients address the plugin by ``info.name``.
    - ``versions()``: the available :class:`~dxserve.runtime.ModelVersion` s, the default
      first, each with its weights file, SHA-256 and model card. The server refuses to
      load weights whose hash differs.
    - ``load()``: load one version's weights. Raising marks that version FAILED (with the
      exception as its reason) while its other versions and every other plugin keep serving.
    - ``predict(batch)``: probabilities for a batch of preprocessed images.

    and may override ``preprocess(image)`` (decoded uint8 RGB -> model input) and
    ``decide(probabilities)`` (a :class:`~dxserve.runtime.Decision`: a label, or an explicit
    indeterminate result; optionally a ``screen_positive`` flag from a high-sensitivity
    threshold and the ``rule`` with its versioned thresholds in words. A called label should
    be the most probable one, so that no result reads as a contradiction), and
    ``check_quality(image)`` (an input quality gate: a list of
    :class:`~dxserve.runtime.QualityIssue` for an image the model should not classify, such
    as a blank frame or several cells; the server then answers indeterminate with those
    reasons in ``ClassifyResponse.quality``), and ``predict_with_issues(batch)`` (the
    probabilities plus, per image, problems the model itself found, such as features far from
    its training data, from one forward pass; answered like a failed ``check_quality``),
    ``decide_specimen(counts)`` (a specimen-level :class:`~dxserve.runtime.Decision` from the
    :class:`~dxserve.runtime.SpecimenCounts` of one specimen's cells in a stream, e.g. the
    blast fraction with its Wilson interval against versioned thresholds: decision support,
    not a diagnosis) and ``explain(image)`` (an :class:`~dxserve.runtime.Explanation`: a
    heatmap of the image's size showing what drove the score, for requests that set
    ``explain``; a plugin without it is listed with ``explains = false``), ``examples()``
    (a few shipped image files of what it classifies, the inputs of ``dxserve plugin check``)
    and ``prepare(image)`` (what the server calls per image: ``preprocess`` and
    ``check_quality`` together, so that a plugin can share work between them, such as one
    segmentation mask; it must return what the two calls would).

    **The safety contract.** The server serves a version only if
    ``safety_checks(version)`` names both an input quality gate (``QUALITY_GATE``) and an
    out-of-distribution check (``OUT_OF_DISTRIBUTION``); by default a runtime has each one
    that it overrides ``check_quality`` / ``predict_with_issues`` for, and a runtime whose
    versions differ says so per version. A version without both is listed as
    ``VERSION_STATE_NOT_SERVED`` and refused with ``FAILED_PRECONDITION``
    (``VERSION_UNGATED``) unless the operator names it in ``ungated_versions_allowed``.
    ``predict``, ``prepare``/``preprocess``, ``find_objects`` and ``explain`` should each return
    within the server's ``predict_timeout_s``: one that does not marks its version unresponsive
    (health NOT_SERVING, its queue failed fast) until it returns.
    """

