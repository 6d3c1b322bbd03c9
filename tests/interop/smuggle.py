#!/usr/bin/env python3
"""Attempts SMTP smuggling as an attacker would, with Python's smtplib: one transaction
whose DATA body (given in hex, sent exactly as is) may hide a non-standard end of data and
a second, forged transaction behind it. Prints every reply that came after the body, one
JSON list [[code, text], ...], and whether the server then closed the connection.

    smuggle.py plain|starttls|implicit PORT CAFILE SOURCE_IP USER:PASSWORD|- BODY_HEX

The TLS context trusts only CAFILE and checks the name (127.0.0.1 is in the test
certificate); the socket is bound to SOURCE_IP.
"""
import json
import smtplib
import ssl
import sys

mode, port, cafile, source, auth, body_hex = sys.argv[1:7]
port = int(port)
host = "127.0.0.1"
context = ssl.create_default_context(cafile=cafile)

if mode == "implicit":
    smtp = smtplib.SMTP_SSL(host, port, context=context, source_address=(source, 0), timeout=20)
else:
    smtp = smtplib.SMTP(host, port, source_address=(source, 0), timeout=20)
smtp.ehlo("client.example")
if mode == "starttls":
    smtp.starttls(context=context)
    smtp.ehlo("client.example")
if auth != "-":
    user, password = auth.split(":", 1)
    smtp.login(user, password)
code, text = smtp.mail("legit@sender.test")
assert code == 250, (code, text)
code, text = smtp.rcpt("alice@mail.test")
assert code == 250, (code, text)
code, text = smtp.docmd("DATA")
assert code == 354, (code, text)
# smtplib's own data() would fix up line endings: the point is to send them unfixed.
smtp.send(bytes.fromhex(body_hex))

replies = []
closed = False
smtp.sock.settimeout(1.5)
while True:
    try:
        code, text = smtp.getreply()
    except smtplib.SMTPServerDisconnected as e:
        # smtplib reports a read timeout the same way: then the server merely went quiet.
        closed = "timed out" not in str(e)
        break
    except OSError:
        break
    if code == -1:
        closed = True
        break
    replies.append([code, text.decode("utf-8", "replace")])
print(json.dumps({"replies": replies, "closed": closed}))
