"""Shared fixtures: a real moto server (the AWS stand-in) and the sandbox guard for host-changing tests."""

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port(host="127.0.0.1", privileged=False):
    """A TCP port nothing listens on now. privileged: one below 1024 (the tests run as root), for
    stand-ins named in sts_endpoint/ssm_endpoint, which accept plain http only on such ports."""
    if not privileged:
        with socket.socket() as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in random.sample(range(600, 1000), 400):  # clear of the broker's 254/255 and well-known ports
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below 1024 on {host}")


def in_sandbox():
    """True inside scripts/sandbox: /etc and /run are private mounts of this namespace."""
    return os.environ.get("ROLEGATE_SANDBOX") == "1" and os.path.ismount("/etc") and os.getuid() == 0


def require_sandbox():
    """Tests that add users, start sshd or touch /etc run only inside scripts/sandbox."""
    if not in_sandbox():
        if os.environ.get("CI"):
            pytest.fail("CI must run the suite through scripts/test (the sandbox); it was not")
        pytest.skip("needs root inside the sandbox: run `sudo scripts/test`")


@dataclass
class Moto:
    url: str
    proc: subprocess.Popen

    def env(self):
        """The standard variables that point every AWS client (and rolegate) at this server."""
        return {"AWS_ENDPOINT_URL_STS": self.url, "AWS_ENDPOINT_URL": self.url,
                "AWS_EC2_METADATA_SERVICE_ENDPOINT": self.url}

    def assume_role_calls(self):
        """How many AssumeRole calls the server has answered (its own record, not ours)."""
        with urllib.request.urlopen(self.url + "/moto-api/data.json", timeout=5) as resp:
            data = json.load(resp)
        return len(data.get("sts", {}).get("AssumedRole", []))

    def reset(self):
        req = urllib.request.Request(self.url + "/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=5).close()

    def record(self):
        """Start keeping every request the server gets (moto's recorder), from now on."""
        for action in ("reset-recording", "start-recording"):
            req = urllib.request.Request(f"{self.url}/moto-api/recorder/{action}", method="POST")
            urllib.request.urlopen(req, timeout=5).close()

    def assume_role_requests(self):
        """The AssumeRole requests the server got since record(), as their query parameters (what
        reached the stand-in, not what rolegate says it sent)."""
        import urllib.parse

        with urllib.request.urlopen(self.url + "/moto-api/recorder/download-recording", timeout=5) as resp:
            lines = resp.read().decode().splitlines()
        found = []
        for line in lines:
            import base64

            entry = json.loads(line)
            body = entry.get("body") or ""
            if entry.get("body_encoded"):
                body = base64.b64decode(body).decode("utf-8")
            params = dict(urllib.parse.parse_qsl(body, keep_blank_values=True))
            if params.get("Action") == "AssumeRole":
                found.append(params)
        return found


def start_moto(host="127.0.0.1", port=None):
    # A privileged port: tests name the stand-in in sts_endpoint/ssm_endpoint too (see free_port).
    port = port or free_port(host, privileged=True)
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    assert exe, "moto_server is not installed in the test environment (pip install 'moto[server]')"
    # record() keeps requests here (the sandbox's private /tmp), never in the working tree.
    env = dict(os.environ, MOTO_RECORDER_FILEPATH=os.path.join(tempfile.gettempdir(), f"moto-recording-{port}"))
    proc = subprocess.Popen([exe, "-H", host, "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/moto-api/data.json", timeout=1).close()
            return Moto(url, proc)
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {proc.returncode} before answering")
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not answer within 30 s")


@pytest.fixture(scope="session")
def moto_server():
    server = start_moto()
    yield server
    server.proc.terminate()
    server.proc.wait(10)


@pytest.fixture
def moto(moto_server, monkeypatch):
    """A clean moto server, and this process's AWS variables pointed at it (and nowhere real)."""
    moto_server.reset()
    for key, value in moto_server.env().items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    return moto_server


@pytest.fixture
def write_config(tmp_path):
    """Write a config file from text and return its path."""
    def write(text, name="rolegate.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return str(path)
    return write
