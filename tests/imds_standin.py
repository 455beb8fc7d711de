"""A stand-in for the broker's IMDS emulator in the firewall and doctor tests: an HTTP server that
answers every request 404 with a marker header and body, so a test can tell it from moto (the real
IMDS there). It proves only that traffic arrives; the emulator's own behaviour is tested elsewhere."""

import subprocess
import sys
import time

MARKER = "rolegate-test-stand-in"

SERVER = """
import http.server, socket, sys, threading
marker = sys.argv[1]

class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self):
        body = (self.server.label + "\\n").encode()
        self.send_response(404)
        self.send_header("X-Stand-In", self.server.label)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_PUT = do_POST = answer
    def log_message(self, *a):
        pass

class V6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6

servers = []
for spec in sys.argv[2:]:  # host,port,label
    host, port, label = spec.rsplit(",", 2)
    cls = V6 if ":" in host else http.server.ThreadingHTTPServer
    srv = cls((host, int(port)), Handler)
    srv.label = label
    servers.append(srv)
for srv in servers[1:]:
    threading.Thread(target=srv.serve_forever, daemon=True).start()
print("ready", flush=True)
servers[0].serve_forever()
"""

# One HTTP request from inside the namespace; prints what answered, or how it failed and how fast.
PROBE = """
import http.client, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
start = time.monotonic()
try:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.request("PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    resp = conn.getresponse()
    print("HTTP %d %s %.2f" % (resp.status, resp.getheader("X-Stand-In") or "real-imds", time.monotonic() - start))
except OSError as err:
    print("FAILED %s %.2f %s" % (type(err).__name__, time.monotonic() - start, err))
"""


def start(ns, binds, user=None):
    """Serve binds [(host, port, label)] inside the namespace (as root, or as `user`); wait until
    every one answers."""
    cmd = list(ns) + (["setpriv", "--reuid", user, "--regid", user, "--init-groups"] if user else [])
    proc = subprocess.Popen(cmd + [sys.executable, "-c", SERVER, MARKER] + [f"{h},{p},{lab}" for h, p, lab in binds],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "ready" not in line:
        proc.kill()
        raise AssertionError(f"the IMDS stand-in did not start: {line!r} {proc.stderr.read()}")
    return proc


def stop(proc):
    proc.terminate()
    proc.wait(10)
    # the ports are free again once nothing listens; bound the wait for the kernel to let go
    time.sleep(0.1)


def probe(ns, user, host, port=80, timeout=5.0):
    """One PUT /latest/api/token as `user` ("root" for root); returns (kind, detail, seconds):
    ("HTTP", label-or-"real-imds", s) or ("FAILED", exception name, s)."""
    from harness import run

    cmd = list(ns) + ([] if user == "root" else ["setpriv", "--reuid", user, "--regid", user, "--init-groups"])
    out = run(cmd + [sys.executable, "-c", PROBE, host, str(port), str(timeout)], check=False,
              timeout=timeout + 30).stdout.split()
    assert len(out) >= 3, f"the probe printed nothing usable: {out}"
    if out[0] == "HTTP":
        return "HTTP", out[2], float(out[3])
    return "FAILED", out[1], float(out[2])

