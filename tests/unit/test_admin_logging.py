"""The /logging query parser (ztunnel's POST /logging?level=...) and a daemon's --log-level, as tables."""

from __future__ import annotations

import logging

import pytest

from nodeagent.admin import RESET, LogLevelError, parse_log_levels, use_log_level

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


# The CLI sets the root logger to WARNING, DEBUG with -vv (cli.main); then a daemon applies its --log-level.
DAEMON = [
    ("default info", logging.WARNING, "info", logging.INFO),
    ("-v keeps info", logging.INFO, "info", logging.INFO),
    ("-vv debugs", logging.DEBUG, "info", logging.DEBUG),
    ("error is error", logging.WARNING, "error", logging.ERROR),
    ("-vv over error", logging.DEBUG, "error", logging.DEBUG),
    ("-v over warning", logging.INFO, "warning", logging.INFO),
    ("without the CLI", logging.NOTSET, "warning", logging.WARNING),
]


@pytest.mark.parametrize(("cli", "requested", "expected"), [c[1:] for c in DAEMON], ids=[c[0] for c in DAEMON])
def test_daemon_log_level(cli: int, requested: str, expected: int) -> None:
    root = logging.getLogger()
    saved = root.level
    try:
        root.setLevel(cli)
        use_log_level(requested)
        assert root.level == expected
    finally:
        root.setLevel(saved)
