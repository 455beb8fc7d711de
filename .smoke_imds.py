import os, sys, time, subprocess, json
sys.path.insert(0, "/work/main/tests")
from harness import make_host, run, ACCOUNT
h = make_host()
try:
    h.install_commands(); h.start_moto()
    h.add_user("alice"); h.add_user("bob")
    h.write_config(f"""
version: 1
region: us-east-1
imds: {{mode: emulate, port: 9254}}
roles:
  - match: {{user: alice}}
    role: arn:aws:iam::{ACCOUNT}:role/alice-role
""")
    h.start_broker()
    code = """
import boto3, os, time
t=time.monotonic()
try:
    print(boto3.client('sts', region_name='us-east-1').get_caller_identity()['Arn'], round(time.monotonic()-t,2))
except Exception as e:
    print('ERR', type(e).__name__, e)
"""
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9254", "AWS_ENDPOINT_URL_STS": h.moto.url, "HOME": "/tmp", "PATH": "/usr/bin:/bin"}
    for user in ("alice", "bob"):
        d = run(["setpriv", "--reuid", user, "--regid", user, "--init-groups", "env", "-i"] + [f"{k}={v}" for k, v in env.items()] + [sys.executable, "-c", code], check=False)
        print(user, d.stdout.strip(), d.stderr.strip()[-400:])
    import urllib.request
    for path in ("/latest/meta-data/instance-id", "/latest/user-data", "/latest/meta-data/iam/security-credentials/"):
        req = urllib.request.Request("http://127.0.0.1:9254/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        tok = urllib.request.urlopen(req).read().decode()
        try:
            r = urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:9254" + path, headers={"X-aws-ec2-metadata-token": tok}))
            print("root", path, r.status, r.read()[:60])
        except Exception as e:
            print("root", path, e)
    print(h.broker_log()[-1500:])
finally:
    h.stop()
