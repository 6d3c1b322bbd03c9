//! Real mail servers for the interop tests: a private Dovecot (IMAP, POP3, SASL for Postfix)
//! and a private Postfix (submission, MX, XCLIENT smtpd), with the mailtls binary in front.
//!
//! Everything runs from one temp dir under /tmp on 127.0.0.1 and ports picked at run time;
//! daemons log to files in that dir (never to a pipe a test waits on). [`Interop`] stops
//! every daemon it started when dropped, also when a test panics, and then prints the logs.
//! The exact Postfix and Dovecot settings below are the ones docs/postfix.md and docs/dovecot.md document.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a daemon may take to come up, or a client tool to finish, on a loaded machine.
pub const STARTUP: Duration = Duration::from_secs(30);
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The mailbox every scenario delivers to and reads from.
pub const USER: &str = "alice@mail.test";
pub const PASSWORD: &str = "secret";

/// PROXY v2 LOCAL (no addresses): what a health check sends to a listener with `haproxy`.
/// Postfix 3.7 refuses the v1 form `PROXY UNKNOWN` ("bad or missing protocol type").
const PROXY_V2_LOCAL: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";

/// Editing /etc/postfix/main.cf is not atomic: one fixture at a time in this process.
static POSTCONF: Mutex<()> = Mutex::new(());

/// Every port of one interop run.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub dovecot_imap: u16,
    pub dovecot_pop3: u16,
    pub postfix_mx: u16,
    pub postfix_submission: u16,
    pub postfix_xclient: u16,
    pub submissions: u16,
    pub submission: u16,
    pub mx: u16,
    pub imaps: u16,
    pub imap: u16,
    pub pop3s: u16,
    pub pop3: u16,
    pub mx_xclient: u16,
    pub submissions_xclient: u16,
}

impl Ports {
    /// Free ports, all held at once while choosing so none repeats.
    fn pick() -> Ports {
        let held: Vec<TcpListener> = (0..14).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let p: Vec<u16> = held.iter().map(|l| l.local_addr().unwrap().port()).collect();
        Ports {
            dovecot_imap: p[0],
            dovecot_pop3: p[1],
            postfix_mx: p[2],
            postfix_submission: p[3],
            postfix_xclient: p[4],
            submissions: p[5],
            submission: p[6],
            mx: p[7],
            imaps: p[8],
            imap: p[9],
            pop3s: p[10],
            pop3: p[11],
            mx_xclient: p[12],
            submissions_xclient: p[13],
        }
    }
}

/// What to start: the sslscan test needs only the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parts {
    Everything,
    ProxyOnly,
}

/// A private Dovecot + Postfix + mailtls. Fields drop in order: the proxy first, then the
/// backends, the temp dir last.
pub struct Interop {
    pub ports: Ports,
    mailtls: Option<Child>,
    postfix: Option<Postfix>,
    dovecot: Option<Dovecot>,
    pub dir: tempfile::TempDir,
}

impl Interop {
    pub fn start(parts: Parts) -> Interop {
        // Postfix runs as the postfix user: every parent of the dir must be traversable.
        let dir = tempfile::Builder::new().prefix("mailtls-interop-").tempdir_in("/tmp").unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let mut interop = Interop { ports: Ports::pick(), mailtls: None, postfix: None, dovecot: None, dir };
        interop.write_certificates();
        if parts == Parts::Everything {
            interop.dovecot = Some(Dovecot::start(interop.path(), &interop.ports));
            interop.postfix = Some(Postfix::start(interop.path(), &interop.ports));
        }
        interop.start_mailtls();
        interop
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The root CA the clients trust (the proxy serves leaf + intermediate).
    pub fn ca(&self) -> PathBuf {
        self.path().join("ca.pem")
    }

    pub fn maildir(&self) -> PathBuf {
        self.path().join("mail/alice/Maildir")
    }

    pub fn maillog(&self) -> String {
        read_lossy(&self.path().join("maillog"))
    }

    pub fn dovecot_log(&self) -> String {
        read_lossy(&self.path().join("dovecot.log"))
    }

    /// mailtls's log, without the terminal colours tracing adds.
    pub fn mailtls_log(&self) -> String {
        strip_ansi(&read_lossy(&self.path().join("mailtls.log")))
    }

    fn write_certificates(&self) {
        write_certificates(self.path());
    }

    fn start_mailtls(&mut self) {
        let p = self.ports;
        let d = self.path().display().to_string();
        let mut config = format!(
            "hostname = \"mx.mail.test\"\n\n[tls]\n[[tls.certificates]]\ncert = \"{d}/chain.pem\"\nkey = \"{d}/key.pem\"\n\n\
             [timeouts]\ndrain = 1\n"
        );
        let listeners = [
            ("submissions", "smtp", "implicit", "", p.submissions, p.postfix_submission, "v2", false),
            ("submission", "smtp", "starttls", "", p.submission, p.postfix_submission, "v2", false),
            ("mx", "smtp", "starttls", "require_tls = false\n", p.mx, p.postfix_mx, "v2", false),
            ("imaps", "imap", "implicit", "", p.imaps, p.dovecot_imap, "v2", false),
            ("imap", "imap", "starttls", "", p.imap, p.dovecot_imap, "v2", false),
            ("pop3s", "pop3", "implicit", "", p.pop3s, p.dovecot_pop3, "v2", false),
            ("pop3", "pop3", "starttls", "", p.pop3, p.dovecot_pop3, "v2", false),
            (
                "mx-xclient",
                "smtp",
                "starttls",
                "require_tls = false\n",
                p.mx_xclient,
                p.postfix_xclient,
                "none",
                true,
            ),
            (
                "submissions-xclient",
                "smtp",
                "implicit",
                "",
                p.submissions_xclient,
                p.postfix_xclient,
                "none",
                true,
            ),
        ];
        for (name, protocol, tls, extra, port, backend, proxy, xclient) in listeners {
            config.push_str(&format!(
                "\n[[listeners]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\ntls = \"{tls}\"\n{extra}\
                 listen = [\"127.0.0.1:{port}\"]\nbackend = \"127.0.0.1:{backend}\"\nproxy_protocol = \"{proxy}\"\n\
                 xclient = {xclient}\n"
            ));
        }
        let config_path = self.path().join("mailtls.toml");
        fs::write(&config_path, config).unwrap();
        let log = File::create(self.path().join("mailtls.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_mailtls"))
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the mailtls binary");
        self.mailtls = Some(child);
        for port in [p.submissions, p.submission, p.mx, p.imaps, p.imap, p.pop3s, p.pop3, p.mx_xclient] {
            wait_for_port(port, "mailtls", || self.mailtls_log());
        }
    }

    /// Waits until mailtls's opportunistic listener on `port` shows what it learned from
    /// Postfix (its EHLO probe runs at start): SIZE is Postfix's, never mailtls's own.
    pub fn wait_for_mx_probe(&self, port: u16) {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Ok(reply) = smtp_ehlo(port) {
                if reply.contains("SIZE") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the MX probe of port {port} never succeeded:\n{}",
                self.mailtls_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `count` messages sit in alice's maildir, and returns them (file bytes),
    /// oldest first.
    pub fn wait_for_messages(&self, count: usize) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + STARTUP;
        loop {
            let mut files: Vec<PathBuf> = ["new", "cur"]
                .iter()
                .filter_map(|sub| fs::read_dir(self.maildir().join(sub)).ok())
                .flatten()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            if files.len() >= count {
                files.sort();
                return files.iter().map(|f| fs::read(f).unwrap()).collect();
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {count} messages were delivered:\n{}",
                files.len(),
                self.maillog()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn print_logs(&self) {
        for (name, text) in [
            ("mailtls.log", self.mailtls_log()),
            ("maillog", self.maillog()),
            ("dovecot.log", self.dovecot_log()),
        ] {
            eprintln!("----- {name} -----\n{text}");
        }
    }
}

impl Drop for Interop {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        if let Some(mut child) = self.mailtls.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Postfix and Dovecot drop here, in that order, before the dir is removed.
        self.postfix.take();
        self.dovecot.take();
    }
}

/// A root CA, an intermediate and a leaf for localhost, mail.test and 127.0.0.1, so
/// clients check a real chain and host names (mbsync checks names only, not IPs); written
/// as ca.pem, chain.pem and key.pem in `dir`.
pub fn write_certificates(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_params = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.distinguished_name.push(DnType::CommonName, name);
        p
    };
    let root_key = KeyPair::generate().unwrap();
    let root = ca_params("mailtls interop root").self_signed(&root_key).unwrap();
    let mid_key = KeyPair::generate().unwrap();
    let mid = ca_params("mailtls interop intermediate").signed_by(&mid_key, &root, &root_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let names = ["localhost", "mail.test", "127.0.0.1"].map(String::from).to_vec();
    let mut leaf_params = CertificateParams::new(names).unwrap();
    leaf_params.distinguished_name.push(DnType::CommonName, "localhost");
    let leaf = leaf_params.signed_by(&leaf_key, &mid, &mid_key).unwrap();
    fs::write(dir.join("ca.pem"), root.pem()).unwrap();
    fs::write(dir.join("chain.pem"), format!("{}{}", leaf.pem(), mid.pem())).unwrap();
    fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
}

// ---- two Dovecots behind one routed mailtls port --------------------------------------------

/// The second mailbox, on the second Dovecot.
pub const OTHER_USER: &str = "bob@other.test";

/// Two Dovecot instances, each holding one user's mailbox (alice's on the first, bob's on
/// the second, one message each), behind one mailtls IMAPS and one POP3S port whose routes
/// send bob@other.test to the second and everyone else to the first.
pub struct RoutedPair {
    pub imaps: u16,
    pub pop3s: u16,
    mailtls: Option<Child>,
    dovecots: Vec<Dovecot>,
    pub dir: tempfile::TempDir,
}

impl RoutedPair {
    pub fn start() -> RoutedPair {
        let dir = tempfile::Builder::new().prefix("mailtls-routed-").tempdir_in("/tmp").unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let held: Vec<TcpListener> = (0..6).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let p: Vec<u16> = held.iter().map(|l| l.local_addr().unwrap().port()).collect();
        drop(held);
        write_certificates(dir.path());
        let mut pair = RoutedPair { imaps: p[4], pop3s: p[5], mailtls: None, dovecots: Vec::new(), dir };
        for (i, user) in [USER, OTHER_USER].into_iter().enumerate() {
            let home = pair.dir.path().join(format!("dovecot-{i}"));
            fs::create_dir_all(&home).unwrap();
            fs::set_permissions(&home, fs::Permissions::from_mode(0o755)).unwrap();
            let local = user.split('@').next().unwrap_or(user);
            let new = home.join(format!("mail/{local}/Maildir/new"));
            fs::create_dir_all(&new).unwrap();
            let message = format!("From: test@mail.test\r\nTo: {user}\r\nSubject: for {user}\r\n\r\nThis mailbox is {user}'s.\r\n");
            fs::write(new.join("1.seed"), message).unwrap();
            pair.dovecots.push(Dovecot::start_for(&home, user, p[2 * i], p[2 * i + 1]));
            run_ok(Command::new("chown").arg("-R").arg("nobody:nogroup").arg(home.join("mail")));
        }
        let d = pair.dir.path().display().to_string();
        let mut config = format!(
            "hostname = \"mx.mail.test\"\n\n[tls]\n[[tls.certificates]]\ncert = \"{d}/chain.pem\"\nkey = \"{d}/key.pem\"\n\n\
             [timeouts]\ndrain = 1\n"
        );
        for (name, protocol, port, first, second) in
            [("imaps", "imap", pair.imaps, p[0], p[2]), ("pop3s", "pop3", pair.pop3s, p[1], p[3])]
        {
            // Relative to the config file: docs/configuration.md's rule, exercised.
            let routes = format!(
                "default = \"127.0.0.1:{first}\"\n\n[routes]\n\"{OTHER_USER}\" = \"127.0.0.1:{second}\"\n"
            );
            fs::write(pair.dir.path().join(format!("routes-{protocol}.toml")), routes).unwrap();
            config.push_str(&format!(
                "\n[[listeners]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\ntls = \"implicit\"\n\
                 listen = [\"127.0.0.1:{port}\"]\nroutes = \"routes-{protocol}.toml\"\nproxy_protocol = \"v2\"\n"
            ));
        }
        pair.mailtls = Some(spawn_mailtls(pair.dir.path(), &config));
        for port in [pair.imaps, pair.pop3s] {
            wait_for_port(port, "mailtls", || pair.mailtls_log());
        }
        pair
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn mailtls_log(&self) -> String {
        strip_ansi(&read_lossy(&self.dir.path().join("mailtls.log")))
    }

    /// Both Dovecots' logs, first then second.
    pub fn dovecot_logs(&self) -> String {
        (0..2)
            .map(|i| read_lossy(&self.dir.path().join(format!("dovecot-{i}/dovecot.log"))))
            .collect::<Vec<_>>()
            .join("\n----- second dovecot -----\n")
    }

    /// The log of Dovecot `i` (0: alice's, 1: bob's).
    pub fn dovecot_log(&self, i: usize) -> String {
        read_lossy(&self.dir.path().join(format!("dovecot-{i}/dovecot.log")))
    }
}

impl Drop for RoutedPair {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- mailtls.log -----\n{}\n----- dovecot.log -----\n{}",
                self.mailtls_log(),
                self.dovecot_logs()
            );
        }
        if let Some(mut child) = self.mailtls.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.dovecots.clear();
    }
}

// ---- two Postfix mailbox servers behind one routed mailtls MX ------------------------------

/// The two mailboxes of [`RoutedMx`], one on each mailbox server.
pub const MX_USERS: [&str; 2] = ["alice@one.test", "bob@two.test"];

/// Two Postfix mailbox servers (the first holds alice@one.test, the second bob@two.test,
/// each delivering into its own maildirs) behind one mailtls MX listener whose routes send
/// @two.test to the second and everyone else to the first; and a third Postfix, the
/// sending MTA, with mailtls as its relayhost and its SMTP client bound to 127.0.0.2 (so
/// the mailbox servers' logs prove the PROXY header carried the sender's real address).
/// The sender retries soon (queue_run_delay and backoff of [`RoutedMx::RETRY`]).
pub struct RoutedMx {
    /// mailtls's MX listener, and the sending Postfix's own smtpd (mail is injected there).
    pub mx: u16,
    pub sender_smtpd: u16,
    mailtls: Option<Child>,
    postfixes: Vec<Postfix>,
    pub dir: tempfile::TempDir,
}

impl RoutedMx {
    /// The sending Postfix's queue_run_delay, minimal_backoff_time (maximal: twice this).
    pub const RETRY: &'static str = "3s";

    pub fn start() -> RoutedMx {
        let dir = tempfile::Builder::new().prefix("mailtls-routed-mx-").tempdir_in("/tmp").unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let held: Vec<TcpListener> = (0..4).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let p: Vec<u16> = held.iter().map(|l| l.local_addr().unwrap().port()).collect();
        drop(held);
        write_certificates(dir.path());
        let mut site = RoutedMx { mx: p[2], sender_smtpd: p[3], mailtls: None, postfixes: Vec::new(), dir };
        for (i, user) in MX_USERS.into_iter().enumerate() {
            let home = site.server_dir(i);
            fs::create_dir_all(home.join("mail")).unwrap();
            fs::set_permissions(&home, fs::Permissions::from_mode(0o755)).unwrap();
            run_ok(Command::new("chown").arg("nobody:nogroup").arg(home.join("mail")));
            site.postfixes.push(mailbox_server(&home, user, p[i]));
        }
        site.postfixes.push(sending_mta(&site.server_dir(2), p[3], site.mx));
        let d = site.dir.path().display().to_string();
        let routes =
            format!("default = \"127.0.0.1:{}\"\n\n[routes]\n\"@two.test\" = \"127.0.0.1:{}\"\n", p[0], p[1]);
        fs::write(site.dir.path().join("routes.toml"), routes).unwrap();
        let config = format!(
            "hostname = \"mx.routed.test\"\n\n[tls]\n[[tls.certificates]]\ncert = \"{d}/chain.pem\"\nkey = \"{d}/key.pem\"\n\n\
             [timeouts]\ndrain = 1\n\n[[listeners]]\nname = \"mx\"\nprotocol = \"smtp\"\ntls = \"starttls\"\n\
             require_tls = false\nlisten = [\"127.0.0.1:{}\"]\nroutes = \"routes.toml\"\nproxy_protocol = \"v2\"\n",
            site.mx
        );
        site.mailtls = Some(spawn_mailtls(site.dir.path(), &config));
        wait_for_port(site.mx, "mailtls", || site.mailtls_log());
        // The EHLO mailtls answers itself shows the default server's extensions once probed.
        let until = Instant::now() + STARTUP;
        while !smtp_ehlo(site.mx).is_ok_and(|reply| reply.contains("CHUNKING")) {
            assert!(Instant::now() < until, "the MX probe never succeeded:\n{}", site.mailtls_log());
            std::thread::sleep(Duration::from_millis(100));
        }
        site
    }

    /// 0 and 1: the mailbox servers; 2: the sending MTA.
    fn server_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(["one", "two", "sender"][i])
    }

    pub fn maillog(&self, i: usize) -> String {
        read_lossy(&self.server_dir(i).join("maillog"))
    }

    pub fn mailtls_log(&self) -> String {
        strip_ansi(&read_lossy(&self.dir.path().join("mailtls.log")))
    }

    /// The messages delivered to mailbox server `i`'s user so far.
    pub fn delivered(&self, i: usize) -> Vec<String> {
        let local = MX_USERS[i].split('@').next().unwrap_or_default();
        let new = self.server_dir(i).join(format!("mail/{local}/Maildir/new"));
        let mut out: Vec<String> =
            fs::read_dir(new).into_iter().flatten().flatten().map(|e| read_lossy(&e.path())).collect();
        out.sort();
        out
    }

    /// Waits (up to `within`) until `done` holds, polling.
    pub fn wait(&self, within: Duration, done: impl Fn(&RoutedMx) -> bool) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if done(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        done(self)
    }
}

impl Drop for RoutedMx {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- mailtls.log -----\n{}", self.mailtls_log());
            for (i, name) in ["one", "two", "sender"].iter().enumerate() {
                eprintln!("----- {name} maillog -----\n{}", self.maillog(i));
            }
        }
        if let Some(mut child) = self.mailtls.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.postfixes.clear();
    }
}

/// The mailtls binary on `config`, written to DIR/mailtls.toml, logging to DIR/mailtls.log.
pub fn spawn_mailtls(dir: &Path, config: &str) -> Child {
    let config_path = dir.join("mailtls.toml");
    fs::write(&config_path, config).unwrap();
    let log = File::create(dir.join("mailtls.log")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_mailtls"))
        .arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "info,mailtls=debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start the mailtls binary")
}

/// main.cf lines every private Postfix of [`RoutedMx`] shares.
fn private_main_cf(dir: &Path, hostname: &str) -> String {
    let d = dir.display();
    format!(
        "compatibility_level = 3.6\nqueue_directory = {d}/queue\ndata_directory = {d}/data\n\
         mail_owner = postfix\nsetgid_group = postdrop\nmyhostname = {hostname}\ninet_interfaces = 127.0.0.1\n\
         inet_protocols = ipv4\nmaillog_file = {d}/maillog\nmaillog_file_prefixes = {d}\n\
         smtpd_banner = $myhostname ESMTP\nmydestination =\nalias_maps =\nalias_database =\n\
         local_recipient_maps =\nsmtp_tls_security_level = none\nsmtpd_tls_security_level = none\n"
    )
}

/// A mailbox server holding `user` alone, its smtpd on `port` behind a PROXY header.
fn mailbox_server(dir: &Path, user: &str, port: u16) -> Postfix {
    let (local, domain) = user.split_once('@').unwrap_or((user, ""));
    let d = dir.display();
    let main_cf = format!(
        "{}mynetworks = 127.0.0.1/32\nvirtual_mailbox_domains = {domain}\nvirtual_mailbox_base = {d}/mail\n\
         virtual_mailbox_maps = inline:{{ {user}={local}/Maildir/ }}\n\
         virtual_uid_maps = static:65534\nvirtual_gid_maps = static:65534\n",
        private_main_cf(dir, &format!("mx.{domain}"))
    );
    let master_cf =
        format!("{MASTER_CF_BASE}{port} inet n - n - - smtpd -o smtpd_upstream_proxy_protocol=haproxy\n");
    Postfix::launch(dir, &main_cf, &master_cf, &[(port, Some(PROXY_V2_LOCAL))])
}

/// The sending MTA: accepts mail on `port` from 127.0.0.1 and relays all of it to mailtls.
fn sending_mta(dir: &Path, port: u16, mx: u16) -> Postfix {
    let retry = RoutedMx::RETRY;
    let main_cf = format!(
        "{}mynetworks = 127.0.0.0/8\nrelayhost = [127.0.0.1]:{mx}\nsmtp_bind_address = 127.0.0.2\n\
         queue_run_delay = {retry}\nminimal_backoff_time = {retry}\nmaximal_backoff_time = 6s\n",
        private_main_cf(dir, "sender.test")
    );
    let master_cf = format!("{MASTER_CF_BASE}{port} inet n - n - - smtpd\n");
    Postfix::launch(dir, &main_cf, &master_cf, &[(port, None)])
}

// ---- Dovecot ------------------------------------------------------------------------------

pub struct Dovecot {
    dir: PathBuf,
}

impl Dovecot {
    fn start(dir: &Path, ports: &Ports) -> Dovecot {
        Dovecot::start_for(dir, USER, ports.dovecot_imap, ports.dovecot_pop3)
    }

    /// A Dovecot in `dir` holding the one mailbox of `user` (password [`PASSWORD`]).
    pub fn start_for(dir: &Path, user: &str, imap: u16, pop3: u16) -> Dovecot {
        let config = Dovecot::config(dir, user, imap, pop3);
        Dovecot::launch(dir, &config, [imap, pop3], Some(PROXY_V2_LOCAL))
    }

    /// Prepares `dir` (mail directory, users file) and returns the config of
    /// [`Dovecot::start_for`]: listeners that take a PROXY header from
    /// `haproxy_trusted_networks`, docs/dovecot.md's recommended set-up.
    fn config(dir: &Path, user: &str, imap: u16, pop3: u16) -> String {
        let d = dir.display();
        for sub in ["base", "state", "mail"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // Deliveries (Postfix's virtual agent) and Dovecot's mail processes both run as nobody.
        run_ok(Command::new("chown").arg("nobody:nogroup").arg(dir.join("mail")));
        fs::write(dir.join("users"), format!("{user}:{{PLAIN}}{PASSWORD}\n")).unwrap();
        dovecot_config(&d.to_string(), imap, pop3)
    }

    /// Starts Dovecot on `config` and waits for its greeting on `ports` (after `header`).
    fn launch(dir: &Path, config: &str, ports: [u16; 2], header: Option<&[u8]>) -> Dovecot {
        fs::write(dir.join("dovecot.conf"), config).unwrap();
        let out = File::create(dir.join("dovecot.out")).unwrap();
        let status = Command::new("dovecot")
            .arg("-c")
            .arg(dir.join("dovecot.conf"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .status()
            .expect("run dovecot (is it installed? run tests/run.sh)");
        let dovecot = Dovecot { dir: dir.to_owned() };
        let why =
            || format!("{}\n{}", read_lossy(&dir.join("dovecot.out")), read_lossy(&dir.join("dovecot.log")));
        assert!(status.success(), "dovecot did not start: {}", why());
        for port in ports {
            wait_for_greeting(port, header, "dovecot", why);
        }
        dovecot
    }
}

/// The Dovecot config docs/dovecot.md documents (PROXY v2 from 127.0.0.0/8, no plaintext
/// logins without TLS) with everything under `d`: used here and in the sidecar's container.
pub fn dovecot_config(d: &str, imap: u16, pop3: u16) -> String {
    format!(
        r#"base_dir = {d}/base
state_dir = {d}/state
log_path = {d}/dovecot.log
listen = 127.0.0.1
ssl = no
protocols = imap pop3
default_internal_user = dovenull
default_login_user = dovenull
disable_plaintext_auth = yes
auth_mechanisms = plain login
auth_verbose = yes
haproxy_trusted_networks = 127.0.0.0/8
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={d}/mail/%n
}}
mail_location = maildir:{d}/mail/%n/Maildir
service imap-login {{
  inet_listener imap {{
    port = {imap}
    haproxy = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {pop3}
    haproxy = yes
  }}
}}
service auth {{
  unix_listener {d}/auth-client {{
    mode = 0666
  }}
}}
"#,
    )
}

/// Dovecot's files for a container, written to `home` on the host and mounted (or copied) at
/// `d` inside: docs/dovecot.md's config, alice's password and one message in her Maildir.
pub fn dovecot_home(home: &Path, d: &str, imap: u16, pop3: u16, message: &str) {
    let maildir = home.join("mail/alice/Maildir");
    for sub in
        [home.join("base"), home.join("state"), maildir.join("cur"), maildir.join("tmp"), maildir.join("new")]
    {
        fs::create_dir_all(sub).unwrap();
    }
    fs::write(maildir.join("new/1700000000.M1P1.container"), message).unwrap();
    fs::write(home.join("dovecot.conf"), dovecot_config(d, imap, pop3)).unwrap();
    fs::write(home.join("users"), format!("{USER}:{{PLAIN}}{PASSWORD}\n")).unwrap();
    // The mail processes run as nobody: 65534 on the host and in the Debian images.
    run_ok(Command::new("chown").args(["-R", "65534:65534"]).arg(home.join("mail")));
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let pid_file = self.dir.join("base/master.pid");
        if let Ok(pid) = fs::read_to_string(&pid_file) {
            let pid = pid.trim().to_owned();
            let _ = Command::new("kill").arg(&pid).stderr(Stdio::null()).status();
            wait_until_gone(&pid);
        }
    }
}

// ---- Postfix ------------------------------------------------------------------------------

struct Postfix {
    conf: PathBuf,
    queue: PathBuf,
}

/// The services a private Postfix needs (Debian's master.cf, trimmed): chroot off everywhere,
/// since the private queue has no chroot copies of /etc files.
const MASTER_CF_BASE: &str = "\
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
proxywrite unix  -       -       n       -       1       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
local      unix  -       n       n       -       -       local
virtual    unix  -       n       n       -       -       virtual
lmtp       unix  -       -       n       -       -       lmtp
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
";

impl Postfix {
    fn start(dir: &Path, ports: &Ports) -> Postfix {
        let d = dir.display();
        let main_cf = format!(
            r#"compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.mail.test
mydomain = mail.test
myorigin = mail.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
smtpd_banner = $myhostname ESMTP
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
smtpd_sasl_type = dovecot
smtpd_sasl_path = {d}/auth-client
smtpd_tls_security_level = none
smtpd_tls_auth_only = no
smtp_tls_security_level = none
virtual_mailbox_domains = mail.test
virtual_mailbox_base = {d}/mail
virtual_mailbox_maps = inline:{{ {USER}=alice/Maildir/ }}
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
"#
        );
        let master_cf = format!(
            "{MASTER_CF_BASE}\
             {mx} inet n - n - - smtpd -o smtpd_upstream_proxy_protocol=haproxy\n\
             {sub} inet n - n - - smtpd -o smtpd_upstream_proxy_protocol=haproxy -o smtpd_sasl_auth_enable=yes \
             -o smtpd_recipient_restrictions=permit_sasl_authenticated,reject \
             -o smtpd_relay_restrictions=permit_sasl_authenticated,reject\n\
             {xc} inet n - n - - smtpd -o smtpd_authorized_xclient_hosts=127.0.0.1/32\n",
            mx = ports.postfix_mx,
            sub = ports.postfix_submission,
            xc = ports.postfix_xclient,
        );
        Postfix::launch(
            dir,
            &main_cf,
            &master_cf,
            &[
                (ports.postfix_mx, Some(PROXY_V2_LOCAL)),
                (ports.postfix_submission, Some(PROXY_V2_LOCAL)),
                (ports.postfix_xclient, None),
            ],
        )
    }

    /// Starts a Postfix from `dir` with these main.cf and master.cf texts (main.cf names
    /// `dir`'s queue and data), and waits for a greeting on each of `ports` (sending the
    /// header given first, for smtpd with `smtpd_upstream_proxy_protocol`).
    fn launch(dir: &Path, main_cf: &str, master_cf: &str, ports: &[(u16, Option<&[u8]>)]) -> Postfix {
        let conf = dir.join("postfix");
        let queue = dir.join("queue");
        for sub in [&conf, &queue, &dir.join("data")] {
            fs::create_dir_all(sub).unwrap();
        }
        run_ok(Command::new("chown").arg("postfix").arg(dir.join("data")));
        fs::write(conf.join("main.cf"), main_cf).unwrap();
        fs::write(conf.join("master.cf"), master_cf).unwrap();
        authorize_config_directory(&conf);
        let out = File::create(dir.join("postfix.out")).unwrap();
        let status = Command::new("postfix")
            .arg("-c")
            .arg(&conf)
            .arg("start")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .status()
            .expect("run postfix (is it installed? run tests/run.sh)");
        let postfix = Postfix { conf: conf.clone(), queue };
        // Postfix tells why it did not start only to syslog or a terminal: ask `check` on one.
        let why = || {
            let check = run(
                Command::new("script")
                    .arg("-qc")
                    .arg(format!("postfix -c {} check", conf.display()))
                    .arg("/dev/null"),
                Duration::from_secs(20),
            );
            format!(
                "{}\npostfix check: {}{}\n{}",
                read_lossy(&dir.join("postfix.out")),
                check.stdout,
                check.stderr,
                read_lossy(&dir.join("maillog"))
            )
        };
        assert!(status.success(), "postfix did not start: {}", why());
        for &(port, header) in ports {
            wait_for_greeting(port, header, "postfix", why);
        }
        postfix
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let pid = fs::read_to_string(self.queue.join("pid/master.pid")).unwrap_or_default();
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(&self.conf)
            .arg("stop")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !pid.trim().is_empty() {
            wait_until_gone(pid.trim());
        }
    }
}

/// `postfix -c DIR` works only for directories the default main.cf lists. Entries of runs
/// whose temp dirs are gone are dropped on the way, so the list does not grow forever.
fn authorize_config_directory(conf: &Path) {
    let _one_at_a_time = POSTCONF.lock().unwrap_or_else(|e| e.into_inner());
    let current = run(Command::new("postconf").arg("-h").arg("alternate_config_directories"), STARTUP);
    let mut keep: Vec<String> = current
        .stdout
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|entry| !entry.is_empty() && Path::new(entry).is_dir())
        .map(str::to_owned)
        .collect();
    let ours = conf.display().to_string();
    if !keep.contains(&ours) {
        keep.push(ours);
    }
    let setting = format!("alternate_config_directories = {}", keep.join(", "));
    run_ok(Command::new("postconf").arg("-e").arg(setting));
}

// ---- processes and sockets --------------------------------------------------------------

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Runs `command` with its output in files (so a grandchild that keeps them open cannot
/// hang the test) and kills it after `timeout` (status `None`).
pub fn run(command: &mut Command, timeout: Duration) -> Output {
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base = std::env::temp_dir().join(format!("mailtls-run-{}-{n}", std::process::id()));
    let (out_path, err_path) = (base.with_extension("out"), base.with_extension("err"));
    let stdout = File::create(&out_path).unwrap();
    let stderr = File::create(&err_path).unwrap();
    let mut child = command
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e} (run tests/run.sh to install it)"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().unwrap() {
            Some(status) => break Some(status),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let output = Output { status, stdout: read_lossy(&out_path), stderr: read_lossy(&err_path) };
    let _ = fs::remove_file(out_path);
    let _ = fs::remove_file(err_path);
    output
}

fn run_ok(command: &mut Command) {
    let shown = format!("{command:?}");
    let out = run(command.stdin(Stdio::null()), STARTUP);
    assert!(out.success(), "{shown} failed: {}{}", out.stdout, out.stderr);
}

pub fn read_lossy(path: &Path) -> String {
    fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn wait_until_gone(pid: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new("/proc").join(pid).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn wait_for_port(port: u16, what: &str, why: impl Fn() -> String) {
    let deadline = Instant::now() + STARTUP;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} is not listening on {port}:\n{}", why());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls until the server on `port` greets (after `header`, if any), then says goodbye.
fn wait_for_greeting(port: u16, header: Option<&[u8]>, what: &str, why: impl Fn() -> String) {
    let deadline = Instant::now() + STARTUP;
    loop {
        if let Ok(greeting) = greet(port, header) {
            if greeting.starts_with("220 ") || greeting.starts_with("* OK") || greeting.starts_with("+OK") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{what} does not greet on port {port}:\n{}", why());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn greet(port: u16, header: Option<&[u8]>) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    if let Some(header) = header {
        s.write_all(header)?;
    }
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let bye: &[u8] = if text.starts_with("* ") { b"a LOGOUT\r\n" } else { b"QUIT\r\n" };
    let _ = s.write_all(bye);
    Ok(text)
}

/// A plaintext EHLO on a mailtls SMTP STARTTLS port: the whole reply.
pub fn smtp_ehlo(port: u16) -> std::io::Result<String> {
    let mut s = SmtpLines::connect(port, None)?;
    s.reply()?;
    s.send("EHLO probe.example")?;
    let reply = s.reply()?;
    let _ = s.send("QUIT");
    Ok(reply)
}

/// A tiny line client for plaintext dialogues, from a chosen source address.
pub struct SmtpLines {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl SmtpLines {
    pub fn connect(port: u16, source: Option<&str>) -> std::io::Result<SmtpLines> {
        let target: SocketAddr = ([127, 0, 0, 1], port).into();
        let stream = match source {
            None => TcpStream::connect(target)?,
            Some(ip) => {
                let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                let from: SocketAddr = format!("{ip}:0").parse().expect("source address");
                socket.bind(&from.into())?;
                socket.connect(&target.into())?;
                socket.into()
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(SmtpLines { stream, buf: Vec::new() })
    }

    pub fn send(&mut self, line: &str) -> std::io::Result<()> {
        self.stream.write_all(format!("{line}\r\n").as_bytes())
    }

    pub fn line(&mut self) -> std::io::Result<String> {
        loop {
            if let Some(lf) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=lf).collect();
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A whole SMTP reply, multi-line ones included.
    pub fn reply(&mut self) -> std::io::Result<String> {
        let mut out = String::new();
        loop {
            let line = self.line()?;
            let last = line.as_bytes().get(3) != Some(&b'-');
            out.push_str(&line);
            if last {
                return Ok(out);
            }
        }
    }
}

// ---- a Dovecot that trusts mailtls's address, behind listeners without PROXY headers --------

/// Issue 19's set-up, as Dovecot's documentation suggests for a proxy in front: plain
/// listeners (no `haproxy = yes`), `login_trusted_networks` = mailtls's address, mailtls's
/// IMAP and POP3 listeners with `proxy_protocol = "none"` and, when `xclient`, naming the
/// real client themselves (POP3 XCLIENT, IMAP ID x-originating-ip).
pub struct TrustingDovecot {
    pub pop3s: u16,
    pub pop3: u16,
    pub imaps: u16,
    pub imap: u16,
    mailtls: Option<Child>,
    dovecot: Option<Dovecot>,
    pub dir: tempfile::TempDir,
}

impl TrustingDovecot {
    pub fn start(xclient: bool) -> TrustingDovecot {
        let dir = tempfile::Builder::new().prefix("mailtls-trusting-").tempdir_in("/tmp").unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let held: Vec<TcpListener> = (0..6).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let p: Vec<u16> = held.iter().map(|l| l.local_addr().unwrap().port()).collect();
        drop(held);
        write_certificates(dir.path());
        let (dovecot_imap, dovecot_pop3) = (p[0], p[1]);
        let config = Dovecot::config(dir.path(), USER, dovecot_imap, dovecot_pop3)
            .replace("haproxy_trusted_networks = 127.0.0.0/8", "login_trusted_networks = 127.0.0.1/32")
            .replace("    haproxy = yes\n", "");
        assert!(!config.contains("haproxy"), "{config}");
        let dovecot = Dovecot::launch(dir.path(), &config, [dovecot_imap, dovecot_pop3], None);
        let mut it = TrustingDovecot {
            imaps: p[2],
            imap: p[3],
            pop3s: p[4],
            pop3: p[5],
            mailtls: None,
            dovecot: Some(dovecot),
            dir,
        };
        let d = it.dir.path().display().to_string();
        let mut text = format!(
            "hostname = \"mx.mail.test\"\n\n[tls]\n[[tls.certificates]]\ncert = \"{d}/chain.pem\"\nkey = \"{d}/key.pem\"\n\n\
             [timeouts]\ndrain = 1\n"
        );
        let listeners = [
            ("imaps", "imap", "implicit", it.imaps, dovecot_imap),
            ("imap", "imap", "starttls", it.imap, dovecot_imap),
            ("pop3s", "pop3", "implicit", it.pop3s, dovecot_pop3),
            ("pop3", "pop3", "starttls", it.pop3, dovecot_pop3),
        ];
        for (name, protocol, tls, port, backend) in listeners {
            text.push_str(&format!(
                "\n[[listeners]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\ntls = \"{tls}\"\n\
                 listen = [\"127.0.0.1:{port}\"]\nbackend = \"127.0.0.1:{backend}\"\nproxy_protocol = \"none\"\n\
                 xclient = {xclient}\n"
            ));
        }
        let config_path = it.dir.path().join("mailtls.toml");
        fs::write(&config_path, text).unwrap();
        let log = File::create(it.dir.path().join("mailtls.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_mailtls"))
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the mailtls binary");
        it.mailtls = Some(child);
        for port in [it.imaps, it.imap, it.pop3s, it.pop3] {
            wait_for_port(port, "mailtls", || it.mailtls_log());
        }
        it
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn mailtls_log(&self) -> String {
        strip_ansi(&read_lossy(&self.dir.path().join("mailtls.log")))
    }

    pub fn dovecot_log(&self) -> String {
        read_lossy(&self.dir.path().join("dovecot.log"))
    }
}

impl Drop for TrustingDovecot {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- mailtls.log -----\n{}\n----- dovecot.log -----\n{}",
                self.mailtls_log(),
                self.dovecot_log()
            );
        }
        if let Some(mut child) = self.mailtls.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.dovecot.take();
    }
}

// ---- a second mailtls in front of the same backends ---------------------------------------

/// Another mailtls binary in front of an [`Interop`]'s backends, with listeners of its own
/// (e.g. other policies side by side with the fixture's); stopped when dropped.
pub struct ExtraMailtls {
    child: Child,
    log: PathBuf,
    /// The listeners' ports, in the order given.
    pub ports: Vec<u16>,
}

impl ExtraMailtls {
    pub fn log(&self) -> String {
        strip_ansi(&read_lossy(&self.log))
    }
}

impl Drop for ExtraMailtls {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- {} -----\n{}", self.log.display(), self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Interop {
    /// Starts another mailtls named `name` with the fixture's certificate and these
    /// `[[listeners]]` tables, each with `PORT` where its listen port goes.
    pub fn extra_mailtls(&self, name: &str, listeners: &[String]) -> ExtraMailtls {
        let held: Vec<TcpListener> =
            listeners.iter().map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let ports: Vec<u16> = held.iter().map(|l| l.local_addr().unwrap().port()).collect();
        drop(held);
        let d = self.path().display().to_string();
        let mut config = format!(
            "hostname = \"mx.mail.test\"\n\n[tls]\n[[tls.certificates]]\ncert = \"{d}/chain.pem\"\nkey = \"{d}/key.pem\"\n\n\
             [timeouts]\ndrain = 1\n"
        );
        for (table, port) in listeners.iter().zip(&ports) {
            config.push_str(&format!("\n[[listeners]]\n{}\n", table.replace("PORT", &port.to_string())));
        }
        let config_path = self.path().join(format!("{name}.toml"));
        fs::write(&config_path, config).unwrap();
        let log = self.path().join(format!("{name}.log"));
        let out = File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_mailtls"))
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start the mailtls binary");
        let extra = ExtraMailtls { child, log, ports };
        for port in &extra.ports {
            wait_for_port(*port, name, || extra.log());
        }
        extra
    }
}
