"""The /logging query parser (ztunnel's POST /logging?level=...), as a table."""

from __future__ import annotations

import logging

import pytest

from nodeagent.admin import RESET, LogLevelError, parse_log_levels

GOOD = [
    ("level=debug", {"": logging.DEBUG}),
    ("level=trace", {"": logging.DEBUG}),
    ("level=WARN", {"": logging.WARNING}),
    ("level=off", {"": logging.CRITICAL + 1}),
    ("level=nodeagent.access=warn,nodeagent=debug", {"nodeagent.access": logging.WARNING, "nodeagent": logging.DEBUG}),
    ("level=info,nodeagent.ztunnel=debug", {"": logging.INFO, "nodeagent.ztunnel": logging.DEBUG}),
    ("reset", RESET),
]
BAD = [
    ("", "send level="),
    ("level=loud", "unknown level 'loud'"),
    ("level=urllib3=debug", "not nodeagent's"),
    ("level=nodeagentx=debug", "not nodeagent's"),
    ("level=info&level=debug", "send level="),
    ("level=info&reset", "send level="),
]


@pytest.mark.parametrize(("query", "expected"), GOOD, ids=[q or "empty" for q, _ in GOOD])
def test_parse_log_levels(query: str, expected: object) -> None:
    assert parse_log_levels(query) == expected


@pytest.mark.parametrize(("query", "message"), BAD, ids=[q or "empty" for q, _ in BAD])
def test_parse_log_levels_refuses(query: str, message: str) -> None:
    with pytest.raises(LogLevelError, match=message):
        parse_log_levels(query)
