#!/usr/bin/env python3
"""A hostile server for the security tests: a proxy on 127.0.0.1 in front of a real
`cabackup server` that forwards every request unchanged, except the ones its rules file
names, which it answers itself. The rules file is read on every request, so a test can
turn the hostility on after a device has used the space honestly.

  hostileproxy.py UPSTREAM_URL RULES_FILE      (prints "listening on http://127.0.0.1:PORT")

RULES_FILE is JSON: {"GET /v1/space/config": RULE, ...} (the query string is ignored),
where RULE is one of
  {"file": PATH}                 answer 200 with the bytes of PATH
  {"body": TEXT}                 answer 200 with TEXT
  {"junk": N}                    answer 200 with N bytes of junk, streamed, with its length
  {"status": CODE, "body": TEXT} answer CODE with TEXT
Every request line is appended to RULES_FILE + ".log", so a test can see what reached it;
for POST /v1/login and /v1/register the JSON body follows on the same line, as a hostile
server would capture it.
"""
import http.client
import json
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

upstream = urllib.parse.urlsplit(sys.argv[1])
rules_path = sys.argv[2]
log_lock = threading.Lock()


def rules():
    try:
        with open(rules_path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def handle_any(self):
        path = self.path.split("?", 1)[0]
        key = "%s %s" % (self.command, path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        line = key
        if path in ("/v1/login", "/v1/register") and body:
            line += " " + body.decode("utf-8", "replace").replace("\n", " ")
        with log_lock, open(rules_path + ".log", "a") as log:
            log.write(line + "\n")
        rule = rules().get(key)
        if rule is not None:
            return self.answer(rule)
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(self.command, self.path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    def answer(self, rule):
        status = rule.get("status", 200)
        if "junk" in rule:
            n = int(rule["junk"])
            self.send_response(status)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            block = b"{" * (1 << 20)
            try:
                while n > 0:
                    k = min(n, len(block))
                    self.wfile.write(block[:k])
                    n -= k
            except OSError:
                pass  # the client gave up reading: what it should do
            return
        if "file" in rule:
            with open(rule["file"], "rb") as f:
                data = f.read()
        else:
            data = rule.get("body", "").encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print("listening on http://127.0.0.1:%d" % server.server_address[1], flush=True)
server.serve_forever()
