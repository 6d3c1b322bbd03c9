//! The units in systemd/ under a real systemd: systemd 252 as PID 1 in a podman container,
//! mailtls installed by docs/install.md's own commands, Dovecot behind it, clients on the host.
//!
//! `#[ignore]` like the interop tests: tests/run.sh runs them as root. Without root or podman
//! they print SKIPPED (and fail under CI=true). The install is the docs/install.md block
//! marked `tests/container_systemd.rs runs this block`, run as it stands but for its `roles=`
//! line. The Debian package's test runs that page's "Debian package" commands: install with apt,
//! two roles enabled and used, an upgrade keeping the edited config, a purge.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use common::mailservers::{dovecot_home, read_lossy, run, CLIENT_TIMEOUT, PASSWORD, USER};
use common::podman::*;
use common::process::{free_port, BIN};
use common::{certs_for, tls_handshake, Certs, Conn};
use tokio::net::TcpStream;

/// Every role: its socket unit's port.
const ROLES: [(&str, u16); 7] = [
    ("submissions", 465),
    ("submission", 587),
    ("mx", 25),
    ("imaps", 993),
    ("imap", 143),
    ("pop3s", 995),
    ("pop3", 110),
];
const MESSAGE: &str =
    "From: bob@mail.test\r\nTo: alice@mail.test\r\nSubject: through systemd\r\n\r\nHello from PID 1.\r\n";
/// Dovecot's submission service as the SMTP server behind 465, 587 and 25 (the example
/// config's 12587 and 12525), with PROXY v2; it relays nowhere, but EHLO and AUTH are real.
const DOVECOT_SUBMISSION: &str = "hostname = mail.test
submission_relay_host = 127.0.0.1
submission_relay_port = 12526
service submission-login {
  inet_listener submission {
    port = 12587
    haproxy = yes
  }
  inet_listener mx {
    port = 12525
    haproxy = yes
  }
}
";
/// The page holding the install block and the Debian package's commands.
const INSTALL_DOC: &str = "docs/install.md";
const INSTALL_MARK: &str = "<!-- tests/container_systemd.rs runs this block -->";

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// docs/install.md's install block: the first ```sh block after the mark, `roles=` set to `roles`.
fn documented_install(roles: &[&str]) -> String {
    let doc = fs::read_to_string(crate_root().join(INSTALL_DOC)).unwrap();
    let (_, after) = doc.split_once(INSTALL_MARK).expect("docs/install.md marks its systemd install block");
    let block = after.split_once("```sh\n").and_then(|(_, b)| b.split_once("```")).expect("a ```sh block").0;
    let roles_line = block.lines().find(|l| l.starts_with("roles=")).expect("the block sets roles=");
    block.replacen(roles_line, &format!("roles=\"{}\"", roles.join(" ")), 1)
}

/// The example config as an admin edits it: the host name, certbot's files, and only the
/// listeners of `roles` (the socket units' names).
fn edited_example_config(roles: &[&str]) -> String {
    let text = fs::read_to_string(crate_root().join("config/mailtls.example.toml")).unwrap();
    let text = text
        .replacen("hostname = \"localhost\"", "hostname = \"mail.test\"", 1)
        .replacen("cert = \"dev-cert.pem\"", "cert = \"/etc/letsencrypt/live/mail.test/fullchain.pem\"", 1)
        .replacen("key = \"dev-key.pem\"", "key = \"/etc/letsencrypt/live/mail.test/privkey.pem\"", 1)
        .replacen("self_signed = true", "", 1);
    let mut blocks = text.split("[[listeners]]\n");
    let mut out = blocks.next().unwrap_or_default().to_owned();
    for block in blocks {
        let named = |r: &&str| block.contains(&format!("name = \"{r}\"\n"));
        if roles.iter().any(named) {
            out.push_str("[[listeners]]\n");
            out.push_str(block);
        }
    }
    out
}

/// What systemd in the container may do beyond podman's default capabilities.
#[derive(PartialEq)]
enum Privilege {
    /// CAP_SYS_ADMIN, which the PID 1 of a host has: without it systemd cannot make the
    /// mount namespace of the unit's sandbox (ProtectSystem= etc.) unless PrivateUsers=yes
    /// gives it one of its own, and docs/install.md's certbot drop-in turns that off.
    SysAdmin,
    /// podman's defaults: enough for a unit with PrivateUsers=yes (the Debian package's).
    /// With CAP_SYS_ADMIN added, systemd 252 in podman fails to start such a unit ("Failed
    /// to set up user namespacing: No such file or directory", 217/USER).
    Default,
}

/// A booted systemd with Dovecot running and mailtls installed for `roles`; its seven mail
/// ports published on the host.
struct Machine {
    sd: Container,
    /// Host port of each role's port.
    ports: BTreeMap<&'static str, u16>,
    certs: Certs,
    dir: tempfile::TempDir,
}

impl Machine {
    fn install(roles: &[&str]) -> Machine {
        let machine = Machine::boot(Privilege::SysAdmin);
        machine.copy_source_tree(&edited_example_config(roles));
        machine.sd.exec_ok(&format!("cd /root/src && set -e -x\n{}", documented_install(roles)));
        machine
    }

    /// What an install starts from: systemd up, Dovecot running, certbot's lineage for
    /// mail.test in place, nothing of mailtls yet.
    fn boot(privilege: Privilege) -> Machine {
        let image = SYSTEMD_BASE.ensure();
        let ports: BTreeMap<&str, u16> = ROLES.iter().map(|(r, _)| (*r, free_port())).collect();
        let mut args = vec!["--systemd=always".to_owned()];
        if privilege == Privilege::SysAdmin {
            args.push("--cap-add=SYS_ADMIN".to_owned());
        }
        for (role, port) in ROLES {
            args.extend(["-p".to_owned(), format!("127.0.0.1:{}:{port}", ports[role])]);
        }
        // The image's own Dovecot would take 110 and 143 (and stops slowly): masked at boot,
        // since systemd in a container reads its arguments as the kernel command line.
        args.extend([image.to_owned(), "/sbin/init".to_owned(), "systemd.mask=dovecot.service".to_owned()]);
        let sd = Container::start("systemd", &args.iter().map(String::as_str).collect::<Vec<_>>());
        wait_for(
            "systemd is up",
            Duration::from_secs(60),
            || {
                let state = sd.exec("systemctl is-system-running").stdout;
                matches!(state.trim(), "running" | "degraded").then_some(())
            },
            || sd.exec("systemctl --failed --no-pager; systemctl list-jobs --no-pager").stdout,
        );
        let dir = tempfile::tempdir().unwrap();
        let certs = certs_for(&["mail.test", "localhost", "127.0.0.1"]);
        let machine = Machine { sd, ports, certs, dir };
        machine.start_dovecot();
        machine.put_certbot_lineage("mail.test", &machine.certs);
        machine
    }

    /// Dovecot as the mail server the admin moved to 127.0.0.1:11143/11110 (the example
    /// config's backends), run as a service of this systemd.
    fn start_dovecot(&self) {
        let home = self.dir.path().join("dovecot");
        dovecot_home(&home, "/srv/dovecot", 11143, 11110, MESSAGE);
        let config = fs::read_to_string(home.join("dovecot.conf")).unwrap();
        let config = config.replacen("protocols = imap pop3\n", "protocols = imap pop3 submission\n", 1);
        fs::write(home.join("dovecot.conf"), config + DOVECOT_SUBMISSION).unwrap();
        self.sd.copy_in(&home, "/srv/dovecot");
        self.sd.exec_ok(
            "chown -R nobody:nogroup /srv/dovecot/mail && systemd-run --unit=mailstore /usr/sbin/dovecot -F -c /srv/dovecot/dovecot.conf",
        );
        wait_for(
            "Dovecot starts",
            Duration::from_secs(60),
            || self.sd.exec("grep -q 'starting up' /srv/dovecot/dovecot.log").success().then_some(()),
            || self.sd.exec("journalctl -u mailstore --no-pager").stdout,
        );
    }

    /// certbot's layout and modes: live/ and archive/ root-only, the key 0600 root.
    fn put_certbot_lineage(&self, name: &str, certs: &Certs) {
        self.sd.exec_ok(&format!("mkdir -p /etc/letsencrypt/archive/{name} /etc/letsencrypt/live/{name}"));
        self.sd.copy_in(&certs.cert, &format!("/etc/letsencrypt/archive/{name}/fullchain1.pem"));
        self.sd.copy_in(&certs.key, &format!("/etc/letsencrypt/archive/{name}/privkey1.pem"));
        self.sd.exec_ok(&format!(
            "cd /etc/letsencrypt && chown -R root:root live archive && chmod 0700 live archive && \
             chmod 0755 archive/{name} live/{name} && chmod 0644 archive/{name}/fullchain1.pem && \
             chmod 0600 archive/{name}/privkey1.pem && \
             ln -sfn ../../archive/{name}/fullchain1.pem live/{name}/fullchain.pem && \
             ln -sfn ../../archive/{name}/privkey1.pem live/{name}/privkey.pem"
        ));
    }

    /// What docs/install.md's commands start from: a source tree with the release binary.
    fn copy_source_tree(&self, config: &str) {
        let src = self.dir.path().join("src");
        fs::create_dir_all(src.join("target/release")).unwrap();
        fs::create_dir_all(src.join("config")).unwrap();
        fs::copy(BIN, src.join("target/release/mailtls")).unwrap();
        fs::write(src.join("config/mailtls.example.toml"), config).unwrap();
        let out = run(
            std::process::Command::new("cp").arg("-r").arg(crate_root().join("systemd")).arg(&src),
            CLIENT_TIMEOUT,
        );
        assert!(out.success(), "{}", out.stderr);
        self.sd.copy_in(&src, "/root/src");
    }

    fn port(&self, role: &str) -> u16 {
        self.ports[role]
    }

    fn journal(&self, unit: &str) -> String {
        self.sd.exec(&format!("journalctl -u {unit} --no-pager -o cat")).stdout
    }

    fn show(&self, property: &str) -> String {
        self.sd.exec_ok(&format!("systemctl show -p {property} --value mailtls.service")).trim().to_owned()
    }

    fn why(&self) -> String {
        format!(
            "----- systemctl status -----\n{}\n----- journal -----\n{}",
            self.sd.exec("systemctl status --no-pager 'mailtls*'").stdout,
            self.sd.exec("journalctl --no-pager -n 200 -o short-precise").stdout
        )
    }

    /// Python's imaplib or poplib from the host: logs in and reads alice's message.
    fn fetch(&self, proto: &str, mode: &str, role: &str, certs: &Certs) {
        let out = self.dir.path().join(format!("fetched-{role}-{}", free_port()));
        let script = crate_root().join("tests/interop/fetch.py");
        let mut c = std::process::Command::new("python3");
        c.arg(script).args([proto, mode, &self.port(role).to_string()]).arg(&certs.cert);
        c.args(["127.0.0.1", USER, PASSWORD]).arg(&out);
        let o = run(&mut c, CLIENT_TIMEOUT);
        assert!(o.success(), "{role}: {:?} {}{}\n{}", o.status, o.stdout, o.stderr, self.why());
        let message = fs::read_dir(&out).unwrap().next().map(|e| read_lossy(&e.unwrap().path()));
        assert!(message.is_some_and(|m| m.contains("Hello from PID 1.")), "{role}");
    }

    async fn tcp(&self, role: &str) -> TcpStream {
        TcpStream::connect(("127.0.0.1", self.port(role))).await.expect("the published port")
    }

    /// An SMTP STARTTLS port: the greeting (mailtls's own), then an upgrade with `certs`
    /// and the backend's EHLO reply.
    async fn smtp_starttls(&self, role: &str, certs: &Certs) -> (String, Vec<String>) {
        let mut smtp = Conn::new(self.tcp(role).await);
        let greeting = smtp.line().await;
        smtp.send("EHLO client.test\r\n").await;
        let ehlo = smtp.smtp_reply().await;
        assert!(ehlo.iter().any(|l| l.contains("STARTTLS")), "{role}: {ehlo:?}");
        smtp.send("STARTTLS\r\n").await;
        assert!(smtp.line().await.starts_with("220 "), "{role}");
        let mut tls = smtp.upgrade(certs).await;
        tls.send("EHLO client.test\r\n").await;
        let ehlo = tls.smtp_reply().await;
        tls.send("QUIT\r\n").await;
        (greeting, ehlo)
    }

    /// SMTP submission through `role`, TLS first (implicit) or after STARTTLS: EHLO and
    /// AUTH PLAIN as alice, answered by the real SMTP server behind mailtls.
    async fn smtp_login(&self, role: &str, implicit: bool, certs: &Certs) -> Vec<String> {
        let mut tls = if implicit {
            let tls = tls_handshake(self.tcp(role).await, certs).await.expect("TLS");
            let mut tls = Conn::new(tls);
            assert!(tls.line().await.starts_with("220 "), "{role}\n{}", self.why());
            tls
        } else {
            let mut smtp = Conn::new(self.tcp(role).await);
            smtp.line().await;
            smtp.send("STARTTLS\r\n").await;
            assert!(smtp.line().await.starts_with("220 "), "{role}");
            smtp.upgrade(certs).await
        };
        tls.send("EHLO client.test\r\n").await;
        let ehlo = tls.smtp_reply().await;
        let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0{PASSWORD}"));
        tls.send(format!("AUTH PLAIN {plain}\r\n")).await;
        let auth = tls.smtp_reply().await;
        tls.send("QUIT\r\n").await;
        ehlo.into_iter().chain(auth).collect()
    }
}

fn can_run_here() -> bool {
    can_run("systemd container tests")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and podman; run by tests/run.sh"]
async fn socket_units_start_mailtls_on_a_first_connection_and_serve_all_seven_ports_without_capabilities() {
    if !can_run_here() {
        return;
    }
    let all: Vec<&str> = ROLES.iter().map(|(r, _)| *r).collect();
    let m = Machine::install(&all);
    assert_eq!(m.show("ActiveState"), "inactive", "started before any connection\n{}", m.why());
    for (role, port) in ROLES {
        let state = m.sd.exec_ok(&format!("systemctl is-active mailtls-{role}.socket"));
        assert_eq!(state.trim(), "active", "{role}");
        let listens = m.sd.exec_ok(&format!("systemctl show -p Listen --value mailtls-{role}.socket"));
        assert!(listens.contains(&format!("0.0.0.0:{port} (Stream)")), "{role}: {listens}");
    }

    // The first connection starts it; Type=notify: active only once READY=1 came.
    m.fetch("imap", "implicit", "imaps", &m.certs);
    assert_eq!(m.show("ActiveState"), "active", "{}", m.why());
    assert_eq!(m.show("SubState"), "running");
    let status = m.show("StatusText");
    assert!(
        status.starts_with("7 listeners (submissions, submission, mx, imaps, imap, pop3s, pop3)"),
        "{status}"
    );
    assert!(status.contains("soonest certificate expiry"), "{status}");

    m.fetch("imap", "starttls", "imap", &m.certs);
    m.fetch("pop3", "implicit", "pop3s", &m.certs);
    m.fetch("pop3", "starttls", "pop3", &m.certs);
    // SMTP through a real SMTP server (Dovecot's submission service): AUTH inside TLS on
    // 587 and 465; on 25 the pre-TLS EHLO shows what the backend offers, AUTH never.
    for (role, implicit) in [("submission", false), ("submissions", true)] {
        let reply = m.smtp_login(role, implicit, &m.certs).await;
        assert!(reply.iter().any(|l| l.starts_with("250-AUTH PLAIN")), "{role}: {reply:?}");
        assert!(reply.last().is_some_and(|l| l.starts_with("235 ")), "{role}: {reply:?}\n{}", m.why());
    }
    let (greeting, ehlo) = m.smtp_starttls("mx", &m.certs).await;
    assert_eq!(greeting, "220 mail.test ESMTP\r\n");
    assert!(ehlo[0].starts_with("250-mail.test"), "the backend's EHLO after STARTTLS: {ehlo:?}");
    let logins = m.sd.exec_ok("grep -c 'submission-login: Info: Login: user=<alice@mail.test>.*, secured,' /srv/dovecot/dovecot.log");
    assert_eq!(logins.trim(), "2", "{}", m.why());

    // No capability at all, not even CAP_NET_BIND_SERVICE: the ports came from systemd.
    let pid = m.show("MainPID");
    let caps = m.sd.exec_ok(&format!("grep ^Cap /proc/{pid}/status"));
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(caps.contains(&format!("{set}:\t0000000000000000")), "{set}: {caps}");
    }
    // The key: root and ssl-cert only, read through SupplementaryGroups=ssl-cert.
    let key = m.sd.exec_ok("stat -L -c '%a %U %G' /etc/letsencrypt/live/mail.test/privkey.pem");
    assert_eq!(key.trim(), "640 root ssl-cert");
    let groups = m.sd.exec_ok(&format!("grep ^Groups /proc/{pid}/status"));
    let ssl_cert = m.sd.exec_ok("getent group ssl-cert | cut -d: -f3");
    assert!(groups.split_whitespace().any(|g| g == ssl_cert.trim()), "{groups}");

    let journal = m.journal("mailtls.service");
    for (role, _) in ROLES {
        assert!(
            journal.contains(&format!("using sockets passed by systemd listener={role} sockets=2")),
            "{role}"
        );
        let line = format!("connection closed listener={role} client=");
        assert!(journal.contains(&line), "no per-connection line for {role}:\n{journal}");
    }
    eprintln!("journal (activation):\n{journal}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and podman; run by tests/run.sh"]
async fn systemctl_reload_applies_a_new_certificate_and_config_and_refuses_a_broken_one() {
    if !can_run_here() {
        return;
    }
    let all: Vec<&str> = ROLES.iter().map(|(r, _)| *r).collect();
    let m = Machine::install(&all);
    assert_eq!(m.smtp_starttls("submission", &m.certs).await.0, "220 mail.test ESMTP\r\n", "{}", m.why());
    let pid = m.show("MainPID");

    // A second lineage and a changed host name: what no file watcher could apply.
    let renewed = certs_for(&["mail2.test", "localhost", "127.0.0.1"]);
    m.put_certbot_lineage("mail2.test", &renewed);
    m.sd.exec_ok(
        "cd /etc/letsencrypt && chgrp -R ssl-cert live archive && chmod -R g+rX live archive && \
         sed -i -e 's/^hostname = .*/hostname = \"mail2.test\"/' -e 's,/live/mail.test/,/live/mail2.test/,' \
         /etc/mailtls/mailtls.toml && systemctl reload mailtls",
    );
    assert_eq!(m.smtp_starttls("submission", &renewed).await.0, "220 mail2.test ESMTP\r\n", "{}", m.why());
    m.fetch("imap", "implicit", "imaps", &renewed);
    assert_eq!(m.show("MainPID"), pid, "reloaded, not restarted");

    // A broken config: `systemctl reload` fails and says why; the service keeps serving.
    let edit = "sed -i '0,/^backend = .*/s//backend = \"127.0.0.1\"/' /etc/mailtls/mailtls.toml";
    m.sd.exec_ok(edit);
    let line = m.sd.exec_ok("grep -n '^backend = \"127.0.0.1\"$' /etc/mailtls/mailtls.toml | cut -d: -f1");
    let refused = m.sd.exec("systemctl reload mailtls");
    assert!(!refused.success(), "reload of a broken config succeeded\n{}", m.why());
    assert_eq!(m.show("ActiveState"), "active", "{}", m.why());
    assert_eq!(m.show("MainPID"), pid);
    assert_eq!(m.smtp_starttls("submission", &renewed).await.0, "220 mail2.test ESMTP\r\n");
    let journal = m.journal("mailtls.service");
    let error = format!(
        "/etc/mailtls/mailtls.toml:{}: listeners[0].backend: \"127.0.0.1\" is not host:port",
        line.trim()
    );
    assert!(journal.contains(&error), "wanted {error:?} in:\n{journal}");
    assert!(journal.contains("configuration reloaded: new sessions use it"), "{journal}");
    eprintln!("journal (reload):\n{journal}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and podman; run by tests/run.sh"]
async fn systemctl_stop_drains_an_open_session_and_the_service_stops_cleanly() {
    if !can_run_here() {
        return;
    }
    let m = Machine::install(&["imaps"]);
    let mut imap = Conn::new(tls_handshake(m.tcp("imaps").await, &m.certs).await.expect("TLS on 993"));
    assert!(imap.line().await.starts_with("* OK"), "{}", m.why());
    imap.send(format!("a LOGIN {USER} {PASSWORD}\r\n")).await;
    let reply = imap.lines_until(|l| l.starts_with("a ")).await;
    assert!(reply.last().is_some_and(|l| l.starts_with("a OK")), "{reply:?}\n{}", m.why());

    let name = m.sd.name.clone();
    let stop = tokio::task::spawn_blocking(move || podman(&["exec", &name, "systemctl", "stop", "mailtls"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !m.journal("mailtls.service").contains("stopping: no new connections") {
        assert!(Instant::now() < deadline, "no stop seen\n{}", m.why());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(m.show("ActiveState"), "deactivating");
    imap.send("b SELECT INBOX\r\n").await;
    let reply = imap.lines_until(|l| l.starts_with("b ")).await;
    assert!(reply.last().is_some_and(|l| l.starts_with("b OK")), "{reply:?}\n{}", m.why());
    imap.send("c LOGOUT\r\n").await;
    imap.lines_until(|l| l.starts_with("c ")).await;
    // The mail program closes after LOGOUT: the last session is over, nothing is left to drain.
    drop(imap);
    let stopped = stop.await.unwrap();
    assert!(stopped.success(), "systemctl stop: {}{}", stopped.stdout, stopped.stderr);
    assert_eq!(m.show("ActiveState"), "inactive");
    assert_eq!(m.show("Result"), "success", "{}", m.why());
    let journal = m.journal("mailtls.service");
    assert!(journal.contains("mailtls::server: stopped"), "{journal}");
    assert!(!journal.contains("drain time over"), "the session was cut off, not drained\n{journal}");
    eprintln!("journal (stop):\n{journal}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and podman; run by tests/run.sh"]
async fn an_admin_enabling_only_the_roles_in_use_gets_a_working_service() {
    if !can_run_here() {
        return;
    }
    let m = Machine::install(&["imaps", "pop3s"]);
    m.fetch("imap", "implicit", "imaps", &m.certs);
    m.fetch("pop3", "implicit", "pop3s", &m.certs);
    assert_eq!(m.show("ActiveState"), "active", "{}", m.why());
    assert_eq!(m.show("NRestarts"), "0", "{}", m.why());
    let status = m.show("StatusText");
    assert!(status.starts_with("2 listeners (imaps, pop3s)"), "{status}");
    for role in ["submissions", "submission", "mx", "imap", "pop3"] {
        let state = m.sd.exec(&format!("systemctl is-active mailtls-{role}.socket")).stdout;
        assert_eq!(state.trim(), "inactive", "{role} was started too\n{}", m.why());
    }
}

// ---- The Debian package (issue 16): installed, used, upgraded and purged for real --------

/// The two .deb files of one source tree: revision 1 as `packaging/build-deb.sh --debug`
/// makes it, and revision 2 from the same files, the upgrade an admin installs next.
struct Packages {
    first: std::path::PathBuf,
    second: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// docs/install.md's "Debian package" commands, run verbatim in the container (apt's yes comes
/// from an apt.conf snippet, not from a changed command line).
const BUILD_FIRST: &str = "packaging/build-deb.sh --debug";
const APT_INSTALL_FIRST: &str = "apt-get install ./mailtls_0.1.0-1_amd64.deb";
const APT_UPGRADE: &str = "apt-get install ./mailtls_0.1.0-2_amd64.deb";
const APT_PURGE: &str = "apt-get purge mailtls";
const GRANT_CERTBOT_KEY: &str = "chgrp -R ssl-cert /etc/letsencrypt/live /etc/letsencrypt/archive
chmod -R g+rX /etc/letsencrypt/live /etc/letsencrypt/archive
adduser mailtls ssl-cert";
const ENABLE_TWO_ROLES: &str = "systemctl enable --now mailtls-imaps.socket mailtls-pop3s.socket";
const REVISION_2: &str =
    "CARGO_TARGET_DIR=target/package/cargo-target cargo deb --no-build --strip --deb-revision 2 --output";

fn build_packages() -> Packages {
    let (script, flag) = BUILD_FIRST.split_once(' ').unwrap();
    let mut build = std::process::Command::new(crate_root().join(script));
    let out = run(build.arg(flag).current_dir(crate_root()), BUILD_TIMEOUT);
    assert!(out.success(), "{BUILD_FIRST}: {:?}\n{}{}", out.status, out.stdout, out.stderr);
    let first = crate_root().join(out.stdout.lines().last().expect("the .deb's path").trim());
    let dir = tempfile::tempdir().unwrap();
    let (env, cargo_deb) = REVISION_2.split_once(' ').unwrap();
    let mut revision_2 = std::process::Command::new("sh");
    revision_2.arg("-c").arg(format!("{env} exec {cargo_deb} \"$1\"")).arg("sh").arg(dir.path());
    let out = run(revision_2.current_dir(crate_root()), BUILD_TIMEOUT);
    assert!(out.success(), "{REVISION_2}: {:?}\n{}{}", out.status, out.stdout, out.stderr);
    let second = dir.path().join("mailtls_0.1.0-2_amd64.deb");
    for deb in [&first, &second] {
        assert!(deb.exists(), "{} was not made:\n{}{}", deb.display(), out.stdout, out.stderr);
    }
    Packages { first, second, _dir: dir }
}

/// build-deb.sh rebuilds the debug binary and the man page generator when they are stale;
/// cargo-deb itself compiles nothing (`--no-build`).
const BUILD_TIMEOUT: Duration = Duration::from_secs(1200);

/// packaging/mailtls.toml as an admin edits it after install: the host name, certbot's
/// files instead of the trial pair, and the imaps and pop3s roles uncommented in place of
/// the trial listener, pointed at the Dovecot of this machine.
fn edited_shipped_config() -> String {
    let mut text = fs::read_to_string(crate_root().join("packaging/mailtls.toml")).unwrap();
    let mut edit = |from: &str, to: &str| {
        assert!(text.contains(from), "packaging/mailtls.toml no longer has {from:?}");
        text = text.replacen(from, to, 1);
    };
    edit("hostname = \"localhost\"", "hostname = \"mail.test\"");
    edit(
        "cert = \"/var/lib/mailtls/trial/cert.pem\"",
        "cert = \"/etc/letsencrypt/live/mail.test/fullchain.pem\"",
    );
    edit("key = \"/var/lib/mailtls/trial/key.pem\"", "key = \"/etc/letsencrypt/live/mail.test/privkey.pem\"");
    edit("\nself_signed = true\n", "\n");
    let (head, rest) = text.split_once("[[listeners]]\nname = \"trial-imaps\"").expect("the trial listener");
    let (_, roles) = rest.split_once("\n# [[listeners]]").expect("the commented roles");
    let mut out = head.to_owned();
    for block in format!("# [[listeners]]{roles}").split("\n#\n") {
        let name = |r: &str| block.contains(&format!("# name = \"{r}\""));
        if name("imaps") || name("pop3s") {
            let uncommented: String =
                block.lines().map(|l| l.strip_prefix("# ").unwrap_or(l)).flat_map(|l| [l, "\n"]).collect();
            // The Dovecot of this machine listens where the example config's backends are.
            out.push_str(
                &uncommented
                    .replace("127.0.0.1:10143", "127.0.0.1:11143")
                    .replace("127.0.0.1:10110", "127.0.0.1:11110"),
            );
            out.push('\n');
        }
    }
    assert_eq!(out.matches("[[listeners]]").count(), 2, "imaps and pop3s uncommented:\n{out}");
    out
}

impl Machine {
    fn root(&self, script: &str) -> String {
        self.sd.exec_ok(&format!("set -e; export DEBIAN_FRONTEND=noninteractive; cd /root; {script}"))
    }

    fn package_status(&self) -> String {
        self.sd.exec("dpkg-query -W -f '${Status} ${Version}' mailtls").stdout
    }

    fn is_enabled(&self, unit: &str) -> String {
        self.sd.exec(&format!("systemctl is-enabled {unit}")).stdout.trim().to_owned()
    }
}

/// Install: the package's user exists, every unit is installed disabled, nothing runs.
fn apt_install_creates_the_mailtls_user_and_leaves_every_unit_disabled(m: &Machine, deb: &Path) {
    m.sd.copy_in(deb, "/root/mailtls_0.1.0-1_amd64.deb");
    m.root("echo 'APT::Get::Assume-Yes \"true\";' >/etc/apt/apt.conf.d/90mailtls-test");
    let log = m.root(&format!("{APT_INSTALL_FIRST} 2>&1"));
    assert_eq!(m.package_status(), "install ok installed 0.1.0-1", "{log}");
    // Its dependencies (adduser, libc6) are on any Debian system: nothing was fetched.
    assert!(!log.contains("http://") && !log.contains("https://"), "apt downloaded:\n{log}");
    let user = m.root("getent passwd mailtls");
    let fields: Vec<&str> = user.trim().split(':').collect();
    assert!(fields[2].parse::<u32>().is_ok_and(|uid| uid < 1000), "not a system user: {user}");
    assert_eq!(fields[5..], ["/var/lib/mailtls", "/usr/sbin/nologin"], "{user}");
    assert!(m.sd.exec("getent group mailtls").success(), "no group mailtls");
    for (role, _) in ROLES {
        assert_eq!(m.is_enabled(&format!("mailtls-{role}.socket")), "disabled", "{role}");
        assert_eq!(
            m.sd.exec(&format!("systemctl is-active mailtls-{role}.socket")).stdout.trim(),
            "inactive"
        );
    }
    assert_eq!(m.is_enabled("mailtls.service"), "disabled");
    assert_eq!(m.show("ActiveState"), "inactive");
    // The packaged unit (ExecStart at /usr/bin) has no Sockets=: enabling some roles works.
    let unit = m.root("systemctl cat mailtls.service");
    assert!(unit.contains("ExecStart=/usr/bin/mailtls --config /etc/mailtls/mailtls.toml"), "{unit}");
    assert!(!unit.lines().any(|l| l.starts_with("Sockets=")), "{unit}");
    assert!(unit.contains("User=mailtls"), "the Debian drop-in is not applied:\n{unit}");
    m.root("mailtls --config /etc/mailtls/mailtls.toml --check");
}

/// The admin's edits: config, access to certbot's key, two socket units enabled.
fn edit_config_grant_the_key_and_enable_two_roles(m: &Machine) -> String {
    let edited = edited_shipped_config();
    let file = m.dir.path().join("mailtls.toml");
    fs::write(&file, &edited).unwrap();
    m.sd.copy_in(&file, "/etc/mailtls/mailtls.toml");
    m.root(GRANT_CERTBOT_KEY);
    m.root(ENABLE_TWO_ROLES);
    edited
}

/// Two enabled socket units: real TLS clients from the host read alice's message through
/// each; the first connection started the service as the mailtls user with two listeners.
fn two_enabled_socket_units_serve_imaps_and_pop3s_as_the_mailtls_user(m: &Machine) {
    for role in ["imaps", "pop3s"] {
        assert_eq!(m.is_enabled(&format!("mailtls-{role}.socket")), "enabled", "{role}");
    }
    assert_eq!(m.show("ActiveState"), "inactive", "started before any connection\n{}", m.why());
    m.fetch("imap", "implicit", "imaps", &m.certs);
    m.fetch("pop3", "implicit", "pop3s", &m.certs);
    assert_eq!(m.show("ActiveState"), "active", "{}", m.why());
    assert!(m.show("StatusText").starts_with("2 listeners (imaps, pop3s)"), "{}", m.why());
    let pid = m.show("MainPID");
    let owner = m.root(&format!("stat -c %U /proc/{pid}"));
    assert_eq!(owner.trim(), "mailtls", "the service does not run as the package's user");
    for role in ["submissions", "submission", "mx", "imap", "pop3"] {
        let state = m.sd.exec(&format!("systemctl is-active mailtls-{role}.socket")).stdout;
        assert_eq!(state.trim(), "inactive", "{role} was started too\n{}", m.why());
    }
}

/// Upgrade to revision 2: the edited conffile stays as the admin left it, the running
/// service was restarted (new PID) and serves again, the enabled roles stay enabled.
fn upgrade_keeps_the_edited_config_and_restarts_the_running_service(m: &Machine, deb: &Path, edited: &str) {
    let before = m.show("MainPID");
    m.sd.copy_in(deb, "/root/mailtls_0.1.0-2_amd64.deb");
    let log = m.root(&format!("{APT_UPGRADE} 2>&1"));
    assert_eq!(m.package_status(), "install ok installed 0.1.0-2", "{log}");
    let config = m.root("cat /etc/mailtls/mailtls.toml");
    assert!(config == edited, "the upgrade replaced the edited config:\n{config}\n----- apt -----\n{log}");
    // postinst's try-restart restarts the sockets and the service; the start may still be
    // under way when apt returns.
    wait_for(
        "mailtls.service active again after the upgrade",
        Duration::from_secs(60),
        || {
            let state = m.sd.exec("systemctl show -p ActiveState --value mailtls.service").stdout;
            (state.trim() == "active").then_some(())
        },
        || format!("{}\n----- apt -----\n{log}", m.why()),
    );
    assert_ne!(m.show("MainPID"), before, "the running service was not restarted\n{log}");
    // The service's restart takes its sockets along (PartOf=), in one ordered transaction.
    // A try-restart of the socket units as well, as cargo-deb wrote it for one entry of all
    // units, raced: "Socket service mailtls.service already active, refusing", then a
    // service with no sockets binding 993 itself until systemd gave up.
    let journal = m.sd.exec("journalctl --no-pager -o cat").stdout;
    for failure in ["Failed to listen on mailtls-", "Failed to start mailtls.service", "cannot listen on"] {
        assert!(!journal.contains(failure), "{failure:?} in the journal\n{}", m.why());
    }
    for role in ["imaps", "pop3s"] {
        assert_eq!(m.is_enabled(&format!("mailtls-{role}.socket")), "enabled", "{role} after the upgrade");
        let state = m.sd.exec(&format!("systemctl is-active mailtls-{role}.socket")).stdout;
        assert_eq!(state.trim(), "active", "{role} after the upgrade\n{}", m.why());
    }
    m.fetch("imap", "implicit", "imaps", &m.certs);
}

/// Purge: the user and group, /etc/mailtls, /var/lib/mailtls, the units and their enable
/// links are gone, and nothing listens on the roles' ports.
fn purge_removes_the_user_config_state_and_enable_links(m: &Machine) {
    let log = m.root(&format!("{APT_PURGE} 2>&1"));
    assert_eq!(m.package_status(), "", "{log}");
    assert!(!m.sd.exec("getent passwd mailtls").success(), "user mailtls left\n{log}");
    assert!(!m.sd.exec("getent group mailtls").success(), "group mailtls left\n{log}");
    for path in ["/etc/mailtls", "/var/lib/mailtls", "/usr/lib/systemd/system/mailtls.service"] {
        assert!(!m.sd.exec(&format!("test -e {path}")).success(), "{path} left\n{log}");
    }
    let links = m.sd.exec("find /etc/systemd/system -name 'mailtls*'").stdout;
    assert!(links.trim().is_empty(), "enable links left:\n{links}");
    for role in ["imaps", "pop3s"] {
        let state = m.sd.exec(&format!("systemctl is-active mailtls-{role}.socket")).stdout;
        assert_ne!(state.trim(), "active", "{role} still listens after the purge\n{log}");
    }
    assert_ne!(m.show("ActiveState"), "active", "mailtls still runs after the purge");
}

#[test]
#[ignore = "needs root, podman and cargo-deb; run by tests/run.sh"]
fn the_debian_package_installs_serves_two_roles_upgrades_keeping_the_config_and_purges_clean() {
    if !can_run_here() {
        return;
    }
    let have_cargo_deb =
        std::process::Command::new("cargo-deb").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have_cargo_deb {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true, yet cargo-deb is missing");
        say("SKIPPED: the Debian package install test: cargo-deb is missing (cargo install cargo-deb --locked)");
        return;
    }
    let packages = build_packages();
    let m = Machine::boot(Privilege::Default);
    apt_install_creates_the_mailtls_user_and_leaves_every_unit_disabled(&m, &packages.first);
    let edited = edit_config_grant_the_key_and_enable_two_roles(&m);
    two_enabled_socket_units_serve_imaps_and_pop3s_as_the_mailtls_user(&m);
    upgrade_keeps_the_edited_config_and_restarts_the_running_service(&m, &packages.second, &edited);
    purge_removes_the_user_config_state_and_enable_links(&m);
    eprintln!("journal (package):\n{}", m.journal("mailtls.service"));
    let doc = fs::read_to_string(crate_root().join(INSTALL_DOC)).unwrap();
    for command in [
        BUILD_FIRST,
        APT_INSTALL_FIRST,
        GRANT_CERTBOT_KEY,
        ENABLE_TWO_ROLES,
        APT_UPGRADE,
        APT_PURGE,
        REVISION_2,
    ] {
        assert!(doc.contains(command), "docs/install.md's \"Debian package\" lacks `{command}`");
    }
}
