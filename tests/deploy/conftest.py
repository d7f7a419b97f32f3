"""Fixtures of the chart tests: helm itself (installed by scripts/helm.sh) and the rendered cases."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from tests.deploy.manifests import CASES, HELM_SCRIPT, render


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary. Not getting it is a failure, not a skip: CI must run these tests."""
    result = subprocess.run(["bash", str(HELM_SCRIPT)], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"scripts/helm.sh could not provide helm:\n{result.stderr}"
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def rendered(helm: str) -> dict[str, list[dict[str, Any]]]:
    """Case id -> the objects `helm template` rendered for it (each case rendered once)."""
    return {case_id: render(helm, case) for case_id, case in CASES.items()}
