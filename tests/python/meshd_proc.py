"""`meshd up` as a child process for the Python tests: the real binary and the offline model."""

import contextlib
import os
import pathlib
import subprocess
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("MESHD_BIN", str(ROOT / "target" / "release" / "meshd"))
MODEL = ROOT / "models" / "gemma3-270m-q4_k_m.gguf"


@contextlib.contextmanager
def up(*args, api_key=None):
    """Starts `meshd up ARGS` on a free loopback port; yields `host:port` once /readyz is 200."""
    assert pathlib.Path(BIN).exists(), f"{BIN} is missing: cargo build --release first"
    assert MODEL.exists(), "run scripts/fetch-model first"
    data = tempfile.TemporaryDirectory()
    cmd = [BIN, "up", "--http-addr", "127.0.0.1:0", "--data-dir", str(pathlib.Path(data.name) / "data"),
           "--model", str(MODEL), *args]
    if api_key is not None:
        keys = pathlib.Path(data.name) / "api-keys"
        keys.write_text(api_key + "\n")
        cmd += ["--api-keys-file", str(keys)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("meshd listening"), line
        http = line.split("http=")[1].split()[0]
        deadline = time.time() + 60
        while True:
            try:
                if urllib.request.urlopen(f"http://{http}/readyz", timeout=2).status == 200:
                    break
            except Exception:
                pass
            assert time.time() < deadline, "meshd up never became ready"
            time.sleep(0.05)
        yield http
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        data.cleanup()
