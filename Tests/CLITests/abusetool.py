#!/usr/bin/env python3
"""What an abusive client does to a server, for the abuse tests. Every loop is bounded in
count and time and stops by itself; every socket goes to 127.0.0.0/8 only.

  abusetool.py stall HOST PORT COUNT SECONDS
      opens COUNT connections that send half a request header and then nothing; prints
      "stalled COUNT" once they are open, holds them SECONDS, then prints "closed N": how
      many the server had closed by then.
  abusetool.py stallupload HOST PORT TOKEN PATH SECONDS
      PUTs PATH saying Content-Length 1 MiB, sends 64 KiB of it and then nothing; prints
      "sent" once it has, then "closed" or "open" after at most SECONDS: whether the
      server closed the connection.
  abusetool.py noread HOST PORT TOKEN PATH COUNT SECONDS
      COUNT connections each GET PATH and never read the answer; prints "sent COUNT",
      holds them SECONDS.
  abusetool.py chunked HOST PORT TOKEN PATH
      PUTs a body without Content-Length (chunked); prints the status.
  abusetool.py parallel HOST PORT TOKEN PATH FILE [FILE...]
      PUTs each FILE to PATH at the same moment, one connection each; prints each status
      on its own line, in the order of the files.
  abusetool.py slowput HOST PORT TOKEN PATH FILE SECONDS
      PUTs FILE to PATH in 16 pieces spread over SECONDS; prints "sent" after the first
      piece, then the answer's status (or "reset" when the connection was dropped).
  abusetool.py login HOST PORT SOURCE USER SECRET COUNT [FORWARDED_FOR]
      COUNT logins from the address SOURCE (any 127.x.y.z), with X-Forwarded-For when
      given; prints "STATUS MESSAGE" each.
  abusetool.py register HOST PORT SOURCE USER SECRET
      one registration from SOURCE; prints "STATUS MESSAGE".
"""
import http.client
import json
import resource
import socket
import sys
import threading
import time


def raise_descriptor_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def stall(host, port, count, seconds):
    raise_descriptor_limit()
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.settimeout(10)
        s.connect((host, port))
        s.sendall(b"POST /v1/login HTTP/1.1\r\nHost: x\r\nContent-Le")
        s.setblocking(False)
        socks.append(s)
    print("stalled %d" % count, flush=True)
    deadline = time.time() + seconds
    closed = set()
    while time.time() < deadline and len(closed) < count:
        for i, s in enumerate(socks):
            if i in closed:
                continue
            try:
                if s.recv(4096) == b"":
                    closed.add(i)
            except BlockingIOError:
                pass
            except OSError:
                closed.add(i)
        time.sleep(0.2)
    print("closed %d" % len(closed), flush=True)
    for s in socks:
        s.close()


def stallupload(host, port, token, path, seconds):
    s = socket.socket()
    s.connect((host, port))
    s.sendall(("PUT %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n"
               % (path, token, 1 << 20)).encode())
    s.sendall(b"\0" * (64 << 10))
    print("sent", flush=True)
    s.settimeout(seconds)
    try:
        while s.recv(4096):
            pass
        print("closed", flush=True)
    except socket.timeout:
        print("open", flush=True)
    except OSError:
        print("closed", flush=True)
    s.close()


def noread(host, port, token, path, count, seconds):
    raise_descriptor_limit()
    socks = []
    for _ in range(count):
        s = socket.socket()
        # A tiny receive buffer, so the kernel holds little of the answer for us.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((host, port))
        s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n" % (path, token)).encode())
        socks.append(s)
    print("sent %d" % count, flush=True)
    time.sleep(seconds)
    for s in socks:
        s.close()


def chunked(host, port, token, path):
    c = http.client.HTTPConnection(host, port, timeout=30)
    c.putrequest("PUT", path)
    c.putheader("Authorization", "Bearer " + token)
    c.putheader("Transfer-Encoding", "chunked")
    c.endheaders()
    c.send(b"10\r\n0123456789abcdef\r\n0\r\n\r\n")
    r = c.getresponse()
    print(r.status, r.read().decode("utf-8", "replace"))


def parallel(host, port, token, path, files):
    bodies = [open(f, "rb").read() for f in files]
    conns = [http.client.HTTPConnection(host, port, timeout=60) for _ in bodies]
    results = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def put(i):
        c = conns[i]
        c.connect()
        start.wait()
        c.request("PUT", path, body=bodies[i], headers={"Authorization": "Bearer " + token})
        results[i] = c.getresponse().status

    threads = [threading.Thread(target=put, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for r in results:
        print(r)


def slowput(host, port, token, path, file, seconds):
    body = open(file, "rb").read()
    c = http.client.HTTPConnection(host, port, timeout=60)
    c.putrequest("PUT", path)
    c.putheader("Authorization", "Bearer " + token)
    c.putheader("Content-Length", str(len(body)))
    c.endheaders()
    step = (len(body) + 15) // 16
    try:
        for i in range(0, len(body), step):
            c.send(body[i:i + step])
            if i == 0:
                print("sent", flush=True)
            time.sleep(seconds / 16)
        print(c.getresponse().status, flush=True)
    except (OSError, http.client.HTTPException):
        print("reset", flush=True)


def post_from(host, port, source, path, body, forwarded_for=None):
    c = http.client.HTTPConnection(host, port, timeout=60, source_address=(source, 0))
    headers = {"Content-Type": "application/json"}
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    c.request("POST", path, body=json.dumps(body), headers=headers)
    r = c.getresponse()
    data = r.read().decode("utf-8", "replace")
    try:
        message = json.loads(data).get("error", "")
    except ValueError:
        message = data
    return r.status, message


def main():
    cmd, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    a = sys.argv[4:]
    if cmd == "stall":
        stall(host, port, int(a[0]), float(a[1]))
    elif cmd == "stallupload":
        stallupload(host, port, a[0], a[1], float(a[2]))
    elif cmd == "noread":
        noread(host, port, a[0], a[1], int(a[2]), float(a[3]))
    elif cmd == "chunked":
        chunked(host, port, a[0], a[1])
    elif cmd == "parallel":
        parallel(host, port, a[0], a[1], a[2:])
    elif cmd == "slowput":
        slowput(host, port, a[0], a[1], a[2], float(a[3]))
    elif cmd == "login":
        body = {"user": a[1], "secret": a[2], "device": "x"}
        for _ in range(int(a[3])):
            print("%d %s" % post_from(host, port, a[0], "/v1/login", body, a[4] if len(a) > 4 else None))
    elif cmd == "register":
        body = {"user": a[1], "email": a[1] + "@example.org", "secret": a[2]}
        print("%d %s" % post_from(host, port, a[0], "/v1/register", body))


main()
