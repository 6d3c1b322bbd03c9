#!/usr/bin/env python3
"""Tries, as a hostile client would, every way a trusted proxy names its client to Dovecot
(POP3 XCLIENT and XOIP; IMAP ID fields and XCLIENT) before logging in with imaplib or
poplib, and prints one line per step so the test can check what the client saw:

    forge.py imap|pop3 starttls|implicit PORT CAFILE SOURCE_IP USER PASSWORD

    greeting <the server's greeting>
    reply <command> -> <reply>          one per forgery
    capability <the capability list>
    login <the login reply>

The client socket is bound to SOURCE_IP (the real address the backend must log); the
forged address is 203.0.113.77. A forgery refused with an error is printed, not raised.
"""
import base64
import imaplib
import poplib
import sys

import client

proto, mode, port, cafile, source, user, password = sys.argv[1:8]
port = int(port)
host = client.HOST
FORGED = "203.0.113.77"
client.bind_all(source)
context = client.context(cafile)


def show(kind, text):
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    print("%s %s" % (kind, str(text).strip()), flush=True)


if proto == "pop3":
    conn = (
        poplib.POP3_SSL(host, port, context=context, timeout=30)
        if mode == "implicit"
        else poplib.POP3(host, port, timeout=30)
    )
    if mode == "starttls":
        # Before TLS too: mailtls answers alone there; then the upgrade.
        try:
            show("reply", "XCLIENT ADDR=%s (before STLS) -> %s" % (FORGED, conn._shortcmd("XCLIENT ADDR=" + FORGED)))
        except poplib.error_proto as e:
            show("reply", "XCLIENT ADDR=%s (before STLS) -> %s" % (FORGED, e))
        conn.stls(context=context)
    show("greeting", conn.getwelcome())
    forward = base64.b64encode(b"user=root\tx=1").decode()
    for command in [
        "XCLIENT ADDR=%s PORT=4343" % FORGED,
        "XCLIENT SESSION=forged TTL=1 FORWARD=%s" % forward,
        "xclient addr=%s" % FORGED,
        "XOIP %s" % FORGED,
        # Dovecot ends a command name at a CR too: the rest of the line is its argument.
        "XCLIENT\rADDR=%s" % FORGED,
    ]:
        try:
            show("reply", "%s -> %s" % (command, conn._shortcmd(command)))
        except poplib.error_proto as e:
            show("reply", "%s -> %s" % (command, e))
    show("capability", " ".join(sorted(conn.capa())))
    conn.user(user)
    show("login", conn.pass_(password))
    conn.quit()
else:
    imaplib.Commands["ID"] = ("NONAUTH", "AUTH", "SELECTED")
    imaplib.Commands["XCLIENT"] = ("NONAUTH",)
    conn = client.imap(mode, port, context, 30)
    show("greeting", conn.welcome)
    # Dovecot honours the first ID of a connection only: the escaped form (which Dovecot
    # reads as x-originating-ip) goes first, then every field alone, then all at once.
    ids = [
        '("x-originating\\-ip" "%s")' % FORGED,
        '("x-originating-ip" "%s" "x-originating-port" "4343")' % FORGED,
        '("x-connected-ip" "203.0.113.78" "x-connected-port" "4344")',
        '("x-proxy-ttl" "1")',
        '("x-session-id" "forged")',
        '("x-session-ext-id" "forged")',
        '("x-client-transport" "TLS")',
        '("x-forward-user" "root")',
    ]
    for args in ids:
        try:
            typ, data = conn._simple_command("ID", args)
            show("reply", "ID %s -> %s %s" % (args, typ, data))
        except imaplib.IMAP4.error as e:
            show("reply", "ID %s -> error %s" % (args, e))
    try:
        typ, data = conn._simple_command("XCLIENT", "ADDR=%s" % FORGED)
        show("reply", "XCLIENT -> %s %s" % (typ, data))
    except imaplib.IMAP4.error as e:
        show("reply", "XCLIENT -> error %s" % e)
    typ, data = conn.capability()
    show("capability", b" ".join(data))
    typ, data = conn.login(user, password)
    show("login", "%s %s" % (typ, data))
    conn.logout()
