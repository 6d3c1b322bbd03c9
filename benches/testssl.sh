#!/usr/bin/env bash
# TLS posture per testssl.sh (issue 15): the README's example config (all seven port roles,
# moved to ports PREFIX025..PREFIX995) run by the mailtls binary, and a full testssl.sh run
# against every port (implicit TLS, or STARTTLS for smtp/imap/pop3). Two certificates:
#   - a leaf for "localhost" from a throw-away CA, with OCSP and CRL URIs, trusted by
#     testssl through --add-ca: what a real deployment's certificate looks like, so the
#     findings are the server's own (protocols, ciphers, order, resumption, vulnerabilities);
#   - the self-signed trial certificate of `self_signed = true` (port 465 only), whose
#     findings are those of any self-signed certificate.
# Prints Markdown: per port the count of findings by severity and every finding of LOW and
# above (and testssl's own WARNings: checks it could not complete).
# Usage: benches/testssl.sh [> out.md]    (about 1.5 minutes per port; no network needed)
#   MAILTLS_BIN=target/debug/mailtls TESTSSL_PORT_PREFIX=37 benches/testssl.sh
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${MAILTLS_BIN:-target/release/mailtls}
PREFIX=${TESTSSL_PORT_PREFIX:-37}
W=$(mktemp -d /tmp/mailtls-testssl.XXXXXX)
pid=""
backends=""
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    if [ -n "$backends" ]; then kill "$backends" 2>/dev/null || true; fi
    rm -rf "$W"
}
trap cleanup EXIT
command -v testssl >/dev/null || { echo "testssl.sh not installed (apt-get install testssl.sh)" >&2; exit 1; }

# role port starttls-protocol ("-" for implicit TLS)
ROLES="submissions 465 -
submission 587 smtp
mx 025 smtp
imaps 993 -
imap 143 imap
pop3s 995 -
pop3 110 pop3"

# The example config on other ports: listeners 10xxx -> PREFIXxxx, admin 9925 -> PREFIX925,
# backends 12xxx (Postfix) -> PREFIX+1 xxx and 11xxx (Dovecot) -> PREFIX+2 xxx.
B1=$((PREFIX + 1)) B2=$((PREFIX + 2))
sed -e "s/:10\([0-9][0-9][0-9]\)\"/:$PREFIX\1\"/g" -e "s/127\.0\.0\.1:9925/127.0.0.1:${PREFIX}925/" \
    -e "s/127\.0\.0\.1:12\([0-9][0-9][0-9]\)\"/127.0.0.1:$B1\1\"/" \
    -e "s/127\.0\.0\.1:11\([0-9][0-9][0-9]\)\"/127.0.0.1:$B2\1\"/" \
    config/mailtls.example.toml >"$W/trial.toml"

# Stand-in backends that greet and answer, so a session after a handshake looks like one
# in service (testssl's resumption checks reconnect and expect the session to stay up).
python3 - "$B1" "$B2" <<'PY' &
import socket, sys, threading
b1, b2 = sys.argv[1:]
greetings = {f"{b1}587": b"220 backend ESMTP\r\n", f"{b1}525": b"220 backend ESMTP\r\n",
             f"{b2}143": b"* OK [CAPABILITY IMAP4rev1] ready\r\n", f"{b2}110": b"+OK ready\r\n"}
def serve(conn, greeting):
    with conn:
        conn.recv(536)  # the PROXY header (and perhaps more): not examined
        conn.sendall(greeting)
        for line in conn.makefile("rb"):
            if greeting.startswith(b"220"):
                quit = line.upper().startswith(b"QUIT")
                conn.sendall(b"221 bye\r\n" if quit else b"250-backend\r\n250 8BITMIME\r\n")
                if quit:
                    return
def listen(port, greeting):
    s = socket.create_server(("127.0.0.1", int(port)))
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve, args=(conn, greeting), daemon=True).start()
for port, greeting in greetings.items():
    threading.Thread(target=listen, args=(port, greeting), daemon=True).start()
threading.Event().wait()
PY
backends=$!

cat >"$W/leaf.ext" <<'EXT'
subjectAltName = DNS:localhost
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
authorityInfoAccess = OCSP;URI:http://127.0.0.1:9/ocsp
crlDistributionPoints = URI:http://127.0.0.1:9/ca.crl
EXT
(
    cd "$W"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
        -subj "/CN=mailtls testssl CA" -keyout ca.key -out ca.pem
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
        -keyout leaf.key -out leaf.csr
    openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 90 \
        -extfile leaf.ext -out leaf.pem
) >/dev/null 2>&1
sed -e 's|^cert = .*|cert = "leaf.pem"|' -e 's|^key = .*|key = "leaf.key"|' -e '/^self_signed/d' \
    "$W/trial.toml" >"$W/ca.toml"

start() {
    "$BIN" --config "$1" >"$W/mailtls.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/${PREFIX}110") 2>/dev/null; then return; fi
        sleep 0.1
    done
    echo "mailtls did not start:" >&2
    cat "$W/mailtls.log" >&2
    exit 1
}

stop() {
    kill "$pid" && wait "$pid" 2>/dev/null || true
    pid=""
}

# testssl over one port; appends the port's summary line and its findings above LOW.
scan() {
    local label=$1 role=$2 port=$3 proto=$4 json="$W/$2-$1.json"
    local args=(--color 0 --warnings off --quiet --nodns min --ip 127.0.0.1 --add-ca "$W/ca.pem" --jsonfile "$json")
    [ "$proto" != - ] && args+=(--starttls "$proto")
    local t0 status=0
    t0=$(date +%s)
    timeout 600 testssl "${args[@]}" "localhost:$PREFIX$port" >"$W/$role-$label.txt" 2>&1 || status=$?
    python3 - "$json" "$role" "$port" "$proto" "$status" "$(($(date +%s) - t0))" <<'PY'
import collections, json, sys
path, role, port, proto, status, secs = sys.argv[1:]
try:
    findings = json.load(open(path))
except (OSError, ValueError):
    findings = []
order = ["CRITICAL", "HIGH", "MEDIUM", "LOW", "WARN", "OK", "INFO"]
count = collections.Counter(f.get("severity", "?") for f in findings)
shown = ", ".join(f"{s} {count[s]}" for s in order if count[s])
mode = "implicit TLS" if proto == "-" else f"STARTTLS {proto}"
print(f"| {role} | {port} | {mode} | {shown or 'no findings'} | exit {status}, {secs} s |")
for f in findings:
    if f.get("severity") in ("CRITICAL", "HIGH", "MEDIUM", "LOW", "WARN"):
        print(f"|  | | {f['severity']}: `{f['id']}` | {f['finding']} | |")
PY
}

echo "## testssl.sh ($(testssl --version 2>/dev/null | grep -oE 'testssl +[0-9.]+' | head -1 | tr -s ' '), $(openssl version | cut -d' ' -f1-2))"
echo
echo "Ports of the README's example config (moved to ${PREFIX}xxx); certificate for localhost from a"
echo "throw-away CA (with OCSP and CRL URIs) that testssl trusts through --add-ca."
echo
echo "| listener | port | mode | findings by severity | run |"
echo "|---|---|---|---|---|"
start "$W/ca.toml"
while read -r role port proto; do
    echo "testssl.sh: $role ($PREFIX$port)" >&2
    scan ca "$role" "$port" "$proto"
done <<<"$ROLES"
stop
echo
grep -h "Has server cipher order\|Negotiated cipher " "$W"/submissions-ca.txt | sed 's/^ */    /' || true
echo
echo "The self-signed trial certificate (\`self_signed = true\`), port 465:"
echo
echo "| listener | port | mode | findings by severity | run |"
echo "|---|---|---|---|---|"
start "$W/trial.toml"
echo "testssl.sh: submissions with the trial certificate" >&2
scan trial submissions 465 -
grep -h "Certificate Validity" -A1 "$W/submissions-trial.txt" | sed 's/^ */    /' || true
stop
