"""cloud-init/meshd-drain-watch.sh (systemd/meshd-drain-watch.service on the workers) against a stand-in instance
metadata service that speaks IMDSv2 only (a PUT for a session token, then GETs that must carry it; 401 otherwise) and
a stub systemctl: a spot interruption notice and each Auto Scaling lifecycle state that takes the instance away drain
the worker exactly once (`systemctl stop meshd-<role>.service`: SIGTERM, on which meshd drains), InService leaves it
alone, and an instance taken back into service (Standby -> InService) gets its worker started again."""
import http.server
import os
import subprocess
import threading
import time

import pytest

from deploylib import DRAIN_WATCH

STUB_SYSTEMCTL = """#!/bin/sh
echo "systemctl $*" >>"$STUB_LOG"
"""


class Imds(http.server.ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.token = "imds-session-token"
        self.values = {"autoscaling/target-lifecycle-state": "InService"}  # path -> body; absent: 404
        self.puts = []
        self.unauthorized = 0
        self.gets = 0


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, code, body=b""):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self._send(400)
        self.server.puts.append(self.headers["X-aws-ec2-metadata-token-ttl-seconds"])
        self._send(200, self.server.token.encode())

    def do_GET(self):
        self.server.gets += 1
        if self.headers.get("X-aws-ec2-metadata-token") != self.server.token:
            self.server.unauthorized += 1
            return self._send(401)
        prefix = "/latest/meta-data/"
        value = self.server.values.get(self.path[len(prefix):]) if self.path.startswith(prefix) else None
        if value is None:
            return self._send(404)
        self._send(200, value.encode())


@pytest.fixture
def watch(tmp_path):
    imds = Imds()
    threading.Thread(target=imds.serve_forever, daemon=True).start()
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "systemctl").write_text(STUB_SYSTEMCTL)
    (stubs / "systemctl").chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_LOG": str(log), "MESHD_ROLE": "infer",
           "MESHD_IMDS_URL": f"http://127.0.0.1:{imds.server_address[1]}", "MESHD_DRAIN_POLL_SECS": "0.1"}
    proc = subprocess.Popen(["bash", str(DRAIN_WATCH)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)

    class Watch:
        def calls(self):
            return log.read_text().splitlines()

        def until(self, want, timeout=10):
            deadline = time.time() + timeout
            while time.time() < deadline:
                if self.calls() == want:
                    return
                time.sleep(0.05)
            raise AssertionError(f"systemctl calls {self.calls()}, want {want}")

    w = Watch()
    w.imds = imds

    def settle(polls=3):
        """Until the watcher has polled `polls` more times (two GETs a poll), however slow the machine is."""
        want = imds.gets + 2 * polls
        deadline = time.time() + 30
        while imds.gets < want:
            assert time.time() < deadline, "the watcher stopped polling"
            time.sleep(0.05)

    w.settle = settle
    try:
        yield w
    finally:
        proc.kill()
        out = proc.communicate(timeout=5)[0]
        imds.shutdown()
        print(out)


def test_in_service_leaves_the_worker_alone(watch):
    watch.settle()
    assert watch.calls() == []
    assert watch.imds.puts and watch.imds.unauthorized == 0, "IMDSv2: a session token on every request"


def test_a_spot_interruption_notice_drains_once(watch):
    watch.settle()
    watch.imds.values["spot/instance-action"] = '{"action": "terminate", "time": "2030-01-01T00:02:00Z"}'
    watch.until(["systemctl stop meshd-infer.service"])
    watch.settle()
    assert watch.calls() == ["systemctl stop meshd-infer.service"], "once"


@pytest.mark.parametrize("state", ["Terminated", "Warmed:Stopped", "Detached"])
def test_the_group_taking_the_instance_away_drains_once(watch, state):
    watch.settle()
    watch.imds.values["autoscaling/target-lifecycle-state"] = state
    watch.until(["systemctl stop meshd-infer.service"])
    watch.settle()
    assert watch.calls() == ["systemctl stop meshd-infer.service"]


def test_back_in_service_after_standby_starts_the_worker_again(watch):
    watch.imds.values["autoscaling/target-lifecycle-state"] = "Standby"
    watch.until(["systemctl stop meshd-infer.service"])
    watch.imds.values["autoscaling/target-lifecycle-state"] = "InService"
    watch.until(["systemctl stop meshd-infer.service", "systemctl start meshd-infer.service"])
    # ... but never after a spot notice: that instance is going.
    watch.imds.values["spot/instance-action"] = '{"action": "stop"}'
    watch.until(["systemctl stop meshd-infer.service", "systemctl start meshd-infer.service",
                 "systemctl stop meshd-infer.service"])
    watch.settle()
    assert watch.calls()[-1] == "systemctl stop meshd-infer.service" and len(watch.calls()) == 3


def test_no_metadata_service_no_drain(watch):
    """An unreachable or token-less metadata service is not a reason to drain."""
    watch.settle()
    watch.imds.token = "rotated"  # the watcher's cached token no longer works: 401 until it renews (5 min)
    watch.settle()
    assert watch.imds.unauthorized > 0
    assert watch.calls() == []
