"""The CLI's own edges: argument forms the commands share, help that says what the code does, entry points."""

from __future__ import annotations

import pytest

from nodeagent.admin_client import AdminError, admin_url


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("127.0.0.1:15000", "http://127.0.0.1:15000"),
        ("localhost:25000", "http://localhost:25000"),
        (":15000", "http://127.0.0.1:15000"),
        ("[::1]:15000", "http://[::1]:15000"),
        ("::1:15000", "http://[::1]:15000"),  # as parse_endpoint of `nodeagent tunnel --admin` reads it
        ("http://127.0.0.1:15000/", "http://127.0.0.1:15000"),
        ("https://admin.example:8443", "https://admin.example:8443"),
    ],
)
def test_inspect_admin_takes_host_port_as_the_tunnel_does_or_a_url(given: str, url: str) -> None:
    assert admin_url(given) == url


@pytest.mark.parametrize("given", ["127.0.0.1", "localhost:http", "127.0.0.1:99999", ""])
def test_inspect_admin_that_is_neither_is_refused_with_both_forms(given: str) -> None:
    with pytest.raises(AdminError, match="neither a URL nor HOST:PORT"):
        admin_url(given)
