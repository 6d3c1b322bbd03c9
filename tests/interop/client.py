"""What the interop tests' Python clients share: every connection bound to the test's
client address, and an IMAP or POP3 session opened with implicit TLS or STARTTLS.

Imported by fetch.py, forge.py and mailbox.py from this directory (Python puts a script's
own directory first on its path).
"""
import imaplib
import poplib
import socket
import ssl

HOST = "127.0.0.1"


def bind_all(source):
    """imaplib and poplib take no source address: bind every connection they open to
    `source`, so the backends' logs can show that address arrived through the proxy."""
    create_connection = socket.create_connection

    def bound(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **kw):
        return create_connection(address, timeout, (source, 0), **kw)

    socket.create_connection = bound


def context(cafile):
    """A TLS context that trusts only `cafile` and checks the name (127.0.0.1 is in the
    test certificate)."""
    return ssl.create_default_context(cafile=cafile)


def imap(mode, port, tls, timeout):
    """An IMAP session, in TLS from the first byte (`implicit`) or after STARTTLS."""
    if mode == "implicit":
        return imaplib.IMAP4_SSL(HOST, port, ssl_context=tls, timeout=timeout)
    conn = imaplib.IMAP4(HOST, port, timeout=timeout)
    conn.starttls(ssl_context=tls)
    return conn


def pop3(mode, port, tls, timeout):
    """A POP3 session, in TLS from the first byte (`implicit`) or after STLS."""
    if mode == "implicit":
        return poplib.POP3_SSL(HOST, port, context=tls, timeout=timeout)
    conn = poplib.POP3(HOST, port, timeout=timeout)
    conn.stls(context=tls)
    return conn
