#!/usr/bin/env python3
"""Fetches every message of a mailbox with Python's imaplib or poplib, as a mail client
would, and writes each one's bytes (CRLF line ends, as sent) to OUTDIR/<n>.eml.

    fetch.py imap|pop3 starttls|implicit PORT CAFILE SOURCE_IP USER PASSWORD OUTDIR

The TLS context trusts only CAFILE and checks the certificate's name (127.0.0.1 is in the
test certificate); the client socket is bound to SOURCE_IP so the backends' logs can show
that address arrived through the proxy.
"""
import imaplib
import os
import poplib
import socket
import ssl
import sys

proto, mode, port, cafile, source, user, password, outdir = sys.argv[1:9]
port = int(port)
host = "127.0.0.1"

# imaplib and poplib take no source address: bind every connection they open.
_create_connection = socket.create_connection


def bound(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **kw):
    return _create_connection(address, timeout, (source, 0), **kw)


socket.create_connection = bound
context = ssl.create_default_context(cafile=cafile)
os.makedirs(outdir, exist_ok=True)


def save(n, data):
    with open(os.path.join(outdir, "%d.eml" % n), "wb") as f:
        f.write(data)


if proto == "imap":
    if mode == "implicit":
        conn = imaplib.IMAP4_SSL(host, port, ssl_context=context, timeout=30)
    else:
        conn = imaplib.IMAP4(host, port, timeout=30)
        conn.starttls(ssl_context=context)
    conn.login(user, password)
    conn.select("INBOX", readonly=True)
    typ, data = conn.uid("SEARCH", None, "ALL")
    assert typ == "OK", data
    for n, uid in enumerate(data[0].split(), 1):
        typ, parts = conn.uid("FETCH", uid, "(BODY.PEEK[])")
        assert typ == "OK", parts
        save(n, parts[0][1])
    conn.logout()
else:
    if mode == "implicit":
        conn = poplib.POP3_SSL(host, port, context=context, timeout=30)
    else:
        conn = poplib.POP3(host, port, timeout=30)
        conn.stls(context=context)
    conn.user(user)
    conn.pass_(password)
    count, _ = conn.stat()
    for n in range(1, count + 1):
        _, lines, _ = conn.retr(n)
        save(n, b"".join(line + b"\r\n" for line in lines))
    conn.quit()
print("fetched")
