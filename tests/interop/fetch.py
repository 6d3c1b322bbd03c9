#!/usr/bin/env python3
"""Fetches every message of a mailbox with Python's imaplib or poplib, as a mail client
would, and writes each one's bytes (CRLF line ends, as sent) to OUTDIR/<n>.eml.

    fetch.py imap|pop3 starttls|implicit PORT CAFILE SOURCE_IP USER PASSWORD OUTDIR

The TLS context trusts only CAFILE and checks the certificate's name (127.0.0.1 is in the
test certificate); the client socket is bound to SOURCE_IP so the backends' logs can show
that address arrived through the proxy.
"""
import os
import sys

import client

proto, mode, port, cafile, source, user, password, outdir = sys.argv[1:9]
port = int(port)
client.bind_all(source)
context = client.context(cafile)
os.makedirs(outdir, exist_ok=True)


def save(n, data):
    with open(os.path.join(outdir, "%d.eml" % n), "wb") as f:
        f.write(data)


if proto == "imap":
    conn = client.imap(mode, port, context, 30)
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
    conn = client.pop3(mode, port, context, 30)
    conn.user(user)
    conn.pass_(password)
    count, _ = conn.stat()
    for n in range(1, count + 1):
        _, lines, _ = conn.retr(n)
        save(n, b"".join(line + b"\r\n" for line in lines))
    conn.quit()
print("fetched")
