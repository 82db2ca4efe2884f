"""Topic templates, device extraction, MQTT filter matching and the bridge's own namespace."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqtt_backup.errors import EXIT_USAGE, UsageError
from mqtt_backup.topics import (
    Router,
    Template,
    check_filter,
    check_namespace,
    filter_matches,
    parse_template,
)
from tests.conftest import examples

# --- parse_template ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "filter_", "device_level"),
    [
        ("devices/{device}/#", "devices/+/#", 1),
        ("tele/{device}/+", "tele/+/+", 1),
        ("zigbee2mqtt/{device}", "zigbee2mqtt/+", 1),
        ("{device}/x", "+/x", 0),
        ("{device}", "+", 0),
        ("{device}/#", "+/#", 0),
        ("+/{device}", "+/+", 1),
        ("a/b/c/{device}/d/+/e/#", "a/b/c/+/d/+/e/#", 3),
        ("/{device}", "/+", 1),
        ("site/ünï/{device}/温度", "site/ünï/+/温度", 2),
    ],
)
def test_parse_template_accepts(text: str, filter_: str, device_level: int) -> None:
    template = parse_template(text)
    assert template == Template(text=text, levels=tuple(text.split("/")), device_level=device_level)
    assert template.filter == filter_


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "is empty"),
        ("devices/#", "has no '{device}' level"),
        ("devices/+/#", "has no '{device}' level"),
        ("{device}/{device}", "has 2 '{device}' level"),
        ("a/{device}/b/{device}/#", "has 2 '{device}' level"),
        ("dev{device}", "embeds '{device}' in a level"),
        ("devices/{device}x/#", "embeds '{device}' in a level"),
        ("devices/id-{device}", "embeds '{device}' in a level"),
        ("devices/#/{device}", "misplaced wildcard in '#'"),
        ("devices/{device}/#/x", "misplaced wildcard in '#'"),
        ("devices/{device}/data#", "misplaced wildcard in 'data#'"),
        ("devices/{device}/a+", "misplaced wildcard in 'a+'"),
        ("devices+/{device}", "misplaced wildcard in 'devices+'"),
        ("{site}/{device}", "unknown placeholder '{site}'"),
        ("devices/{device}/{kind}", "unknown placeholder '{kind}'"),
        ("devices/{device}/x}", "unknown placeholder 'x}'"),
        ("$SYS/{device}", "starts with '$'"),
        ("$share/g/{device}/#", "starts with '$'"),
    ],
)
def test_parse_template_rejects(text: str, problem: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_template(text)
    message = str(info.value)
    assert problem in message
    assert info.value.exit_code == EXIT_USAGE
    assert "Try:" in message
    assert "{device}" in info.value.hint
    if text:
        assert repr(text) in message  # names the template


def test_template_device_of() -> None:
    template = parse_template("devices/{device}/#")
    assert template.device_of(["devices", "d1", "t"]) == "d1"
    assert template.device_of(["devices", "d1"]) == "d1"  # '#' matches the parent level
    assert template.device_of(["devices"]) is None
    assert template.device_of(["other", "d1", "t"]) is None


# --- Router --------------------------------------------------------------------------------------

MIXED = Router(
    [
        parse_template("devices/{device}/#"),
        parse_template("tele/{device}/+"),
        parse_template("zigbee2mqtt/{device}"),
        parse_template("{device}/status"),
    ],
    "backup",
)


@pytest.mark.parametrize(
    ("topic", "device"),
    [
        ("devices/d1/temp", "d1"),
        ("devices/d1/a/b/c", "d1"),
        ("devices/d1", "d1"),  # '#' also matches the parent level
        ("devices/d1/", "d1"),
        ("devices", None),
        ("tele/plug-7/STATE", "plug-7"),
        ("tele/plug-7", None),  # '+' needs a level
        ("tele/plug-7/STATE/extra", None),
        ("tele/plug-7/", "plug-7"),  # '+' matches an empty level
        ("zigbee2mqtt/lamp", "lamp"),
        ("zigbee2mqtt/lamp/set", None),
        ("zigbee2mqtt/Küche Lampe 🙂", "Küche Lampe 🙂"),
        ("devices/Gerät-ü/温度", "Gerät-ü"),
        ("boiler/status", "boiler"),
        ("boiler/status/x", None),
        ("devices//temp", ""),  # an empty device level is the device ""
        ("zigbee2mqtt/", ""),
        ("/status", ""),
        ("Devices/d1/temp", None),  # topics are case-sensitive
        ("unrelated/topic", None),
        ("", None),
        ("backup/restore/x", None),  # the bridge's own namespace: never a device
        ("backup/status", None),
        ("backup/restore/x/response", None),
        ("backup/", None),
    ],
)
def test_router_device_of(topic: str, device: str | None) -> None:
    assert MIXED.device_of(topic) == device


def test_first_matching_template_wins() -> None:
    router = Router([parse_template("a/{device}/#"), parse_template("+/b/{device}")], "backup")
    assert router.device_of("a/b/c") == "b"
    router = Router([parse_template("+/b/{device}"), parse_template("a/{device}/#")], "backup")
    assert router.device_of("a/b/c") == "c"


@pytest.mark.parametrize("namespace", ["backup", "ops/backup", "bäckup"])
@pytest.mark.parametrize(
    "template", ["{device}/#", "+/{device}/#", "+/+/{device}", "{device}/restore/+"]
)
def test_namespace_is_never_a_device(namespace: str, template: str) -> None:
    router = Router([parse_template(template)], namespace)
    for suffix in ("restore/x", "restore/x/response", "status/i1", "restore/", "a/b/c/d"):
        assert router.device_of(f"{namespace}/{suffix}") is None


@pytest.mark.parametrize("namespace", ["backup", "ops/backup"])
def test_a_sibling_sharing_the_prefix_is_not_the_namespace(namespace: str) -> None:
    router = Router([parse_template("{device}/#")], namespace)
    for topic in (f"{namespace}x/restore/x", f"{namespace}-old/restore/x"):
        assert router.device_of(topic) == topic.split("/")[0]


@settings(max_examples=examples(200), deadline=None)
@given(
    rest=st.lists(
        st.text(st.characters(codec="utf-8", exclude_characters="/+#\x00")),
        min_size=1,
        max_size=5,
    )
)
def test_namespace_exclusion_property(rest: list[str]) -> None:
    router = Router([parse_template("{device}/#"), parse_template("+/{device}/#")], "backup")
    assert router.device_of("/".join(["backup", *rest])) is None


def test_router_filters_without_repeats() -> None:
    router = Router(
        [
            parse_template("devices/{device}/#"),
            parse_template("tele/{device}/+"),
            parse_template("devices/{device}/#"),
            parse_template("+/{device}/+"),
        ],
        "backup",
    )
    assert router.filters == ["devices/+/#", "tele/+/+", "+/+/+"]


# --- filter_matches ------------------------------------------------------------------------------

# MQTT 5.0 section 4.7 (and 3.1.1 section 4.7) examples, plus edge cases.
SPEC_EXAMPLES = [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis/player1", True),
    ("#", "/", True),
    ("sport/tennis/#", "sport/tennis", True),
    ("sport/tennis/#", "sport/tenniss", False),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+/tennis/#", "sport/tennis/player1", True),
    ("+/tennis/#", "sport/badminton", False),
    ("+", "sport", True),
    ("+/+/+", "a/b/c", True),
    ("+/+/+", "a/b", False),
    ("ACCOUNTS", "Accounts", False),
    ("accounts", "accounts", True),
    ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False),
    ("a//c", "a//c", True),
    ("a/+/c", "a//c", True),
    ("ü/+/🙂", "ü/温度/🙂", True),
    ("$SYS/#", "$SYS/broker/clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
]


@pytest.mark.parametrize(("topic_filter", "topic", "matches"), SPEC_EXAMPLES)
def test_filter_matches_spec_examples(topic_filter: str, topic: str, matches: bool) -> None:
    assert filter_matches(topic_filter, topic) is matches


@settings(max_examples=examples(200), deadline=None)
@given(
    levels=st.lists(
        st.text(st.characters(codec="utf-8", exclude_characters="/+#\x00")),
        min_size=1,
        max_size=6,
    ),
    data=st.data(),
)
def test_filter_from_topic_matches_it(levels: list[str], data: st.DataObject) -> None:
    topic = "/".join(levels)
    dollar = topic.startswith("$")  # MQTT 4.7.2: a leading wildcard never matches `$` topics
    assert filter_matches(topic, topic)
    assert filter_matches("#", topic) is not dollar
    plus = data.draw(st.lists(st.booleans(), min_size=len(levels), max_size=len(levels)))
    assert filter_matches(
        "/".join("+" if p else lvl for p, lvl in zip(plus, levels, strict=True)), topic
    ) is not (dollar and plus[0])
    cut = data.draw(st.integers(0, len(levels) - 1))
    assert filter_matches("/".join([*levels[:cut], "#"]), topic) is not (dollar and cut == 0)


# --- check_filter / check_namespace (check_device: test_restore_unit.py) -------------------------


@pytest.mark.parametrize(
    "topic_filter",
    ["#", "+", "a/b", "a/+/c", "a/#", "+/+/#", "/", "/+", "a//b", "ünï/🙂/#", "$SYS/#"],
)
def test_check_filter_accepts(topic_filter: str) -> None:
    assert check_filter(topic_filter) == topic_filter  # raises UsageError on a bad filter
    # What it accepts works as a filter: it matches the topic it describes.
    topic = "/".join("x" if level in {"+", "#"} else level for level in topic_filter.split("/"))
    assert filter_matches(topic_filter, topic)


@pytest.mark.parametrize(
    "topic_filter", ["a/#/b", "#/a", "a#", "a/b#", "a+", "a/+b", "a/b+/c", "##", "++", "+#"]
)
def test_check_filter_rejects(topic_filter: str) -> None:
    with pytest.raises(UsageError, match="misplaces a wildcard") as info:
        check_filter(topic_filter)
    assert repr(topic_filter) in str(info.value)
    assert info.value.exit_code == EXIT_USAGE


@pytest.mark.parametrize("namespace", ["backup", "a/b", "ops/backup/v1", "bäckup", "a b"])
def test_check_namespace_accepts(namespace: str) -> None:
    assert check_namespace(namespace) == namespace  # raises UsageError on a bad namespace
    # What it accepts works as the bridge's own prefix: its restore traffic is never stored, even
    # under a template that takes every other topic.
    router = Router([parse_template("{device}/#")], namespace)
    assert router.device_of(f"{namespace}/restore/dev-1") is None
    assert router.device_of(f"{namespace}x/restore/dev-1") == f"{namespace}x".split("/")[0]


@pytest.mark.parametrize(
    ("namespace", "problem"),
    [
        ("", "non-empty topic levels without wildcards"),
        ("back+up", "without wildcards"),
        ("backup/#", "without wildcards"),
        ("+", "without wildcards"),
        ("/backup", "non-empty topic levels"),
        ("backup/", "non-empty topic levels"),
        ("a//b", "non-empty topic levels"),
        ("$backup", "must not start with '$'"),
        ("$SYS/x", "must not start with '$'"),
    ],
)
def test_check_namespace_rejects(namespace: str, problem: str) -> None:
    with pytest.raises(UsageError, match="namespace") as info:
        check_namespace(namespace)
    assert problem in str(info.value)
    assert repr(namespace) in str(info.value)
    assert "--namespace backup" in str(info.value)


_LEVEL = st.sampled_from(["a", "b", "", "ü", "x y"])


@settings(max_examples=examples(500), deadline=None)
@given(
    shapes=st.lists(
        st.tuples(
            st.lists(st.sampled_from(["a", "b", "+", ""]), max_size=3),
            st.lists(st.sampled_from(["a", "+", "b"]), max_size=3),
            st.booleans(),
        ),
        min_size=1,
        max_size=3,
    ),
    topic=st.lists(_LEVEL, min_size=1, max_size=7),
)
def test_router_matches_as_its_templates_do(
    shapes: list[tuple[list[str], list[str], bool]], topic: list[str]
) -> None:
    """The router's precompiled match is each template's own `device_of`, first match wins."""
    templates = [
        parse_template("/".join([*before, "{device}", *after, *(["#"] if hashed else [])]))
        for before, after, hashed in shapes
    ]
    want = next(
        (d for t in templates if (d := t.device_of(topic)) is not None),
        None,
    )
    assert Router(templates, "backup").device_of("/".join(topic)) == want
