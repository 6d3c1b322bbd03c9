#!/usr/bin/env python3
"""Opens a TLS session through mailtls with a chosen SNI and prints what the backend
answers inside it: the greeting, then the reply to EHLO.

    sni.py PORT implicit|starttls SNI SOURCE_IP

The SNI is the point (a long one makes mailtls's PROXY v2 header long), so the certificate
is not checked: mailtls answers an SNI it has no certificate for with its default one.
The client socket is bound to SOURCE_IP so the backend's log can show that address.
"""
import socket
import ssl
import sys

port, mode, sni, source = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
raw = socket.create_connection(("127.0.0.1", int(port)), timeout=60, source_address=(source, 0))
lines = raw.makefile("rb")


def reply(f):
    out = b""
    while True:
        line = f.readline()
        out += line
        if len(line) < 4 or line[3:4] != b"-":
            return out.decode("latin-1")


if mode == "starttls":
    reply(lines)
    raw.sendall(b"EHLO sni.example\r\n")
    reply(lines)
    raw.sendall(b"STARTTLS\r\n")
    if not reply(lines).startswith("220"):
        sys.exit("STARTTLS refused")
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
tls = context.wrap_socket(raw, server_hostname=sni)
f = tls.makefile("rb")
if mode == "implicit":
    print(reply(f), end="")
tls.sendall(b"EHLO sni.example\r\n")
print(reply(f), end="")
try:
    tls.sendall(b"QUIT\r\n")
    print(reply(f), end="")
except OSError:
    pass
