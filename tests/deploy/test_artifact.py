"""The binary Terraform ships to the VMs: target/dist/meshd, made by scripts/release from target/release/meshd.

It must be lean (stripped, <= 20 MiB; the release profile keeps line tables, so the unstripped one is ~140 MB), still
run, point debuggers at its symbols (.gnu_debuglink -> meshd.debug), and be the file whose sha256 the VMs check:
Terraform's default meshd_binary_path is target/dist/meshd, and local.binary_sha256 (what cloud-init hands the
bootstrap as MESHD_BINARY_SHA256) is evaluated here by the real Terraform, offline (`terraform console`).

The checks of the file itself skip when target/dist/meshd does not exist (run scripts/release; scripts/test does so
before the deployment checks). The static checks always run.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from deploylib import REPO, TF_DIR, require_terraform, terraform_console

DIST = REPO / "target" / "dist"
BINARY = DIST / "meshd"
DEBUG = DIST / "meshd.debug"
SHA256_FILE = DIST / "meshd.sha256"
MAX_BYTES = 20 * 1024 * 1024
SHF_ALLOC = 0x2

needs_dist = pytest.mark.skipif(
    not BINARY.is_file(),
    reason=f"{BINARY.relative_to(REPO)} does not exist: run scripts/release (scripts/test runs it before the "
           "deployment checks)",
)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def elf_sections(path: Path) -> dict[str, tuple[int, bytes | None]]:
    """{section name: (sh_flags, contents or None for SHT_NOBITS)} of a 64-bit little-endian ELF file."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF", f"{path} is not an ELF file"
    assert data[4] == 2 and data[5] == 1, f"{path}: expected ELFCLASS64, little-endian"
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    assert e_shoff and e_shnum and e_shentsize == 64, f"{path}: no usable section header table"

    def header(i):
        name, stype, flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, e_shoff + i * e_shentsize)
        return name, stype, flags, offset, size

    _, _, _, str_off, str_size = header(e_shstrndx)
    names = data[str_off:str_off + str_size]
    sections = {}
    for i in range(1, e_shnum):
        name_off, stype, flags, offset, size = header(i)
        name = names[name_off:names.index(b"\0", name_off)].decode()
        sections[name] = (flags, None if stype == 8 else data[offset:offset + size])  # 8: SHT_NOBITS
    return sections


# ---- the file scripts/release makes ----------------------------------------------------------------------------------


@needs_dist
def test_release_binary_is_lean():
    size = BINARY.stat().st_size
    assert size <= MAX_BYTES, f"{BINARY} is {size / 2**20:.1f} MiB, over 20 MiB: is it stripped? (scripts/release)"


@needs_dist
def test_release_binary_has_no_debug_sections_and_a_debuglink():
    sections = elf_sections(BINARY)
    assert ".debug_info" not in set(sections), f"{BINARY} still has .debug_info: run scripts/release"
    # .debug_gdb_scripts is an allocated (loaded) section of Rust binaries, not debug information.
    unstripped = sorted(n for n, (flags, _) in sections.items() if n.startswith(".debug_") and not flags & SHF_ALLOC)
    assert not unstripped, f"{BINARY} still has debug sections {unstripped}"
    assert ".gnu_debuglink" in sections, f"{BINARY} has no .gnu_debuglink: debuggers would not find meshd.debug"
    link = sections[".gnu_debuglink"][1]
    name = link[:link.index(b"\0")].decode()
    assert name == "meshd.debug", f".gnu_debuglink names {name!r}, not the meshd.debug next to it"
    if DEBUG.is_file():
        # gdb and lldb ignore a debug file whose CRC32 differs from the one the link records.
        crc_off = (len(name) + 1 + 3) & ~3
        crc, = struct.unpack_from("<I", link, crc_off)
        assert zlib.crc32(DEBUG.read_bytes()) == crc, f"{DEBUG} is not the debug file {BINARY} was linked to"
        assert ".debug_info" in elf_sections(DEBUG), f"{DEBUG} holds no .debug_info"


@needs_dist
def test_release_binary_runs():
    proc = subprocess.run([str(BINARY), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{BINARY} --version exited {proc.returncode}: {proc.stderr}"
    assert proc.stdout.startswith("meshd "), proc.stdout


@needs_dist
def test_release_sha256_file_matches_the_binary():
    assert SHA256_FILE.is_file(), f"{SHA256_FILE} is missing: run scripts/release"
    m = re.fullmatch(r"([0-9a-f]{64}) [ *]meshd\n", SHA256_FILE.read_text())
    assert m, f"{SHA256_FILE} is not one `sha256sum` line for meshd: {SHA256_FILE.read_text()!r}"
    assert m.group(1) == sha256_of(BINARY), f"{SHA256_FILE} does not match {BINARY}: run scripts/release again"


# ---- what Terraform uploads and what the VMs check, by the real Terraform (offline) ----------------------------------

ARTIFACT_LOCALS = ("use_binary_url", "binary_local_path", "binary_sha256")


def artifact_locals_text() -> str:
    """The lines of terraform/artifacts.tf that define ARTIFACT_LOCALS, verbatim (they read only variables and each
    other, so they evaluate without providers)."""
    text = (TF_DIR / "artifacts.tf").read_text()
    lines = {}
    for name in ARTIFACT_LOCALS:
        found = re.findall(rf"(?m)^\s*{name}\s*=.*$", text)
        assert len(found) == 1, f"expected one definition of local.{name} in artifacts.tf, found {found}"
        lines[name] = found[0].strip()
    body = "\n".join(lines.values())
    refs = set(re.findall(r"\blocal\.([A-Za-z0-9_]+)", body))
    assert refs <= set(ARTIFACT_LOCALS), f"the binary's locals now read other locals too: {refs}"
    return "locals {\n" + "\n".join(f"  {line}" for line in lines.values()) + "\n}\n"


@pytest.fixture(scope="module")
def tf_artifacts(tmp_path_factory):
    """(terraform, a scratch module laid out like the repository: <tmp>/terraform holds variables.tf and the binary's
    locals, and <tmp>/target links to the repository's target/), so `${path.module}/../target/dist/meshd` is read
    exactly as terraform/ reads it."""
    exe = require_terraform()
    root = tmp_path_factory.mktemp("tfartifacts")
    (root / "target").symlink_to(REPO / "target", target_is_directory=True)
    mod = root / "terraform"
    mod.mkdir()
    (mod / "variables.tf").write_text((TF_DIR / "variables.tf").read_text())
    (mod / "artifacts.tf").write_text(artifact_locals_text())
    return exe, mod


VALID = {"allowed_api_cidrs": ["203.0.113.7/32"]}


def console(tf_artifacts, expression, tf_vars=None):
    exe, mod = tf_artifacts
    out, err = terraform_console(exe, mod, expression, {**VALID, **(tf_vars or {})})
    assert err is None, f"{expression}: {err}\n{(mod / 'artifacts.tf').read_text()}"
    return json.loads(out)


@needs_dist
def test_terraform_default_uploads_target_dist_and_the_vms_expect_its_sha256(tf_artifacts):
    want = sha256_of(BINARY)
    _, mod = tf_artifacts
    path = console(tf_artifacts, "local.binary_local_path")
    assert (mod / path).resolve() == BINARY.resolve(), f"Terraform's default binary is {path}, not target/dist/meshd"
    # What cloud-init hands the bootstrap (MESHD_BINARY_SHA256), and what the upload's precondition compares.
    assert console(tf_artifacts, "local.binary_sha256") == want
    assert console(tf_artifacts, "filesha256(local.binary_local_path)") == want
    assert want == SHA256_FILE.read_text().split()[0], "Terraform would ship a binary meshd.sha256 does not describe"


@needs_dist
def test_terraform_with_the_published_sha256(tf_artifacts):
    """meshd_binary_sha256 set from target/dist/meshd.sha256 (e.g. the release notes): the upload's precondition
    holds, so the VMs get the binary that digest describes."""
    published = SHA256_FILE.read_text().split()[0]
    tf_vars = {"meshd_binary_sha256": published, "meshd_binary_path": str(BINARY)}
    assert console(tf_artifacts, "local.binary_sha256", tf_vars) == published
    assert console(tf_artifacts, "filesha256(local.binary_local_path) == local.binary_sha256", tf_vars) is True


# ---- static: Terraform, its variable's description and scripts/release agree on target/dist/meshd --------------------


def test_terraform_default_binary_path_is_target_dist(tf):
    assert tf.locals["binary_local_path"] == \
        '${var.meshd_binary_path != "" ? var.meshd_binary_path : "${path.module}/../target/dist/meshd"}'
    assert "target/release/meshd" not in tf.locals["binary_local_path"]
    desc = tf.variables["meshd_binary_path"]["description"]
    assert "target/dist/meshd" in desc and "scripts/release" in desc, desc
    assert "target/release/meshd" not in desc, desc


def test_release_script_makes_what_terraform_uploads():
    script = (REPO / "scripts" / "release").read_text()
    assert re.search(r"(?m)^SRC=target/release/meshd$", script)
    assert re.search(r"(?m)^DIST=target/dist$", script)
    assert "--add-gnu-debuglink" in script and "--only-keep-debug" in script
    assert "cargo build --release --locked" in script
