//! Interop: Courier IMAP and Courier POP3 (Debian's courier-imap 5.0, courier-pop 1.0) in a
//! container of their own, the mailtls binary on the host in front of them with every IMAP
//! and POP3 role, real clients in front.
//!
//! Courier takes no PROXY header and has no ID or XCLIENT: it logs mailtls's address for
//! every client, and the `xclient = true` roles must fail closed. Its plaintext ports listen
//! on 127.0.0.1 only, with `IMAP_TLS_REQUIRED=0` / `POP3_TLS_REQUIRED=0`; docs/courier.md
//! documents exactly these settings. Root and podman: `#[ignore]`d, run by tests/run.sh;
//! elsewhere SKIPPED (a failure under CI=true).

mod common;

use std::net::TcpStream;
use std::sync::Mutex;

use common::mailbox_matrix::*;
use common::podman::{can_run, DerivedImage};

static MAKING_COURIER: Mutex<()> = Mutex::new(());
/// Courier's IMAP and POP3 servers (courier-authdaemon and PAM come with them), and
/// rsyslogd: Courier's courierlogger hands every line to syslog.
static COURIER: DerivedImage = DerivedImage::new(
    "localhost/mailtls-test-courier:bookworm-1",
    &["courier-imap", "courier-pop", "rsyslog"],
    &MAKING_COURIER,
);

/// A system user with a Maildir (authpam, Debian's default authmodulelist), and Debian's
/// /etc/courier files with the settings docs/courier.md names: the plaintext ports on
/// 127.0.0.1 (`$1` IMAP, `$2` POP3), no STARTTLS offered and none required (mailtls does
/// TLS), AUTH=PLAIN and POP3 SASL offered on the plaintext leg (the client's is TLS), and
/// MAXPERIP (connections per address) raised to MAXDAEMONS: every client has mailtls's.
/// `IMAP_IDLE_TIMEOUT=5` is for the test only: without FAM, Courier's IDLE polls the
/// Maildir that often (60 s by default).
const SETUP: &str = r#"set -e
IMAP=$1 POP3=$2
useradd -m -s /usr/sbin/nologin alice
echo alice:secret | chpasswd
su -s /bin/sh alice -c 'maildirmake /home/alice/Maildir'
sed -i -e "s/^ADDRESS=0/ADDRESS=127.0.0.1/" -e "s/^PORT=143/PORT=$IMAP/" \
  -e 's/^IMAP_CAPABILITY="\(.*\)"$/IMAP_CAPABILITY="\1 AUTH=PLAIN"/' \
  -e 's/^MAXPERIP=.*/MAXPERIP=$MAXDAEMONS/' -e 's/^IMAP_IDLE_TIMEOUT=60/IMAP_IDLE_TIMEOUT=5/' /etc/courier/imapd
sed -i -e 's/^IMAPDSTARTTLS=YES/IMAPDSTARTTLS=NO/' -e 's/^IMAP_TLS_REQUIRED=.*/IMAP_TLS_REQUIRED=0/' /etc/courier/imapd-ssl
sed -i -e "s/^ADDRESS=0/ADDRESS=127.0.0.1/" -e "s/^PORT=110/PORT=$POP3/" \
  -e 's/^MAXPERIP=.*/MAXPERIP=$MAXDAEMONS/' -e 's/^POP3AUTH=""/POP3AUTH="PLAIN LOGIN"/' /etc/courier/pop3d
sed -i -e 's/^POP3_STARTTLS=YES/POP3_STARTTLS=NO/' -e 's/^POP3_TLS_REQUIRED=.*/POP3_TLS_REQUIRED=0/' /etc/courier/pop3d-ssl
grep -q '^IMAP_TLS_REQUIRED=0' /etc/courier/imapd-ssl
grep -q '^POP3_TLS_REQUIRED=0' /etc/courier/pop3d-ssl
grep -q '^MAXPERIP=$MAXDAEMONS$' /etc/courier/imapd
grep -q '^MAXPERIP=$MAXDAEMONS$' /etc/courier/pop3d
grep -q '^IMAP_CAPABILITY=".* AUTH=PLAIN"$' /etc/courier/imapd
"#;

/// After the set-up and syslog: Debian's own start scripts, each through courierlogger.
const START: &str = r#"mkdir -p /run/courier/authdaemon
authdaemond start
/usr/lib/courier/imapd start
/usr/lib/courier/pop3d start
for i in $(seq 100); do [ -S /run/courier/authdaemon/socket ] && break; sleep 0.1; done
"#;

/// A message with this Message-ID into alice's Maildir, as a delivery agent puts it: written
/// in tmp/, then renamed into new/.
fn deliver_script(message_id: &str, name: &str) -> String {
    format!(
        "cd /home/alice/Maildir\ncat > tmp/{name} <<'EOF'\n{}EOF\nchown alice: tmp/{name}\nmv tmp/{name} new/{name}\n",
        message(message_id)
    )
}

/// Courier's side of the shared cells.
struct Courier;

impl Mailbox for Courier {
    fn deliver_script(&self, message_id: &str) -> String {
        deliver_script(message_id, &message_id.replace(['<', '>', '@'], ""))
    }

    /// Courier's log line for a login, as it names the peer: always mailtls's own address.
    fn logins<'a>(&self, log: &'a str, protocol: &str) -> Vec<&'a str> {
        lines_with(log, &[&format!(" {protocol}d: LOGIN, user=alice, ")])
    }

    /// The one login names mailtls's address, and its `port=[N]` is mailtls's
    /// `backend_source`: mailtls's line for that session names the real client.
    fn check_login(&self, front: &FrontDoor, log: &str, protocol: &str, role: &str) {
        let found = self.logins(log, protocol);
        assert_eq!(found.len(), 1, "one {protocol}d login:\n{log}");
        assert!(!log.contains(CLIENT_IP), "Courier cannot know the client's address:\n{log}");
        let after = "ip=[::ffff:127.0.0.1], port=[";
        let at = found[0].find(after).unwrap_or_else(|| panic!("not mailtls's address: {}", found[0]))
            + after.len();
        let port = &found[0][at..at + found[0][at..].find(']').expect("port=[N]")];
        let session = front.session_from(&format!("127.0.0.1:{port}"));
        assert!(session.contains(&format!("listener={role} client={CLIENT_IP}:")), "{session}");
    }

    /// couriertcpd logs `Connection, ip=...` for every connection it accepts, before the
    /// greeting. (Not any line: a session's `LOGOUT` line may come after the mark that
    /// ended its cell, in the next cell's part of the log.)
    fn heard_of(&self, log: &str, protocol: &str) -> bool {
        log.contains(&format!(" {protocol}d: Connection, "))
    }

    fn imap_capabilities(&self) -> &'static [&'static str] {
        &["AUTH=PLAIN"]
    }
}

#[test]
#[ignore = "needs root and podman: run tests/run.sh"]
fn courier_behind_mailtls_on_every_imap_and_pop3_role() {
    if !can_run("the Courier interop matrix") {
        return;
    }
    let [imap, pop3] = free_ports();
    let script = format!(
        "{SETUP}{}{START_SYSLOG}{START}echo READY\nexec sleep infinity\n",
        deliver_script(FIRST_MESSAGE, "first")
    );
    let server = Server::start("courier", &COURIER, &script, &[imap, pop3]);
    let front = FrontDoor::start(imap, pop3);
    let mut matrix = Matrix::new("courier");
    common_cells(&mut matrix, &server, &front, &Courier);
    matrix.cell("imaps-xclient: ends the session, Courier has no ID", || {
        xclient_fails_closed(&server, &front, "imaps-xclient", &Courier, "UNAVAILABLE")
    });
    matrix.cell("pop3s-xclient: ends the session, Courier has no XCLIENT", || {
        xclient_fails_closed(&server, &front, "pop3s-xclient", &Courier, "-ERR [SYS/TEMP]")
    });
    matrix.cell("the plaintext ports take connections on 127.0.0.1 only", || {
        for port in [imap, pop3] {
            assert!(TcpStream::connect(("127.0.0.1", port)).is_ok(), "port {port}");
            assert!(TcpStream::connect((CLIENT_IP, port)).is_err(), "{CLIENT_IP}:{port} answered");
        }
    });
    matrix.finish(|| {
        format!("----- Courier syslog -----\n{}\n----- mailtls -----\n{}", server.syslog(), front.log())
    });
}
