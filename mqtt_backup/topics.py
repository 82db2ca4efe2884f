"""Topic templates, device-id extraction, filter matching and the bridge's own topics (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mqtt_backup.errors import UsageError

DEVICE = "{device}"
DEFAULT_GROUP = "default"  # the group of a bridge without --group (status topic, requests)


@dataclass(frozen=True, slots=True)
class Template:
    """A topic template such as `devices/{device}/#`: one subscription and one extractor."""

    text: str
    levels: tuple[str, ...]
    device_level: int

    @property
    def filter(self) -> str:
        """The MQTT subscription filter: `{device}` becomes `+`."""
        return "/".join("+" if i == self.device_level else lvl for i, lvl in enumerate(self.levels))

    def device_of(self, levels: Sequence[str]) -> str | None:
        """The device id when the topic (split into levels) matches this template, else None."""
        if not _levels_match(self.levels, levels, self.device_level):
            return None
        return levels[self.device_level]


def parse_template(text: str) -> Template:
    """Parse and check a template; UsageError says what is wrong with it."""
    hint = "a template is a topic filter with one whole level '{device}', e.g. devices/{device}/#"
    if not text:
        raise UsageError("topic template is empty", hint)
    levels = tuple(text.split("/"))
    device_levels = [i for i, lvl in enumerate(levels) if lvl == DEVICE]
    if text.count(DEVICE) != 1 or len(device_levels) != 1:
        found = text.count(DEVICE)
        detail = {0: "has no '{device}' level", 1: "embeds '{device}' in a level"}.get(
            found, f"has {found} '{{device}}' levels"
        )
        raise UsageError(f"topic template {text!r} {detail}", hint)
    for i, lvl in enumerate(levels):
        if i == device_levels[0]:
            continue
        if ("#" in lvl and (lvl != "#" or i != len(levels) - 1)) or ("+" in lvl and lvl != "+"):
            raise UsageError(f"topic template {text!r} has a misplaced wildcard in {lvl!r}", hint)
        if "{" in lvl or "}" in lvl:
            raise UsageError(f"topic template {text!r} has an unknown placeholder {lvl!r}", hint)
    if levels[0].startswith("$"):
        raise UsageError(f"topic template {text!r} starts with '$' (broker-internal topics)", hint)
    return Template(text=text, levels=levels, device_level=device_levels[0])


def _levels_match(pattern: Sequence[str], topic: Sequence[str], wildcard_at: int = -1) -> bool:
    for i, want in enumerate(pattern):
        if want == "#":
            return True
        if i >= len(topic):
            return False
        if want != "+" and i != wildcard_at and want != topic[i]:
            return False
    return len(topic) == len(pattern)


def filter_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (`+` one level, `#` the rest) of a topic name.

    As in MQTT (4.7.2), a filter starting with a wildcard does not match a `$` topic.
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    return _levels_match(topic_filter.split("/"), topic.split("/"))


def check_filter(topic_filter: str) -> str:
    """The filter itself; UsageError when the text is not a valid MQTT topic filter."""
    if not topic_filter:
        raise UsageError("topic filter is empty", "use '#' for every topic")
    levels = topic_filter.split("/")
    for i, lvl in enumerate(levels):
        if ("#" in lvl and (lvl != "#" or i != len(levels) - 1)) or ("+" in lvl and lvl != "+"):
            raise UsageError(
                f"topic filter {topic_filter!r} misplaces a wildcard: '#' must be a whole last "
                "level and '+' a whole level"
            )
    return topic_filter


def check_namespace(namespace: str) -> str:
    """The namespace; UsageError unless it is a plain topic prefix (no wildcard or empty level)."""
    if not namespace or any(c in namespace for c in "+#") or "" in namespace.split("/"):
        raise UsageError(
            f"namespace {namespace!r} must be one or more non-empty topic levels without wildcards",
            "--namespace backup",
        )
    if namespace.startswith("$"):
        raise UsageError(f"namespace {namespace!r} must not start with '$'", "--namespace backup")
    return namespace


def check_device(device: str, *, stored: bool = False) -> str:
    """The device id; UsageError unless it is one non-empty topic level without wildcards.

    What a restore request can name: its topic is `<namespace>/restore/<device>`. `stored`
    also takes "", the id an empty topic level is stored under (export and forget reach it).
    """
    if (not device and not stored) or any(c in device for c in "/+#"):
        raise UsageError(
            f"device {device!r} must be one topic level (no '/', '+' or '#')",
            "mqtt-backup devices lists the stored ids",
        )
    return device


_MEMBER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
MAX_MEMBER_CHARS = 64


def check_member_name(name: str) -> str:
    """A group or instance name: one topic level and part of a client id, so plain characters."""
    if not name or len(name) > MAX_MEMBER_CHARS or not set(name) <= _MEMBER_CHARS:
        raise UsageError(
            f"{name!r} must be 1 to {MAX_MEMBER_CHARS} letters, digits, '_', '.' or '-'",
            "e.g. --group fleet --instance b1",
        )
    return name


def shared(topic_filter: str, group: str | None) -> str:
    """The filter as a member of a shared-subscription group subscribes it (unchanged without)."""
    return f"$share/{group}/{topic_filter}" if group else topic_filter


def status_topic(namespace: str, group: str | None, name: str) -> str:
    """Where a bridge keeps its retained status: `<namespace>/status/<group>/<name>`."""
    return f"{namespace}/status/{group or DEFAULT_GROUP}/{name}"


class Router:
    """Maps an incoming topic to the device it belongs to, or None when it is not to be stored."""

    def __init__(self, templates: Sequence[Template], namespace: str) -> None:
        self._templates = tuple(templates)
        self._namespace = namespace
        self._own_prefix = namespace + "/"
        self._matchers = tuple(_matcher(t) for t in self._templates)

    @property
    def filters(self) -> list[str]:
        """The subscription filters, one per template, without repeats."""
        return list(dict.fromkeys(t.filter for t in self._templates))

    def device_of(self, topic: str) -> str | None:
        """The device id for a topic; None for the bridge's own namespace and unmatched topics."""
        if topic.startswith(self._own_prefix) or topic == self._namespace:
            return None
        levels = topic.split("/")
        count = len(levels)
        # = Template.device_of of each template in turn, with what it checks worked out once:
        # a new topic comes with every message of a fleet larger than the route map.
        for literals, device_level, size, open_ended in self._matchers:
            if count >= size if open_ended else count == size:
                for i, want in literals:
                    if levels[i] != want:
                        break
                else:
                    return levels[device_level]
        return None


# A template as `Router.device_of` matches it: (level index, text) of its literal levels, the
# device level, the level count (without a final '#'), whether a final '#' takes any rest.
_Matcher = tuple[tuple[tuple[int, str], ...], int, int, bool]


def _matcher(template: Template) -> _Matcher:
    """What `_levels_match(template.levels, levels, template.device_level)` checks."""
    levels = template.levels
    open_ended = levels[-1] == "#"  # '#' is always the last level (parse_template)
    size = len(levels) - 1 if open_ended else len(levels)
    literals = tuple(
        (i, lvl) for i, lvl in enumerate(levels[:size]) if lvl != "+" and i != template.device_level
    )
    return literals, template.device_level, size, open_ended
