"""Helpers shared by the deployment tests: Terraform parsing (python-hcl2), a templatefile() emulator,
systemd unit parsing. No network, no cloud account."""
from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TF_DIR = REPO / "terraform"
CLOUD_INIT_TEMPLATE = REPO / "cloud-init" / "meshd.yaml.tftpl"
BOOTSTRAP = REPO / "cloud-init" / "meshd-bootstrap.sh"
DRAIN_WATCH = REPO / "cloud-init" / "meshd-drain-watch.sh"
SYSTEMD_DIR = REPO / "systemd"
ROLES = ("gateway", "caller", "infer")


# ---------------------------------------------------------------------------------------------------------------------
# Terraform
# ---------------------------------------------------------------------------------------------------------------------


def _unquote(value):
    """python-hcl2 >= 7 keeps HCL string literals quoted ('"tcp"'); turn literals into plain strings and leave
    expressions ('${var.x}') as they are."""
    if isinstance(value, str):
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            inner = value[1:-1]
            try:
                return json.loads(value)
            except ValueError:
                return inner
        return value
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, dict):
        return {_unquote(k): _unquote(v) for k, v in value.items() if not str(k).startswith("__")}
    return value


class Terraform:
    """All *.tf files of a directory merged: resources[type][name], data[type][name], variables[name],
    outputs[name], locals[name], plus each file's raw text."""

    def __init__(self, directory: Path = TF_DIR):
        import hcl2  # python-hcl2, from the deploy venv

        self.directory = directory
        self.resources: dict[str, dict[str, dict]] = {}
        self.data: dict[str, dict[str, dict]] = {}
        self.variables: dict[str, dict] = {}
        self.outputs: dict[str, dict] = {}
        self.locals: dict[str, object] = {}
        self.modules: dict[str, dict] = {}
        self.text: dict[str, str] = {}
        files = sorted(glob.glob(str(directory / "**" / "*.tf"), recursive=True))
        assert files, f"no .tf files under {directory}"
        for path in files:
            with open(path, encoding="utf-8") as f:
                self.text[os.path.relpath(path, directory)] = f.read()
            with open(path, encoding="utf-8") as f:
                doc = _unquote(hcl2.load(f))
            for block in doc.get("resource", []):
                for rtype, named in block.items():
                    for name, body in named.items():
                        assert name not in self.resources.setdefault(rtype, {}), f"duplicate {rtype}.{name}"
                        self.resources[rtype][name] = body
            for block in doc.get("data", []):
                for dtype, named in block.items():
                    for name, body in named.items():
                        self.data.setdefault(dtype, {})[name] = body
            for block in doc.get("variable", []):
                for name, body in block.items():
                    self.variables[name] = body
            for block in doc.get("output", []):
                for name, body in block.items():
                    self.outputs[name] = body
            for block in doc.get("locals", []):
                for name, body in block.items():
                    assert name not in self.locals, f"duplicate local.{name}"
                    self.locals[name] = body
            for block in doc.get("module", []):
                for name, body in block.items():
                    self.modules[name] = body

    def all_text(self) -> str:
        return "\n".join(self.text.values())

    def resolve(self, value):
        """Resolve '${local.x}' (whole-value references only) to the local's literal value."""
        m = re.fullmatch(r"\$\{local\.([A-Za-z0-9_]+)\}", value) if isinstance(value, str) else None
        if m:
            return self.resolve(self.locals[m.group(1)])
        return value

    def expand_locals(self, expr: str, _seen=None) -> str:
        """The expression text plus, transitively, the text of every local.* it references."""
        seen = set() if _seen is None else _seen
        parts = [expr]
        for name in re.findall(r"\blocal\.([A-Za-z0-9_]+)", expr):
            if name in seen or name not in self.locals:
                continue
            seen.add(name)
            parts.append(self.expand_locals(json.dumps(self.locals[name]), seen))
        return "\n".join(parts)


def block(body: dict, name: str) -> dict:
    """A nested block (python-hcl2 gives a list of one dict)."""
    value = body.get(name)
    if isinstance(value, list):
        assert len(value) == 1, f"expected one {name} block, got {len(value)}"
        return value[0]
    assert isinstance(value, dict), f"missing {name} block"
    return value


# ---------------------------------------------------------------------------------------------------------------------
# templatefile() emulation: ${name} interpolation of plain variables; $${ and %%{ escapes. Anything else (function
# calls, %{ if } / %{ for } directives) is refused so the template stays simple enough for this renderer to be exact.
# ---------------------------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\$\$\{|%%\{|\$\{([^}]*)\}|%\{([^}]*)\}")


def template_variables(text: str) -> set[str]:
    names = set()
    for m in _TOKEN.finditer(text):
        if m.group(2) is not None:
            raise ValueError(f"template directive %{{{m.group(2)}}} is not supported by the test renderer")
        if m.group(1) is not None:
            expr = m.group(1).strip()
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", expr):
                raise ValueError(f"template expression ${{{expr}}} is not a plain variable")
            names.add(expr)
    return names


def render_template(text: str, variables: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        whole = m.group(0)
        if whole == "$${":
            return "${"
        if whole == "%%{":
            return "%{"
        if m.group(2) is not None:
            raise ValueError(f"template directive {whole} is not supported")
        name = m.group(1).strip()
        if name not in variables:
            raise KeyError(f"vars map does not contain key {name!r} (templatefile would fail)")
        return str(variables[name])

    return _TOKEN.sub(sub, text)


# ---------------------------------------------------------------------------------------------------------------------
# systemd units
# ---------------------------------------------------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}; comments and blank lines dropped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: key outside a section: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


# ---------------------------------------------------------------------------------------------------------------------
# The real Terraform, offline: `terraform console` evaluates variables (with their validations), locals and functions
# such as templatefile() without providers, init or an account.
# ---------------------------------------------------------------------------------------------------------------------


TERRAFORM_MIN_VERSION = (1, 9, 0)  # cross-variable validations (`var.allow_public_api` in allowed_api_cidrs' condition)


def terraform_exe() -> str | None:
    """$TERRAFORM (scripts/deploy-checks sets it to the Terraform it pins), else terraform on PATH."""
    import shutil

    return os.environ.get("TERRAFORM") or shutil.which("terraform")


def terraform_version(exe: str) -> tuple[int, ...]:
    import subprocess

    out = subprocess.run([exe, "version"], capture_output=True, text=True, env=_tf_env(), timeout=60).stdout
    m = re.search(r"Terraform v(\d+)\.(\d+)\.(\d+)", out)
    assert m, out
    return tuple(int(x) for x in m.groups())


def require_terraform() -> str:
    """The Terraform to run, failing (never skipping) the test when there is none or it is older than 1.9."""
    import pytest

    exe = terraform_exe()
    if not exe:
        pytest.fail("terraform is not installed: run scripts/deploy-checks (it installs a pinned Terraform >= 1.9) or "
                    "set TERRAFORM", pytrace=False)
    version = terraform_version(exe)
    if version < TERRAFORM_MIN_VERSION:
        need = ".".join(map(str, TERRAFORM_MIN_VERSION))
        pytest.fail(f"{exe} is Terraform {'.'.join(map(str, version))}; these tests need >= {need} (cross-variable "
                    "validations): run scripts/deploy-checks, which installs one, or set TERRAFORM", pytrace=False)
    return exe


def _tf_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CLI_CONFIG_FILE", os.devnull)
    env["CHECKPOINT_DISABLE"] = "1"
    env["TF_IN_AUTOMATION"] = "1"
    return env


def terraform_console(exe: str, directory: Path, expression: str, tf_vars: dict | None = None) -> tuple[str, str | None]:
    """Evaluate one expression in `directory`; returns (printed value, error text or None)."""
    import subprocess

    args = [exe, "console", "-no-color"]
    for k, v in (tf_vars or {}).items():
        args += ["-var", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    proc = subprocess.run(args, input=expression + "\n", capture_output=True, text=True, cwd=directory,
                          env=_tf_env(), timeout=120)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or re.search(r"^\s*Error: ", out, re.M):
        return proc.stdout, out
    return proc.stdout.strip(), None
