"""`meshd up` as a child process for the Python tests: the real binary and the offline model;
llama.cpp's llama-server (built by scripts/llama-server) as an upstream engine; and redis-server
(scripts/deps --test installs it) as the state backend."""

import contextlib
import os
import pathlib
import socket
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


@contextlib.contextmanager
def llama_server(*args):
    """Starts llama-server on the offline model and a free loopback port, with the Gemma
    template and `ARGS`; yields its base URL once /health is 200."""
    found = subprocess.run([str(ROOT / "scripts" / "llama-server"), "--path"], capture_output=True, text=True)
    assert found.returncode == 0, "llama-server is not built: run scripts/llama-server (scripts/test does)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [found.stdout.strip(), "-m", str(MODEL), "--host", "127.0.0.1", "--port", str(port),
           "--chat-template", "gemma", "--no-jinja", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except Exception:
                pass
            assert proc.poll() is None, "llama-server exited"
            assert time.time() < deadline, "llama-server never became healthy"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def redis_server():
    """Starts redis-server on a free loopback port (AOF, `appendfsync always`, its own directory);
    yields its `redis://` URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tempfile.TemporaryDirectory()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "yes", "--appendfsync", "always", "--dir", data.name],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, "redis-server exited"
                assert time.time() < deadline, "redis-server never listened"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        data.cleanup()
