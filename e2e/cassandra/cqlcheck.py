#!/usr/bin/env python3
"""Readiness probe for e2e/cassandra/cassandra.sh, using only the standard library.

Does a real CQL (native protocol v4) handshake against HOST:PORT: STARTUP, then the
SASL PLAIN login if the server asks for one, then `SELECT release_version FROM system.local`.
Prints the release version and exits 0 when all of that works; exits 1 with the reason on
stderr otherwise. The caller polls it until it succeeds.

  cqlcheck.py HOST PORT [--user U --password P] [--ca CA.crt] [--timeout SECS]
"""
import argparse
import socket
import ssl
import struct
import sys

OP_ERROR, OP_STARTUP, OP_READY, OP_AUTHENTICATE = 0x00, 0x01, 0x02, 0x03
OP_QUERY, OP_RESULT, OP_AUTH_RESPONSE, OP_AUTH_SUCCESS = 0x07, 0x08, 0x0F, 0x10
VERSION = 0x04


class CqlError(Exception):
    pass


def string(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def long_string(s):
    b = s.encode()
    return struct.pack(">i", len(b)) + b


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise CqlError("connection closed by server")
        buf += chunk
    return buf


def request(sock, opcode, body, stream=1):
    sock.sendall(struct.pack(">BBhBi", VERSION, 0, stream, opcode, len(body)) + body)
    version, _flags, _stream, op, length = struct.unpack(">BBhBi", recv_exact(sock, 9))
    payload = recv_exact(sock, length)
    if op == OP_ERROR:
        code = struct.unpack(">i", payload[:4])[0]
        (mlen,) = struct.unpack(">H", payload[4:6])
        raise CqlError("server error 0x%04x: %s" % (code, payload[6 : 6 + mlen].decode(errors="replace")))
    return op, payload


def read_string(buf, pos):
    (n,) = struct.unpack(">H", buf[pos : pos + 2])
    return buf[pos + 2 : pos + 2 + n].decode(), pos + 2 + n


def first_text_value(payload):
    """The first column of the first row of a RESULT/Rows body, decoded as text."""
    kind, flags, ncols = struct.unpack(">iii", payload[:12])
    if kind != 2:
        raise CqlError("expected a Rows result, got kind %d" % kind)
    pos = 12
    if flags & 0x0002:  # has_more_pages: paging state
        (n,) = struct.unpack(">i", payload[pos : pos + 4])
        pos += 4 + max(n, 0)
    if not flags & 0x0004:  # metadata present
        if flags & 0x0001:  # global table spec
            _, pos = read_string(payload, pos)
            _, pos = read_string(payload, pos)
        for _ in range(ncols):
            if not flags & 0x0001:
                _, pos = read_string(payload, pos)
                _, pos = read_string(payload, pos)
            _, pos = read_string(payload, pos)
            (type_id,) = struct.unpack(">H", payload[pos : pos + 2])
            pos += 2
            if type_id != 0x000D:
                raise CqlError("unexpected column type 0x%04x" % type_id)
    (nrows,) = struct.unpack(">i", payload[pos : pos + 4])
    pos += 4
    if nrows < 1:
        raise CqlError("system.local returned no row")
    (n,) = struct.unpack(">i", payload[pos : pos + 4])
    return payload[pos + 4 : pos + 4 + n].decode()


def check(args):
    sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    try:
        if args.ca:
            ctx = ssl.create_default_context(cafile=args.ca)
            sock = ctx.wrap_socket(sock, server_hostname=args.host)
        body = struct.pack(">H", 1) + string("CQL_VERSION") + string("3.0.0")
        op, payload = request(sock, OP_STARTUP, body)
        if op == OP_AUTHENTICATE:
            if args.user is None:
                raise CqlError("server wants authentication (%s) but no --user given" % read_string(payload, 0)[0])
            token = b"\0" + args.user.encode() + b"\0" + args.password.encode()
            op, payload = request(sock, OP_AUTH_RESPONSE, struct.pack(">i", len(token)) + token)
            if op != OP_AUTH_SUCCESS:
                raise CqlError("unexpected opcode 0x%02x after AUTH_RESPONSE" % op)
        elif op != OP_READY:
            raise CqlError("unexpected opcode 0x%02x after STARTUP" % op)
        # consistency ONE, no flags
        body = long_string("SELECT release_version FROM system.local") + struct.pack(">HB", 0x0001, 0)
        op, payload = request(sock, OP_QUERY, body, stream=2)
        if op != OP_RESULT:
            raise CqlError("unexpected opcode 0x%02x after QUERY" % op)
        return first_text_value(payload)
    finally:
        sock.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--user")
    p.add_argument("--password", default="")
    p.add_argument("--ca")
    p.add_argument("--timeout", type=float, default=5.0)
    args = p.parse_args()
    try:
        print(check(args))
    except (OSError, CqlError, struct.error) as e:
        print("cqlcheck: %s:%d: %s" % (args.host, args.port, e), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
