#!/usr/bin/env python3
"""A hostile server for the security tests: a proxy on 127.0.0.1 in front of a real
`cabackup server` that forwards every request unchanged, except the ones its rules file
names, which it answers itself. The rules file is read on every request, so a test can
turn the hostility on after a device has used the space honestly.

  hostileproxy.py UPSTREAM_URL RULES_FILE      (prints "listening on http://127.0.0.1:PORT")

RULES_FILE is JSON: {"GET /v1/space/config": RULE, ...} (the query string is ignored; a
key ending in "*" matches every path that starts with the rest, the longest such key
first), where RULE is one of
  {"file": PATH}                 answer 200 with the bytes of PATH
  {"body": TEXT}                 answer 200 with TEXT
  {"junk": N}                    answer 200 with N bytes of junk, streamed, with its length
  {"status": CODE, "body": TEXT} answer CODE with TEXT
and may add "times": N to answer only the first N matching requests and forward the rest
(a store that fails a few times and recovers). Rules for a flaky link instead of an answer:
  {"cut": "upload"}              read half of the request body, then drop the connection
  {"cut": "download"}            forward, send the headers and half of the body, then drop
  {"outage": SECONDS}            from this request on, drop every request (and every new
                                 connection's first request) for SECONDS, as a dead link
A dropped connection is reset (RST), as a broken link or a crashed middlebox would. Requests are forwarded with their own Host
header, so signed requests (S3's SigV4) stay valid.
Every request line is appended to RULES_FILE + ".log", so a test can see what reached it;
for POST /v1/login and /v1/register the JSON body follows on the same line, as a hostile
server would capture it.
"""
import http.client
import json
import socket
import struct
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

upstream = urllib.parse.urlsplit(sys.argv[1])
rules_path = sys.argv[2]
log_lock = threading.Lock()
answered = {}  # rule key and rule -> how many requests it answered (for "times")
outage_until = 0.0  # monotonic time until which every request is dropped


def matching_rule(key):
    """The rule for "METHOD PATH" and its key: exact, else the longest matching "*" key."""
    all_rules = rules()
    if key in all_rules:
        return key, all_rules[key]
    prefixes = [k for k in all_rules if k.endswith("*") and key.startswith(k[:-1])]
    if not prefixes:
        return None, None
    k = max(prefixes, key=len)
    return k, all_rules[k]


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

    def drop(self):
        """Resets the connection without an answer."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def handle_any(self):
        global outage_until
        path = self.path.split("?", 1)[0]
        key = "%s %s" % (self.command, path)
        length = int(self.headers.get("Content-Length") or 0)
        rule_key, rule = matching_rule(key)
        if rule is not None:
            # Counted per rule, so a new rule for the same key starts from zero.
            counter = rule_key + " " + json.dumps(rule, sort_keys=True)
            with log_lock:
                n = answered.get(counter, 0)
                use = "times" not in rule or n < int(rule["times"])
                if use:
                    answered[counter] = n + 1
            if not use:
                rule = None
        if rule is not None and "outage" in rule:
            with log_lock:
                outage_until = max(outage_until, time.monotonic() + float(rule["outage"]))
            rule = None
        if time.monotonic() < outage_until:
            with log_lock, open(rules_path + ".log", "a") as log:
                log.write(key + " (dropped: outage)\n")
            return self.drop()
        if rule is not None and rule.get("cut") == "upload":
            self.rfile.read(length // 2)
            with log_lock, open(rules_path + ".log", "a") as log:
                log.write(key + " (cut mid-upload)\n")
            return self.drop()
        body = self.rfile.read(length) if length else None
        line = key
        if path in ("/v1/login", "/v1/register") and body:
            line += " " + body.decode("utf-8", "replace").replace("\n", " ")
        if rule is not None and rule.get("cut") == "download":
            line += " (cut mid-download)"
        with log_lock, open(rules_path + ".log", "a") as log:
            log.write(line + "\n")
        if rule is not None and "cut" not in rule:
            return self.answer(rule)
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        conn.request(self.command, self.path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(k, v)
        # A HEAD answer has no body: its length is the upstream's.
        length = r.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if rule is not None and rule.get("cut") == "download":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            conn.close()
            return self.drop()
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
