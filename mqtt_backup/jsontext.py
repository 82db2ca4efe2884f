"""`json.loads` of bytes and `json.dumps(..., ensure_ascii=False)`, the same results for less.

The restore client reads one JSON object per restored message and writes one line per message.
Per call, `json.loads(bytes)` guesses the encoding, decodes with `surrogatepass` and matches
whitespace by regex around json's C scanner; `json.dumps` with any option builds a new
`JSONEncoder` and a new C encoder. That was about 20 us of the client's 35 us per message
(docs/design-notes.md, "Restore client: acknowledge what is written"). Here json's own scanner
and C encoder are built once, with the arguments `json.loads` and `json.dumps` give them, so the
results are theirs (tests/test_jsontext.py compares them on generated values and texts).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json import encoder as _encoder
from json.scanner import make_scanner
from typing import Any

_DECODER = json.JSONDecoder()  # what json.loads uses without arguments
# As JSONDecoder builds its own `scan_once` (typeshed types the argument as the scanner class).
_SCAN = make_scanner(_DECODER)  # type: ignore[arg-type]
_ENCODER = json.JSONEncoder(ensure_ascii=False)  # what json.dumps(ensure_ascii=False) builds

# json.dumps(ensure_ascii=False) ends in this call, made anew each time (JSONEncoder.iterencode,
# one-shot), when json has its C accelerator. Markers None skips the cycle check: a value from
# `loads` has no cycles.
_C_MAKE_ENCODER = getattr(_encoder, "c_make_encoder", None)
_ENCODE: Callable[[object, int], Any] | None = (
    _C_MAKE_ENCODER(
        None,
        _ENCODER.default,
        _encoder.encode_basestring,
        None,
        _ENCODER.key_separator,
        _ENCODER.item_separator,
        False,  # sort_keys
        False,  # skipkeys
        True,  # allow_nan
    )
    if _C_MAKE_ENCODER is not None
    else None
)


def loads(data: bytes) -> Any:
    """`json.loads(data)`: the same value, or the same error.

    A text that starts with `{` and decodes as strict UTF-8 is json.loads's own case (its
    encoding guess says UTF-8 unless the second byte is NUL, which no JSON scan gets past) with
    no whitespace to skip at the start; without whitespace at the end, the scanner's value is
    json.loads's. Anything else, error or not, is json.loads's to answer.
    """
    if data[:1] == b"{":
        try:
            text = data.decode("utf-8")
            value, end = _SCAN(text, 0)
        except (ValueError, StopIteration, RecursionError):
            return json.loads(data)
        if end == len(text):
            return value
    return json.loads(data)


def dumps(value: dict[str, Any]) -> str:
    """`json.dumps(value, ensure_ascii=False)` of a value without cycles (one `loads` made)."""
    if _ENCODE is None:  # a Python without json's C accelerator
        return _ENCODER.encode(value)
    return "".join(_ENCODE(value, 0))
