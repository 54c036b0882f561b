"""The closed set of reasons a reading is dead-lettered (also the metric label values)."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why a reading could not be scored. Closed set: dashboards and alerts rely on it."""

    DECODE_ERROR = "decode_error"  # empty, tombstone, not UTF-8, malformed or truncated JSON
    INVALID_SHAPE = "invalid_shape"  # not an object, values not an object, nesting too deep
    INVALID_NUMBER = "invalid_number"  # a feature that is a string, bool, or out of float range
    MISSING_FIELD = "missing_field"  # no device id / timestamp, or too many missing features
    INVALID_TIMESTAMP = "invalid_timestamp"  # unparsable, seconds not ms, too far future/past
    INVALID_DEVICE_ID = "invalid_device_id"  # empty, too long, control characters
    OVERSIZE = "oversize"  # value larger than reading.max_value_bytes
    NON_FINITE_SCORE = "non_finite_score"  # NaN/inf score: never silently "normal"


class Stage(StrEnum):
    """Where in the pipeline a reading failed."""

    DECODE = "decode"
    VALIDATE = "validate"
    SCORE = "score"
