//! Podman for the container tests: when they may run, the base images made once from
//! Debian's packages (no registry needed), and guards that remove what a test started.
//!
//! Every podman command runs with CONTAINERS_CONF=tests/containers.conf (runc, cgroupfs,
//! rlimits this kind of machine allows). Waits have deadlines; a guard dropped while its test
//! panics prints the container's log first, so a failure shows what the container said.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::mailservers::{run, Output};

/// One podman command (run, exec, cp, build of prebuilt layers) on a loaded machine.
pub const PODMAN_TIMEOUT: Duration = Duration::from_secs(180);
/// debootstrap of a minbase image with a few packages: 1-3 minutes here.
const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(900);

/// A Debian base image made with debootstrap and `podman import`. The tag names the
/// recipe: change `include` or `change`, bump the tag, and the next run makes it anew.
pub struct BaseImage {
    pub tag: &'static str,
    include: &'static [&'static str],
    change: Option<&'static str>,
    /// Each image is made once; two different ones may be made at the same time.
    making: &'static Mutex<()>,
}

/// The runtime base standing in for distroless: glibc and libgcc_s, nothing of ours.
pub const RUNTIME_BASE: BaseImage = BaseImage {
    tag: "localhost/mailtls-test-debian:bookworm-1",
    include: &[],
    change: None,
    making: &MAKING_RUNTIME,
};

/// systemd as PID 1, with Dovecot (the sidecar's mail server, and the backend of the units'
/// test, its submission service standing in for the SMTP server) and openssl: one image for
/// both saves a debootstrap. dovecot-core brings adduser, which with libc6 is all the
/// Debian package depends on: its install test checks that apt fetched nothing.
pub const SYSTEMD_BASE: BaseImage = BaseImage {
    tag: "localhost/mailtls-test-systemd:bookworm-2",
    include: &[
        "systemd",
        "systemd-sysv",
        "dbus",
        "dovecot-imapd",
        "dovecot-pop3d",
        "dovecot-submissiond",
        "openssl",
    ],
    change: Some(r#"CMD ["/sbin/init"]"#),
    making: &MAKING_SYSTEMD,
};

static MAKING_RUNTIME: Mutex<()> = Mutex::new(());
static MAKING_SYSTEMD: Mutex<()> = Mutex::new(());

impl BaseImage {
    /// The tag, after making the image if this machine does not have it yet.
    pub fn ensure(&self) -> &'static str {
        let _once = self.making.lock().unwrap_or_else(|e| e.into_inner());
        if podman(&["image", "exists", self.tag]).success() {
            return self.tag;
        }
        let started = Instant::now();
        let work = tempfile::Builder::new().prefix("mailtls-rootfs-").tempdir_in("/var/tmp").unwrap();
        let rootfs = work.path().join("rootfs");
        let mut debootstrap = Command::new("debootstrap");
        debootstrap.arg("--variant=minbase");
        if !self.include.is_empty() {
            debootstrap.arg(format!("--include={}", self.include.join(",")));
        }
        debootstrap.arg("bookworm").arg(&rootfs).arg(debian_mirror());
        let out = run(debootstrap.stdin(Stdio::null()), DEBOOTSTRAP_TIMEOUT);
        assert!(
            out.success(),
            "debootstrap for {}: {:?}\n{}\n{}",
            self.tag,
            out.status,
            out.stdout,
            out.stderr
        );
        // `tar | podman import`, as docs/install.md shows.
        let mut import = Command::new("sh");
        import.arg("-c").arg(r#"tar -C "$1" -c . | podman import ${2:+--change "$2"} - "$3""#).arg("sh");
        import.arg(&rootfs).arg(self.change.unwrap_or("")).arg(self.tag);
        let out = run(with_conf(&mut import).stdin(Stdio::null()), PODMAN_TIMEOUT);
        assert!(out.success(), "podman import {}: {}{}", self.tag, out.stdout, out.stderr);
        say(&format!("made base image {} in {:.0?}", self.tag, started.elapsed()));
        self.tag
    }
}

/// A mail server's image: Debian packages installed with apt on top of [`RUNTIME_BASE`], so
/// every backend of the interop matrix shares the one debootstrap (Debian's MTAs and IMAP
/// servers conflict with each other and with the host's Postfix and Dovecot, so each gets an
/// image of its own). The tag names the recipe: change `packages`, bump the tag.
pub struct DerivedImage {
    pub tag: &'static str,
    packages: &'static [&'static str],
    making: &'static Mutex<()>,
}

impl DerivedImage {
    /// An image recipe; `making` must be a static of its own (two images may be made at once).
    pub const fn new(
        tag: &'static str,
        packages: &'static [&'static str],
        making: &'static Mutex<()>,
    ) -> Self {
        DerivedImage { tag, packages, making }
    }

    /// The tag, after making the image (and its base) if this machine does not have it yet.
    pub fn ensure(&self) -> &'static str {
        let base = RUNTIME_BASE.ensure();
        let _once = self.making.lock().unwrap_or_else(|e| e.into_inner());
        if podman(&["image", "exists", self.tag]).success() {
            return self.tag;
        }
        let started = Instant::now();
        let work = tempfile::Builder::new().prefix("mailtls-image-").tempdir_in("/var/tmp").unwrap();
        // Package scripts may not start daemons in an image build (policy-rc.d 101), and
        // the mirror is the host's: the base's sources list may name another.
        let containerfile = format!(
            "FROM {base}\n\
             RUN printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d \\\n \
             && echo 'deb {mirror} bookworm main' > /etc/apt/sources.list \\\n \
             && apt-get update -qq \\\n \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends {packages} \\\n \
             && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d\n",
            mirror = debian_mirror(),
            packages = self.packages.join(" "),
        );
        std::fs::write(work.path().join("Containerfile"), containerfile).unwrap();
        let dir = work.path().display().to_string();
        let out = run(
            with_conf(Command::new("podman").args(["build", "--network", "host", "-t", self.tag, &dir]))
                .stdin(Stdio::null()),
            DEBOOTSTRAP_TIMEOUT,
        );
        assert!(out.success(), "podman build {}: {:?}\n{}\n{}", self.tag, out.status, out.stdout, out.stderr);
        say(&format!("made image {} in {:.0?}", self.tag, started.elapsed()));
        self.tag
    }
}

/// The Debian mirror apt uses here (debootstrap needs one; no other network is reachable).
fn debian_mirror() -> String {
    if let Ok(m) = std::env::var("MAILTLS_DEBIAN_MIRROR") {
        return m;
    }
    let sources = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    sources
        .lines()
        .find_map(|l| l.strip_prefix("URIs:"))
        .and_then(|uris| uris.split_whitespace().next())
        .unwrap_or("http://deb.debian.org/debian")
        .to_owned()
}

/// Whether the container tests can run here. As root with podman installed they run, and
/// then anything that does not work is a failure, never a skip; with CI=true they must run.
/// Anywhere else (a developer machine without root) they print a SKIPPED line.
pub fn can_run(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let podman = Command::new("podman").arg("--version").output().is_ok_and(|o| o.status.success());
    if root && podman {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(remove_leftovers);
        return true;
    }
    let why = match (root, podman) {
        (false, _) => "not root (podman with runc, pods and published ports needs root here)",
        _ => "podman is not installed (tests/run.sh installs podman, runc, debootstrap)",
    };
    assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true, yet {what} cannot run: {why}");
    say(&format!("SKIPPED: {what}: {why}"));
    false
}

/// Pods and containers of test runs that were killed before their guards ran: named
/// `mailtls-test-LABEL-PID-N`, for a PID that no longer runs.
fn remove_leftovers() {
    for (kind, list, field) in
        [("pod", &["pod", "ps"][..], "{{.Name}}"), ("container", &["ps", "-a"][..], "{{.Names}}")]
    {
        let mut args = list.to_vec();
        args.extend(["--format", field, "--filter", "name=^mailtls-test-"]);
        for name in podman(&args).stdout.lines() {
            let pid = name.rsplit('-').nth(1).unwrap_or_default();
            if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
                let rm: &[&str] =
                    if kind == "pod" { &["pod", "rm", "-f", "-t", "0"] } else { &["rm", "-f", "-t", "0"] };
                let _ = podman(&[rm, &[name]].concat());
            }
        }
    }
}

/// A line on the test process's own stderr: libtest hides `eprintln!` of passing tests, and
/// SKIPPED lines and figures must show in CI's output.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// tests/containers.conf: the podman settings of this kind of machine.
pub fn containers_conf() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/containers.conf")
}

fn with_conf(command: &mut Command) -> &mut Command {
    command.env("CONTAINERS_CONF", containers_conf())
}

/// `podman ARGS...` within PODMAN_TIMEOUT.
pub fn podman(args: &[&str]) -> Output {
    run(with_conf(Command::new("podman").args(args)).stdin(Stdio::null()), PODMAN_TIMEOUT)
}

/// `podman ARGS...`, which must succeed: its stdout.
pub fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(out.success(), "podman {}: {:?}\n{}{}", args.join(" "), out.status, out.stdout, out.stderr);
    out.stdout
}

static NAMES: AtomicUsize = AtomicUsize::new(0);

/// A name no other test of any run uses at the same time.
pub fn unique_name(label: &str) -> String {
    format!("mailtls-test-{label}-{}-{}", std::process::id(), NAMES.fetch_add(1, Ordering::Relaxed))
}

/// A pod, removed with its containers when dropped.
pub struct Pod {
    pub name: String,
}

impl Pod {
    /// A pod publishing each (host port on 127.0.0.1, container port).
    pub fn create(label: &str, publish: &[(u16, u16)]) -> Pod {
        let name = unique_name(label);
        let mut args = vec!["pod".to_owned(), "create".to_owned(), "--name".to_owned(), name.clone()];
        for (host, container) in publish {
            args.extend(["-p".to_owned(), format!("127.0.0.1:{host}:{container}")]);
        }
        podman_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        Pod { name }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = podman(&["pod", "rm", "-f", "-t", "0", &self.name]);
    }
}

/// A container started with `podman run -d`; removed when dropped, its log printed first
/// if the test is failing.
pub struct Container {
    pub name: String,
}

impl Container {
    /// `podman run -d --name NAME ARGS...`: `args` are run's options, then the image and
    /// its command.
    pub fn start(label: &str, args: &[&str]) -> Container {
        let name = unique_name(label);
        let mut all = vec!["run", "-d", "--name", &name];
        all.extend_from_slice(args);
        let out = podman(&all);
        let container = Container { name };
        assert!(
            out.success(),
            "podman run {}: {}{}\n{}",
            args.join(" "),
            out.stdout,
            out.stderr,
            container.logs()
        );
        container
    }

    /// `sh -c SCRIPT` inside the container.
    pub fn exec(&self, script: &str) -> Output {
        podman(&["exec", &self.name, "sh", "-c", script])
    }

    /// `sh -c SCRIPT` inside the container, which must succeed: its stdout.
    pub fn exec_ok(&self, script: &str) -> String {
        let out = self.exec(script);
        assert!(out.success(), "in {}: {script}: {:?}\n{}{}", self.name, out.status, out.stdout, out.stderr);
        out.stdout
    }

    /// Copies a host file into the container.
    pub fn copy_in(&self, from: &Path, to: &str) {
        podman_ok(&["cp", &from.display().to_string(), &format!("{}:{to}", self.name)]);
    }

    /// What the container wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        let out = podman(&["logs", &self.name]);
        format!("{}{}", out.stdout, out.stderr)
    }

    /// `podman inspect --format FORMAT`.
    pub fn inspect(&self, format: &str) -> String {
        podman_ok(&["inspect", "--format", format, &self.name]).trim().to_owned()
    }

    /// The exit code, once the container has exited within `within`.
    pub fn exit_code_within(&self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if self.inspect("{{.State.Status}}") == "exited" {
                return self.inspect("{{.State.ExitCode}}").parse().ok();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- log of container {} -----\n{}", self.name, self.logs());
        }
        let _ = podman(&["rm", "-f", "-t", "0", &self.name]);
    }
}

/// Polls `probe` every 100 ms until it yields a value; panics with `what` and `why()` after
/// `within`.
pub fn wait_for<T>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> Option<T>,
    why: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}\n{}", why());
        std::thread::sleep(Duration::from_millis(100));
    }
}
