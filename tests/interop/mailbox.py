#!/usr/bin/env python3
"""One session of a mail client against a mailtls port, with Python's imaplib or poplib:
log in, fetch message 1 and, on IMAP with "idle", wait in IDLE for a new message that the
test delivers meanwhile, then fetch that one too.

    mailbox.py imap|pop3 starttls|implicit PORT CAFILE SOURCE_IP USER PASSWORD [idle] [sasl]
    mailbox.py imap|pop3 implicit PORT CAFILE SOURCE_IP USER PASSWORD together N

Prints, one per line: `capability <what the client saw after TLS, before login>`,
`login <the server's answer>`, `message <n> <Message-ID>` for each message fetched and, in
IDLE, `idling` (the test's cue to deliver, flushed at once) and `exists <n>`. Any error
ends the script with a traceback and a non-zero status. With `sasl` the login is SASL
PLAIN (IMAP AUTHENTICATE, POP3 AUTH with an initial response) instead of LOGIN/USER-PASS.

With `together N` it opens N sessions at once (through mailtls, all from one address at
the backend, as every client is), prints `greeting <i> <the greeting>` or `greeting <i>
error <what>` for each while all are open, and logs none in.
"""
import base64
import re
import sys

import client

proto, mode, port, cafile, source, user, password = sys.argv[1:8]
idle = "idle" in sys.argv[8:]
sasl = "sasl" in sys.argv[8:]
plain = b"\0" + user.encode() + b"\0" + password.encode()
together = int(sys.argv[9]) if sys.argv[8:9] == ["together"] else 0
port = int(port)
client.bind_all(source)
context = client.context(cafile)


def say(*words):
    print(*words, flush=True)


def message_id(data):
    found = re.search(rb"^Message-ID: (<[^>]*>)", data, re.M | re.I)
    return found.group(1).decode() if found else "none"


def imap_fetch(conn, n):
    typ, parts = conn.fetch(str(n), "(BODY.PEEK[])")
    assert typ == "OK", parts
    say("message", n, message_id(parts[0][1]))


def imap_idle(conn):
    """RFC 2177 by hand (imaplib has no IDLE before Python 3.14): the number of messages
    the first EXISTS names."""
    tag = conn._new_tag()
    conn.send(tag + b" IDLE\r\n")
    line = conn.readline()
    assert line.startswith(b"+"), line
    say("idling")
    exists = None
    while exists is None:
        line = conn.readline()
        assert line, "the connection closed in IDLE"
        found = re.match(rb"\* (\d+) EXISTS", line)
        if found:
            exists = int(found.group(1))
    conn.send(b"DONE\r\n")
    while True:
        line = conn.readline()
        assert line, "the connection closed after DONE"
        if line.startswith(tag + b" "):
            assert line.startswith(tag + b" OK"), line
            break
    say("exists", exists)
    return exists


if together:
    sessions = []
    for i in range(together):
        try:
            if proto == "imap":
                conn = client.imap("implicit", port, context, 60)
                greeting = conn.welcome
            else:
                conn = client.pop3("implicit", port, context, 60)
                greeting = conn.getwelcome()
            sessions.append(conn)
            say("greeting", i, greeting.decode(errors="replace"))
        except Exception as e:
            say("greeting", i, "error", repr(e))
    for conn in sessions:
        conn.logout() if proto == "imap" else conn.quit()
elif proto == "imap":
    conn = client.imap(mode, port, context, 60)
    say("capability", " ".join(conn.capabilities))
    if sasl:
        typ, data = conn.authenticate("PLAIN", lambda _: plain)
    else:
        typ, data = conn.login(user, password)
    say("login", typ, data[0].decode(errors="replace"))
    typ, data = conn.select("INBOX")
    assert typ == "OK", data
    imap_fetch(conn, 1)
    if idle:
        imap_fetch(conn, imap_idle(conn))
    conn.logout()
else:
    conn = client.pop3(mode, port, context, 60)
    say("capability", " ".join(sorted(conn.capa())))
    if sasl:
        reply = conn._shortcmd("AUTH PLAIN " + base64.b64encode(plain).decode())
    else:
        conn.user(user)
        reply = conn.pass_(password)
    say("login", reply.decode(errors="replace"))
    count, _ = conn.stat()
    assert count >= 1, count
    _, lines, _ = conn.retr(1)
    say("message", 1, message_id(b"\r\n".join(lines)))
    conn.quit()
