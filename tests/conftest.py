"""Shared by every tier: async tests run once on asyncio's default loop and once on uvloop.

DESIGN.md ("Tests in tiers"): async code is tested on both event loops. pytest-asyncio parametrizes
every async test (and its async fixtures) over the factories this hook returns.
"""

from __future__ import annotations

import asyncio

import pytest
import uvloop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
