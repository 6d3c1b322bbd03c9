#!/usr/bin/env python3
"""One mailtls port, two Dovecots: logs in with Python's imaplib and poplib as each user,
every identification form mailtls routes, and prints the Subject each mailbox holds.

    routed.py imap|pop3 PORT CAFILE ALICE BOB PASSWORD

Each output line is "<form> <user>: <subject>"; a refused login prints "<form> refused".
"""
import base64
import imaplib
import poplib
import ssl
import sys

proto, port, cafile, alice, bob, password = sys.argv[1:7]
port = int(port)
context = ssl.create_default_context(cafile=cafile)


def imap_subject(conn):
    conn.select("INBOX", readonly=True)
    typ, data = conn.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK", data
    return data[0][1].decode().strip()


def pop_subject(conn):
    for line in conn.top(1, 0)[1]:
        if line.lower().startswith(b"subject:"):
            return line.decode().strip()
    return "no subject"


if proto == "imap":
    for user in (alice, bob):
        conn = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context, timeout=30)
        conn.login(user, password)
        print("login", user + ":", imap_subject(conn))
        conn.logout()
    # AUTHENTICATE PLAIN as imaplib does it: no SASL-IR, the response after "+".
    conn = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context, timeout=30)
    conn.authenticate("PLAIN", lambda _: ("\0%s\0%s" % (bob, password)).encode())
    print("authenticate", bob + ":", imap_subject(conn))
    conn.logout()
    # A refused login on one backend, then another user on the same connection.
    conn = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context, timeout=30)
    try:
        conn.login(alice, "wrong")
    except imaplib.IMAP4.error:
        print("login refused")
    conn.login(bob, password)
    print("retry", bob + ":", imap_subject(conn))
    conn.logout()
else:
    for user in (alice, bob):
        conn = poplib.POP3_SSL("127.0.0.1", port, context=context, timeout=30)
        conn.user(user)
        conn.pass_(password)
        print("user", user + ":", pop_subject(conn))
        conn.quit()
    conn = poplib.POP3_SSL("127.0.0.1", port, context=context, timeout=30)
    response = base64.b64encode(("\0%s\0%s" % (alice, password)).encode()).decode()
    conn._shortcmd("AUTH PLAIN " + response)
    print("auth", alice + ":", pop_subject(conn))
    conn.quit()
