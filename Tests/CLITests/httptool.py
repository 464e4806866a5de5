#!/usr/bin/env python3
"""Raw HTTP requests for the server tests, so they can send what no cabackup client
would: another user's token, forged tokens, malformed JSON, truncated or mislabelled
packs. Prints the status on the first line and the body after it.

  httptool.py METHOD URL [--token T] [--data-file F | --data STRING] [--header K:V]... [--cacert F]
"""
import argparse
import ssl
import sys
import urllib.error
import urllib.request

p = argparse.ArgumentParser()
p.add_argument("method")
p.add_argument("url")
p.add_argument("--token")
p.add_argument("--data")
p.add_argument("--data-file")
p.add_argument("--header", action="append", default=[])
p.add_argument("--cacert")
a = p.parse_args()
body = None
if a.data is not None:
    body = a.data.encode()
elif a.data_file:
    body = open(a.data_file, "rb").read()
req = urllib.request.Request(a.url, data=body, method=a.method)
if a.token:
    req.add_header("Authorization", "Bearer " + a.token)
for h in a.header:
    k, v = h.split(":", 1)
    req.add_header(k, v)
ctx = ssl.create_default_context(cafile=a.cacert) if a.cacert else None
try:
    with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
        status, data = r.status, r.read()
except urllib.error.HTTPError as e:
    status, data = e.code, e.read()
sys.stdout.write("%d\n" % status)
sys.stdout.write(data.decode("utf-8", "replace"))
