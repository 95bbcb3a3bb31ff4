import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploylib import TF_DIR, Terraform, require_terraform  # noqa: E402


@pytest.fixture(scope="session")
def tf() -> Terraform:
    return Terraform()


@pytest.fixture(scope="session")
def tf_vars_dir(tmp_path_factory):
    """(terraform, a scratch module holding only terraform/variables.tf): `terraform console` there evaluates every
    variable's validations offline, without providers or init."""
    exe = require_terraform()
    d = tmp_path_factory.mktemp("tfvars")
    (d / "variables.tf").write_text((TF_DIR / "variables.tf").read_text())
    return exe, d
