//! Interop: Cyrus IMAP (Debian's cyrus-imapd 3.6) in a container of its own, the mailtls
//! binary on the host in front of it with every IMAP and POP3 role, real clients in front.
//!
//! Cyrus takes no PROXY header. It lets mailtls's plaintext leg log in through a service of
//! its own (`mailtlsimap_allowplaintext: yes`, on 127.0.0.1 only) while `allowplaintext: no`
//! holds for every other service; docs/cyrus.md documents exactly these settings. Root and
//! podman: `#[ignore]`d, run by tests/run.sh; elsewhere SKIPPED (a failure under CI=true).

mod common;

use std::net::TcpStream;
use std::sync::Mutex;

use common::mailbox_matrix::*;
use common::mailservers::SmtpLines;
use common::podman::{can_run, DerivedImage};

static MAKING_CYRUS: Mutex<()> = Mutex::new(());
/// Cyrus's IMAP and POP3 servers, Cyrus SASL's sasldb tools and PLAIN/LOGIN mechanisms,
/// and rsyslogd: Cyrus logs to syslog only.
static CYRUS: DerivedImage = DerivedImage::new(
    "localhost/mailtls-test-cyrus:bookworm-1",
    &["cyrus-imapd", "cyrus-pop3d", "sasl2-bin", "libsasl2-modules", "rsyslog"],
    &MAKING_CYRUS,
);

/// Debian's imapd.conf with `allowplaintext: no` (Debian ships `yes`), `popminpoll: 0` (one
/// POP3 login a minute per mailbox otherwise: the cells log in one after another), the plaintext
/// exception for mailtls's two services only, and a cyrus.conf whose services are mailtls's
/// (`$1` IMAP, `$2` POP3) plus an ordinary `imap` on `$3`, standing for every other service.
/// The first message goes in through lmtpd (`deliver`), which creates the INBOX.
const SETUP: &str = r#"set -e
IMAP=$1 POP3=$2 OTHER=$3
sed -i 's/^allowplaintext: yes/allowplaintext: no/; s/^popminpoll: 1/popminpoll: 0/' /etc/imapd.conf
grep -q '^allowplaintext: no$' /etc/imapd.conf
grep -q '^popminpoll: 0$' /etc/imapd.conf
cat >> /etc/imapd.conf <<CONF
servername: cyrus.test
mailtlsimap_allowplaintext: yes
mailtlspop3_allowplaintext: yes
sasl_mech_list: PLAIN LOGIN
autocreate_post: yes
CONF
cat > /etc/cyrus.conf <<CONF
START {
  recover cmd="/usr/sbin/cyrus ctl_cyrusdb -r"
  idled cmd="idled"
}
SERVICES {
  mailtlsimap cmd="imapd" listen="127.0.0.1:$IMAP" prefork=0
  mailtlspop3 cmd="pop3d" listen="127.0.0.1:$POP3" prefork=0
  imap cmd="imapd" listen="127.0.0.1:$OTHER" prefork=0
  lmtpunix cmd="lmtpd" listen="/run/cyrus/socket/lmtp" prefork=0
}
EVENTS {
  checkpoint cmd="/usr/sbin/cyrus ctl_cyrusdb -c" period=30
}
CONF
mkdir -p /run/cyrus/lock /run/cyrus/proc /run/cyrus/socket
chown -R cyrus:mail /run/cyrus
echo secret | saslpasswd2 -p -c -u cyrus.test alice
chown cyrus:mail /etc/sasldb2
"#;

/// After the set-up and syslog: master as a daemon, until lmtpd's socket is there.
const START: &str = r#"/usr/lib/cyrus/bin/master -d
for i in $(seq 100); do [ -S /run/cyrus/socket/lmtp ] && break; sleep 0.1; done
"#;

/// `deliver` (lmtpd's client) of a message with this Message-ID, as user cyrus.
fn deliver_script(message_id: &str) -> String {
    format!(
        "cat <<'EOF' | su -s /bin/sh cyrus -c '/usr/lib/cyrus/bin/deliver {USER}'\n{}EOF\n",
        message(message_id)
    )
}

/// Cyrus's log lines for logins through one of its services: `login: HOST [ADDRESS] USER
/// MECHANISM User logged in SESSIONID=<...>`, the mechanism `plaintext` for LOGIN and
/// USER/PASS.
fn logins<'a>(log: &'a str, service: &str) -> Vec<&'a str> {
    lines_with(log, &[&format!("cyrus/{service}["), "]: login: ", " alice ", " User logged in SESSIONID=<"])
}

fn session_id(line: &str) -> &str {
    let start = line.find("SESSIONID=<").expect("a SESSIONID") + "SESSIONID=<".len();
    &line[start..start + line[start..].find('>').expect("SESSIONID's end")]
}

/// Cyrus's side of the shared cells: mailtls's services are `mailtlsimap`, `mailtlspop3`.
struct Cyrus;

impl Mailbox for Cyrus {
    fn deliver_script(&self, message_id: &str) -> String {
        deliver_script(message_id)
    }

    fn logins<'a>(&self, log: &'a str, protocol: &str) -> Vec<&'a str> {
        logins(log, &format!("mailtls{protocol}"))
    }

    /// The one login names mailtls's address (and the client's mechanism: no TLS, Cyrus
    /// sees only the cleartext leg); without an ID nothing in Cyrus's log names the client.
    fn check_login(&self, _: &FrontDoor, log: &str, protocol: &str, role: &str) {
        let found = self.logins(log, protocol);
        assert_eq!(found.len(), 1, "one login through mailtls{protocol}:\n{log}");
        let mechanism = if sasl(role) { "PLAIN" } else { "plaintext" };
        let expected = format!("login: localhost [127.0.0.1] alice {mechanism} User logged in");
        assert!(found[0].contains(&expected), "not {expected}: {}", found[0]);
        assert!(!log.contains(CLIENT_IP), "Cyrus cannot know the client's address here:\n{log}");
    }

    /// Cyrus logs nothing for a connection that only greets and closes, so this is any
    /// line of the service but those a session writes at its end (`USAGE`, `counts:`), which
    /// may come after the mark that ended the previous cell.
    fn heard_of(&self, log: &str, protocol: &str) -> bool {
        lines_with(log, &[&format!("cyrus/mailtls{protocol}[")])
            .iter()
            .any(|l| !l.contains("]: USAGE ") && !l.contains("]: counts: "))
    }
}

#[test]
#[ignore = "needs root and podman: run tests/run.sh"]
fn cyrus_behind_mailtls_on_every_imap_and_pop3_role() {
    if !can_run("the Cyrus interop matrix") {
        return;
    }
    let [imap, pop3, other] = free_ports();
    let script = format!(
        "{SETUP}{START_SYSLOG}{START}{}echo READY\nexec sleep infinity\n",
        deliver_script(FIRST_MESSAGE)
    );
    let server = Server::start("cyrus", &CYRUS, &script, &[imap, pop3, other]);
    let front = FrontDoor::start(imap, pop3);
    let mut matrix = Matrix::new("cyrus");
    common_cells(&mut matrix, &server, &front, &Cyrus);
    matrix.cell("imaps-xclient: the ID names the client in Cyrus's log", || {
        let (session, log) = server.logged_during(|| client(&front, "imaps-xclient", None));
        let session = session.unwrap_or_else(|e| panic!("{e}\n{log}"));
        assert_eq!(said(&session, "message 1"), Some(FIRST_MESSAGE), "{session:?}");
        let login = logins(&log, "mailtlsimap");
        assert_eq!(login.len(), 1, "{log}");
        assert!(login[0].contains("login: localhost [127.0.0.1] alice"), "{}", login[0]);
        let id =
            format!("client id sessionid=<{}>: \"x-originating-ip\" \"{CLIENT_IP}\"", session_id(login[0]));
        assert_eq!(lines_with(&log, &[&id, "\"x-originating-port\""]).len(), 1, "no {id}:\n{log}");
    });
    matrix.cell("a client's own ID fields never reach Cyrus's log", || {
        for role in ["imaps", "imap", "imaps-xclient"] {
            let (out, log) = server.logged_during(|| forge(&front, role));
            let out = out.unwrap_or_else(|e| panic!("{e}\n{log}"));
            assert!(out.lines().any(|l| l.starts_with("login OK")), "{role}: {out}");
            assert_eq!(logins(&log, "mailtlsimap").len(), 1, "{role}: {log}");
            assert!(!log.contains(FORGED_IP) && !log.contains("forged"), "{role}: {log}");
            // Cyrus logs every ID it accepts: on imaps-xclient only mailtls's.
            let ids = lines_with(&log, &["client id sessionid="]);
            match role {
                "imaps-xclient" => assert!(ids.len() == 1 && ids[0].contains(CLIENT_IP), "{log}"),
                _ => assert!(ids.iter().all(|l| !l.contains("x-")), "{log}"),
            }
        }
    });
    matrix.cell("pop3s-xclient: refused, Cyrus offers no XCLIENT", || {
        xclient_fails_closed(&server, &front, "pop3s-xclient", &Cyrus, "-ERR [SYS/TEMP]")
    });
    matrix.cell("Cyrus's other services refuse plaintext logins themselves", || {
        let (answers, log) = server.logged_during(|| {
            let mut s = SmtpLines::connect(other, None).expect("connect to Cyrus");
            let greeting = s.line().expect("greeting");
            s.send(&format!("a LOGIN {USER} {PASSWORD}")).expect("send");
            [greeting, s.line().expect("answer")]
        });
        assert!(answers[0].contains("LOGINDISABLED"), "{answers:?}");
        assert!(answers[1].starts_with("a NO Login only available under a layer"), "{answers:?}");
        assert!(logins(&log, "imap").is_empty(), "{log}");
    });
    matrix.cell("the plaintext services take connections on 127.0.0.1 only", || {
        for port in [imap, pop3, other] {
            assert!(TcpStream::connect(("127.0.0.1", port)).is_ok(), "port {port}");
            assert!(TcpStream::connect((CLIENT_IP, port)).is_err(), "{CLIENT_IP}:{port} answered");
        }
    });
    matrix.finish(|| {
        format!("----- Cyrus syslog -----\n{}\n----- mailtls -----\n{}", server.syslog(), front.log())
    });
}
