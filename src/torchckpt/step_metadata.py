"""What a CheckpointManager stores in a step's manifest: the step, its metrics and the user's metadata.

The manifest is strict JSON (no ``NaN`` literals), so everything is checked
*before* a save stages or writes anything: a value that cannot be stored is
refused by name, never found at the commit after all the data was written.

Metrics are numbers. Non-finite ones (a diverged loss) are stored with the
typed-JSON node of the state tree, ``{"float": "nan"|"inf"|"-inf"}``, and
come back as floats; retention policies skip ``nan``. User metadata is plain
JSON: dicts with string keys, lists, strings, finite numbers, booleans, null.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

__all__ = ["MAX_METADATA_DEPTH", "decode_metrics", "step_metadata"]

#: Deepest nesting of user metadata (far below what the manifest parser accepts).
MAX_METADATA_DEPTH = 64

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def step_metadata(step: int, metrics: Any, metadata: Any, where: str) -> dict[str, Any]:
    """The manifest metadata of a step: checked and encoded.

    Args:
        step: The step number.
        metrics: ``{name: number}`` (None: none).
        metadata: Plain JSON (None: none).
        where: Names the save in error messages ("cannot save step 3 under /ckpt").

    Returns:
        ``{"step": ..., "metrics": ..., "user": ...}``, strict JSON.

    Raises:
        ConfigError: A metric or the metadata cannot be stored (``field`` is
            ``"metrics"`` or ``"metadata"``; the message names the metric or key).
    """
    encoded = _encode_metrics(metrics, where)
    problem = _json_problem(metadata, "", 0)
    if problem is not None:
        raise ConfigError(f"{where}: {problem}", field="metadata")
    return {"step": step, "metrics": encoded, "user": {} if metadata is None else metadata}


def _encode_metrics(metrics: Any, where: str) -> dict[str, Any]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ConfigError(
            f"{where}: metrics must be a dict of name to number, got a {type(metrics).__name__}", field="metrics"
        )
    out: dict[str, Any] = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise ConfigError(
                f"{where}: metric names must be strings, got {name!r} ({type(name).__name__})", field="metrics"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = "; pass float(value)" if hasattr(value, "item") else ""
            raise ConfigError(
                f"{where}: metric {name!r} must be an int or a float (nan and inf are allowed), "
                f"got a {type(value).__name__}{hint}",
                field="metrics",
            )
        if isinstance(value, float):
            value = float(value)  # a float subclass (numpy.float64) as the plain float it is
            if not math.isfinite(value):
                value = {"float": "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"}
        out[name] = value
    return out


def decode_metrics(raw: Any) -> dict[str, Any]:
    """The metrics of a manifest's ``metadata["metrics"]``, non-finite values as floats again.

    Anything else a manifest holds there (written by other versions) is
    returned as it is; a value that is not a dict gives no metrics.
    """
    if not isinstance(raw, dict):
        return {}
    return {name: _decode_metric(value) for name, value in raw.items()}


def _decode_metric(value: Any) -> Any:
    if isinstance(value, dict) and len(value) == 1 and value.get("float") in _NON_FINITE:
        return _NON_FINITE[value["float"]]
    return value


def _json_problem(value: Any, key: str, depth: int) -> str | None:
    """Why ``value`` (at ``key`` of the metadata) is not plain JSON, or None."""
    where = f"metadata key {key!r}" if key else "metadata"
    if value is None or isinstance(value, (str, bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} holds {value!r}, which is not plain JSON"
    if not isinstance(value, (dict, list, tuple)):
        return f"{where} holds a value of type {type(value).__name__}, which is not plain JSON"
    if depth >= MAX_METADATA_DEPTH:
        return f"{where} is nested deeper than {MAX_METADATA_DEPTH} levels"
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{where} has a key {k!r} that is not a string"
            problem = _json_problem(v, f"{key}.{k}" if key else k, depth + 1)
            if problem is not None:
                return problem
        return None
    for i, v in enumerate(value):
        problem = _json_problem(v, f"{key}[{i}]", depth + 1)
        if problem is not None:
            return problem
    return None
