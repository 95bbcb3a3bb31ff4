"""cloud-init/meshd-bootstrap.sh run for real against a scratch root (MESHD_BOOTSTRAP_ROOT) with stub aws, curl
and systemctl: sha256 checks, token file, env file, model cache, restart only on change."""
import hashlib
import os
import stat
import subprocess
import textwrap

import pytest

from deploylib import BOOTSTRAP, REPO

TOKEN = "first-token-0123456789"
GATEWAY_URL = "ws://10.20.1.10:49134"

STUB_AWS = r"""#!/bin/bash
echo "aws $*" >>"$STUB_LOG"
case "$1 $2" in
  "s3 cp") cp "$STUB_BINARY" "${@: -1}" ;;
  "ssm get-parameter") cat "$STUB_TOKEN"; echo ;;
  *) echo "unexpected aws call: $*" >&2; exit 2 ;;
esac
"""
STUB_CURL = r"""#!/bin/bash
echo "curl $*" >>"$STUB_LOG"
out=
while [ $# -gt 0 ]; do
  if [ "$1" = "-o" ]; then out=$2; shift; fi
  url=$1
  shift
done
case "$url" in
  *model*) cp "$STUB_MODEL" "$out" ;;
  *) cp "$STUB_BINARY" "$out" ;;
esac
"""
STUB_SYSTEMCTL = """#!/bin/bash
echo "systemctl $*" >>"$STUB_LOG"
"""
STUB_FAIL = """#!/bin/bash
echo "$(basename "$0") must not be called: $*" >&2
exit 3
"""
FAKE_MESHD = """#!/bin/sh
echo "meshd $*" >>"$STUB_LOG"
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Box:
    def __init__(self, tmp_path, role):
        assert os.geteuid() == 0, "the bootstrap test runs as root (it installs files owned by root)"
        self.role = role
        self.root = tmp_path / "root"
        self.stubs = tmp_path / "stubs"
        self.log = tmp_path / "calls.log"
        self.binary = tmp_path / "meshd.src"
        self.model = tmp_path / "model.src"
        self.token = tmp_path / "token.src"
        for d in (self.root / "etc/meshd", self.stubs):
            d.mkdir(parents=True)
        for name, body in (("aws", STUB_AWS), ("curl", STUB_CURL), ("systemctl", STUB_SYSTEMCTL),
                           ("snap", STUB_FAIL), ("logger", "#!/bin/sh\n")):
            p = self.stubs / name
            p.write_text(body)
            p.chmod(0o755)
        self.binary.write_text(FAKE_MESHD)
        self.model.write_bytes(b"GGUF" + os.urandom(4096))
        self.token.write_text(TOKEN)
        (self.root / "etc/meshd" / f"{role}.toml").write_bytes((REPO / "roles" / f"{role}.toml").read_bytes())
        self.settings = {
            "MESHD_ROLE": role,
            "AWS_REGION": "us-east-1",
            "MESHD_TOKEN_PARAMETER": "/meshd/worker-token",
            "MESHD_BINARY_S3_URI": "s3://bucket/meshd/x/meshd",
            "MESHD_BINARY_URL": "",
            "MESHD_BINARY_SHA256": sha(self.binary.read_bytes()),
            "MESHD_GATEWAY_URL": GATEWAY_URL,
            "MESHD_MODEL_URL": "https://example.invalid/model.gguf",
            "MESHD_MODEL_SHA256": sha(self.model.read_bytes()),
        }
        self.write_settings()

    def write_settings(self):
        body = "".join(f"{k}='{v}'\n" for k, v in self.settings.items())
        (self.root / "etc/meshd/bootstrap.env").write_text(body)

    def run(self):
        self.log.write_text("")
        env = {
            "PATH": f"{self.stubs}:/usr/bin:/bin:/usr/sbin:/sbin",
            "MESHD_BOOTSTRAP_ROOT": str(self.root),
            "MESHD_BOOTSTRAP_RETRY_DELAY": "0",
            "STUB_LOG": str(self.log),
            "STUB_BINARY": str(self.binary),
            "STUB_MODEL": str(self.model),
            "STUB_TOKEN": str(self.token),
        }
        proc = subprocess.run(["bash", str(BOOTSTRAP)], env=env, capture_output=True, text=True, timeout=60)
        self.out = proc.stdout + proc.stderr
        self.calls = self.log.read_text().splitlines()
        return proc.returncode

    def path(self, rel):
        return self.root / rel.lstrip("/")


@pytest.fixture
def infer(tmp_path):
    return Box(tmp_path, "infer")


def test_first_boot_installs_everything(infer):
    assert infer.run() == 0, infer.out
    b = infer.path("/usr/local/bin/meshd")
    assert b.read_bytes() == infer.binary.read_bytes()
    assert stat.S_IMODE(b.stat().st_mode) == 0o755
    t = infer.path("/etc/meshd/worker-token")
    assert t.read_text() == TOKEN, "token file holds exactly the value, no trailing newline"
    assert stat.S_IMODE(t.stat().st_mode) == 0o600 and t.stat().st_uid == 0
    assert infer.path("/etc/meshd/infer.env").read_text() == f"MESHD_GATEWAY_URL={GATEWAY_URL}\n"
    m = infer.path("/var/cache/meshd/models/model.gguf")
    assert m.read_bytes() == infer.model.read_bytes()
    assert not infer.path("/var/cache/meshd/models/model.gguf.part").exists()
    assert any(c.startswith("aws s3 cp") for c in infer.calls)
    assert f"meshd config check {infer.root}/etc/meshd/infer.toml" in infer.calls
    assert "systemctl daemon-reload" in infer.calls
    assert "systemctl enable meshd-infer.service" in infer.calls
    assert "systemctl --no-block restart meshd-infer.service" in infer.calls
    # The token never reaches a command line.
    assert TOKEN not in "\n".join(infer.calls) and TOKEN not in infer.out


def test_reboot_downloads_nothing_and_only_starts(infer):
    assert infer.run() == 0, infer.out
    assert infer.run() == 0, infer.out
    assert not any(c.startswith(("aws s3", "curl")) for c in infer.calls), infer.calls
    assert "model present, sha256 matches; not downloading" in infer.out
    assert "systemctl --no-block start meshd-infer.service" in infer.calls
    assert not any("restart" in c for c in infer.calls)


def test_token_rotation_rewrites_file_and_restarts(infer):
    assert infer.run() == 0, infer.out
    infer.token.write_text("second-token-abcdef")
    assert infer.run() == 0, infer.out
    assert infer.path("/etc/meshd/worker-token").read_text() == "second-token-abcdef"
    assert "systemctl --no-block restart meshd-infer.service" in infer.calls


def test_corrupted_model_is_downloaded_again(infer):
    assert infer.run() == 0, infer.out
    infer.path("/var/cache/meshd/models/model.gguf").write_bytes(b"truncated")
    assert infer.run() == 0, infer.out
    assert any(c.startswith("curl") for c in infer.calls)
    assert infer.path("/var/cache/meshd/models/model.gguf").read_bytes() == infer.model.read_bytes()
    assert "systemctl --no-block restart meshd-infer.service" in infer.calls


def test_model_with_wrong_sha_is_refused(infer):
    infer.settings["MESHD_MODEL_SHA256"] = "0" * 64
    infer.write_settings()
    assert infer.run() != 0
    assert "does not match sha256" in infer.out
    assert sum(c.startswith("curl") for c in infer.calls) == 6, "retried"
    assert not infer.path("/var/cache/meshd/models/model.gguf").exists()
    assert not infer.path("/var/cache/meshd/models/model.gguf.part").exists()
    assert not any(c.startswith("systemctl") for c in infer.calls), "no unit started without a model"


def test_binary_with_wrong_sha_is_refused(infer):
    infer.settings["MESHD_BINARY_SHA256"] = "f" * 64
    infer.write_settings()
    assert infer.run() != 0
    assert "does not match sha256" in infer.out and "refusing" in infer.out
    assert not infer.path("/usr/local/bin/meshd").exists()
    assert not list(infer.path("/usr/local/bin").glob(".meshd.*")), "temp file left behind"
    assert not any(c.startswith("systemctl") for c in infer.calls)


def test_binary_from_url(tmp_path):
    box = Box(tmp_path, "caller")
    box.settings["MESHD_BINARY_S3_URI"] = ""
    box.settings["MESHD_BINARY_URL"] = "https://example.invalid/releases/meshd"
    box.write_settings()
    assert box.run() == 0, box.out
    assert not any(c.startswith("aws s3") for c in box.calls)
    assert any(c.startswith("curl") and "releases/meshd" in c for c in box.calls)
    assert box.path("/usr/local/bin/meshd").read_bytes() == box.binary.read_bytes()
    assert box.path("/etc/meshd/caller.env").read_text() == f"MESHD_GATEWAY_URL={GATEWAY_URL}\n"
    assert not box.path("/var/cache/meshd").exists(), "only infer has a model cache"


def test_gateway_has_no_gateway_url_and_no_model(tmp_path):
    box = Box(tmp_path, "gateway")
    assert box.run() == 0, box.out
    assert box.path("/etc/meshd/gateway.env").read_text() == ""
    assert not any(c.startswith("curl") for c in box.calls)
    assert "systemctl enable meshd-gateway.service" in box.calls


def test_missing_settings_fail_loudly(tmp_path):
    box = Box(tmp_path, "caller")
    del box.settings["MESHD_TOKEN_PARAMETER"]
    box.write_settings()
    assert box.run() != 0
    assert "MESHD_TOKEN_PARAMETER" in box.out
