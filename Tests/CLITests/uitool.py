#!/usr/bin/env python3
"""Raw HTTP requests for the `cabackup ui` tests, with the headers a browser (or an attacker's
page) would send set freely: Host, Origin, Cookie, X-CABackup-UI. Prints the status on the
first line, the response headers as one JSON object on the second, then the body (or writes
the body to --out).

  uitool.py METHOD URL [--cookie C] [--host H] [--origin O] [--ui] [--data JSON] [--out FILE]
            [--pause-after BYTES --pause-seconds S]

--pause-after stops reading the body for S seconds once BYTES of it are in --out (flushed),
as a slow client would: the server must then hold the rest without buffering it.
"""
import time
import argparse
import http.client
import json
import sys
import urllib.parse

p = argparse.ArgumentParser()
p.add_argument("method")
p.add_argument("url")
p.add_argument("--cookie")
p.add_argument("--host")
p.add_argument("--origin")
p.add_argument("--ui", action="store_true", help="send X-CABackup-UI: 1")
p.add_argument("--data")
p.add_argument("--out")
p.add_argument("--pause-after", type=int)
p.add_argument("--pause-seconds", type=float, default=0)
a = p.parse_args()
u = urllib.parse.urlsplit(a.url)
conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
path = u.path + ("?" + u.query if u.query else "")
conn.putrequest(a.method, path, skip_host=True, skip_accept_encoding=True)
conn.putheader("Host", a.host if a.host is not None else u.netloc)
if a.cookie:
    conn.putheader("Cookie", "cabackup_ui=" + a.cookie)
if a.origin:
    conn.putheader("Origin", a.origin)
if a.ui:
    conn.putheader("X-CABackup-UI", "1")
body = a.data.encode() if a.data is not None else None
if body is not None:
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(len(body)))
conn.endheaders(body)
r = conn.getresponse()
headers = {}
for k, v in r.getheaders():
    headers[k.lower()] = (headers[k.lower()] + ", " + v) if k.lower() in headers else v
sys.stdout.write("%d\n%s\n" % (r.status, json.dumps(headers)))
if a.out:
    with open(a.out, "wb") as f:
        got = 0
        paused = False
        while True:
            piece = r.read(65536)
            if not piece:
                break
            f.write(piece)
            got += len(piece)
            if a.pause_after is not None and not paused and got >= a.pause_after:
                f.flush()
                paused = True
                time.sleep(a.pause_seconds)
else:
    sys.stdout.write(r.read().decode("utf-8", "replace"))
