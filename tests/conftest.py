"""Options of the whole suite (pytest reads command-line options only from a conftest this high)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-examples", type=int, default=None, metavar="N",
                     help="inputs each property-based fuzz test tries (default: a few seconds' worth, for CI)")
