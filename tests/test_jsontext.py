"""mqtt_backup.jsontext gives json's own results, and `mqtt-backup restore` writes the lines it did.

The restore client decodes each answer with `jsontext.loads` and writes its line with
`jsontext.dumps`; before, `json.loads` and `json.dumps(..., ensure_ascii=False)` of a copy
without `id`, `seq` and `instance`. Whatever the bytes, the value (or the error) and the line
must be theirs.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from mqtt_backup import jsontext
from mqtt_backup.cli.restore import _Stream

# Every code point, lone surrogates included (JSON text can carry them as \\ud800 escapes).
ANY_TEXT = st.text(st.characters(codec=None, categories=None), max_size=12)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats()  # NaN and the infinities: json writes and reads them
    | ANY_TEXT
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=16,
)
OBJECTS = st.dictionaries(ANY_TEXT, VALUES, max_size=6)


def _same(a: Any, b: Any) -> bool:
    """Equal, type for type (1, 1.0 and True differ; NaN equals NaN)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _outcome(decode: Any, data: bytes) -> tuple[str, Any]:
    try:
        return "value", decode(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        return type(exc).__name__, str(exc)


def _texts(value: dict[str, Any]) -> list[bytes]:
    """The ways a JSON text of `value` may come: the bridge's, escaped, spaced, other encodings."""
    canonical = json.dumps(value, ensure_ascii=False)
    return [
        canonical.encode("utf-8", "backslashreplace"),  # the bridge's (restore/reply.py)
        canonical.encode("utf-8", "surrogatepass"),  # json.loads takes it, strict UTF-8 not
        json.dumps(value).encode(),  # \\u escapes
        json.dumps(value, indent=1).encode(),
        json.dumps(value, separators=(",", ":")).encode() + b" \n",
        b"\xef\xbb\xbf" + canonical.encode("utf-8", "surrogatepass"),  # a UTF-8 BOM
        canonical.encode("utf-16-le", "surrogatepass"),  # json.loads guesses the encoding
        canonical.encode("utf-8", "surrogatepass")[:-1],  # cut short
        canonical.encode("utf-8", "surrogatepass") + b"}",  # more after the object
    ]


@given(OBJECTS)
def test_loads_reads_what_json_loads_reads(value: dict[str, Any]) -> None:
    for data in _texts(value):
        ours, theirs = _outcome(jsontext.loads, data), _outcome(json.loads, data)
        assert ours[0] == theirs[0], data
        assert _same(ours[1], theirs[1]), data


@given(st.binary(max_size=40))
def test_loads_of_any_bytes_is_json_loads(data: bytes) -> None:
    for text in (data, b"{" + data, b'{"a": ' + data + b"}", b'{"a": "' + data + b'"}'):
        ours, theirs = _outcome(jsontext.loads, text), _outcome(json.loads, text)
        assert ours[0] == theirs[0], text
        assert _same(ours[1], theirs[1]), text


@given(OBJECTS)
def test_dumps_writes_what_json_dumps_writes(value: dict[str, Any]) -> None:
    assert jsontext.dumps(value) == json.dumps(value, ensure_ascii=False)


_PROTOCOL: dict[str, st.SearchStrategy[Any]] = {
    "id": ANY_TEXT,
    "seq": st.integers(min_value=1),
    "instance": ANY_TEXT,
}


@st.composite
def _answers(draw: st.DrawFn) -> dict[str, Any]:
    """An answer's JSON object: the protocol's keys (some, anywhere) among the message's."""
    fields: list[tuple[str, Any]] = list(draw(OBJECTS).items())
    for key, values in _PROTOCOL.items():
        if draw(st.booleans()):
            fields.insert(draw(st.integers(0, len(fields))), (key, draw(values)))
    return dict(fields)


def _line_before(payload: bytes) -> str:
    """The restore client's line before jsontext: cli/restore.py's `_Stream`, output.json_line."""
    body = json.loads(payload)
    kept = {k: v for k, v in body.items() if k not in ("id", "seq", "instance")}
    return json.dumps(kept, ensure_ascii=False) + "\n"


@given(st.lists(_answers(), min_size=1, max_size=5))
def test_restore_lines_are_the_lines_written_before(answers: list[dict[str, Any]]) -> None:
    payloads = [
        json.dumps(a, ensure_ascii=False).encode("utf-8", "backslashreplace") for a in answers
    ]
    out, seen = io.StringIO(), list[int]()
    stream = _Stream(out, seen.append)
    for payload in payloads:
        stream(jsontext.loads(payload))
    assert out.getvalue() == "", "nothing is written before the flush"
    stream.flush()
    assert out.getvalue() == "".join(_line_before(p) for p in payloads)
    assert seen == [len(answers)], "the progress hears the count once per batch"
