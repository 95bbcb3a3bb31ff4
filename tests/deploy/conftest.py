import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploylib import Terraform  # noqa: E402


@pytest.fixture(scope="session")
def tf() -> Terraform:
    return Terraform()
