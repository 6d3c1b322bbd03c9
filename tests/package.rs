//! The Debian package (packaging/, Cargo.toml's [package.metadata.deb]): the shipped
//! config passes --check and serves nothing public, the man pages are generated from the
//! clap definitions and the config reference, and the .deb holds what docs/install.md promises
//! with lintian reporting no error or warning. Installing, upgrading and purging it
//! under a real systemd is tests/container_systemd.rs's job.

mod common;

use common::process::BIN;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;

const SHIPPED_CONFIG: &str = include_str!("../packaging/mailtls.toml");

fn crate_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn have(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success())
}

/// The `FileDescriptorName=` of every socket unit in systemd/.
fn socket_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(crate_path("systemd")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "socket") {
            let text = std::fs::read_to_string(&path).unwrap();
            names.extend(
                text.lines().filter_map(|l| l.strip_prefix("FileDescriptorName=")).map(str::to_owned),
            );
        }
    }
    assert!(names.len() >= 7, "socket units not found: {names:?}");
    names
}

#[test]
fn shipped_config_passes_check_and_serves_nothing_public() {
    let (ok, text) =
        run(Command::new(BIN).arg("--config").arg(crate_path("packaging/mailtls.toml")).arg("--check"));
    assert!(ok, "mailtls --check on the shipped config:\n{text}");
    assert!(text.contains("mailtls.toml: OK (1 listener, "), "{text}");
    let config = mailtls::config::parse(Path::new("/etc/mailtls/mailtls.toml"), SHIPPED_CONFIG).unwrap();
    for l in &config.listeners {
        for addr in &l.listen {
            assert!(addr.ip().is_loopback(), "listener {} binds {addr}, which is not loopback", l.name);
        }
    }
    let admin = config.admin.expect("the shipped config serves metrics");
    assert!(admin.listen.ip().is_loopback(), "admin endpoint on {}", admin.listen);
}

// Enabling a socket unit before editing the config must stop the start (an inherited
// socket no listener claims is an error), not serve the trial listener on a public port.
#[test]
fn shipped_config_claims_no_socket_unit_until_edited() {
    let config = mailtls::config::parse(Path::new("/etc/mailtls/mailtls.toml"), SHIPPED_CONFIG).unwrap();
    let sockets = socket_names();
    for l in &config.listeners {
        assert!(!sockets.contains(&l.name), "listener {} would take a public socket unit's socket", l.name);
    }
    // ... and its commented-out roles are the socket units' names, ready to uncomment.
    let uncommented: String = SHIPPED_CONFIG
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(toml)
                if toml == "[[listeners]]" || toml.split_once(" = ").is_some_and(|(k, _)| is_key(k)) =>
            {
                toml
            }
            _ => l,
        })
        .flat_map(|l| [l, "\n"])
        .collect();
    let roles = mailtls::config::parse(Path::new("/etc/mailtls/mailtls.toml"), &uncommented)
        .unwrap_or_else(|e| panic!("the shipped config with its roles uncommented: {e}"));
    let named: BTreeSet<String> =
        roles.listeners.iter().map(|l| l.name.clone()).filter(|n| !n.starts_with("trial")).collect();
    assert_eq!(named, sockets, "the commented roles should match the socket units one for one");
}

fn is_key(word: &str) -> bool {
    !word.is_empty() && word.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

/// Runs the generator (examples/manpages.rs) into a fresh directory.
fn generate() -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let (ok, text) = run(Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--example", "manpages", "--"])
        .arg(out.path())
        .current_dir(env!("CARGO_MANIFEST_DIR")));
    assert!(ok, "cargo run --example manpages:\n{text}");
    out
}

#[test]
fn man_pages_and_completions_come_from_the_cli_and_the_reference() {
    let out = generate();
    let read = |rel: &str| std::fs::read_to_string(out.path().join(rel)).unwrap();
    let command_page = read("man/mailtls.8");
    for arg in mailtls::cli::Args::command().get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        let flag = format!("\\-\\-{}", long.replace('-', "\\-"));
        assert!(command_page.contains(&flag), "mailtls(8) lacks --{long}");
        assert!(
            read("completions/mailtls.bash").contains(&format!("--{long}")),
            "bash completion lacks --{long}"
        );
        assert!(read("completions/_mailtls").contains(&format!("--{long}")), "zsh completion lacks --{long}");
        assert!(
            read("completions/mailtls.fish").contains(&format!("-l {long}")),
            "fish completion lacks --{long}"
        );
    }
    let config_page = read("man/mailtls.toml.5");
    // "Reachable from the man pages": both list every docs page where the package puts it.
    for entry in std::fs::read_dir(crate_path("docs")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let installed = format!("/usr/share/doc/mailtls/docs/{name}").replace('-', "\\-");
        for (page, text) in [("mailtls(8)", &command_page), ("mailtls.toml(5)", &config_page)] {
            assert!(text.contains(&installed), "{page} does not list {installed}");
        }
    }
    let reference = std::fs::read_to_string(crate_path("docs/configuration.md")).unwrap();
    let keys: Vec<&str> =
        reference.lines().filter_map(|l| l.strip_prefix("### `")?.strip_suffix('`')).collect();
    assert!(keys.len() > 30, "{keys:?}");
    for key in keys {
        assert!(config_page.contains(&format!(".SS {key}\n")), "mailtls.toml(5) lacks {key}");
    }
    if !have("man") {
        eprintln!("SKIPPED: man not installed: the pages were not rendered with warnings on");
        return;
    }
    for page in ["man/mailtls.8", "man/mailtls.toml.5"] {
        let out = Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z"])
            .arg(out.path().join(page))
            .env("LC_ALL", "C.UTF-8")
            .output()
            .unwrap();
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && warnings.trim().is_empty(), "{page}: {warnings}");
    }
}

#[test]
fn every_lintian_override_has_its_reason_above_it() {
    let text = std::fs::read_to_string(crate_path("packaging/lintian-overrides")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let overrides = lines.iter().enumerate().filter(|(_, l)| l.starts_with("mailtls: "));
    let mut count = 0;
    for (i, line) in overrides {
        count += 1;
        assert!(i > 0 && lines[i - 1].starts_with("# "), "override without a reason above it: {line}");
    }
    assert!(count > 0);
}

#[test]
fn maintainer_scripts_are_valid_posix_sh() {
    for script in ["postinst", "postrm"] {
        let path = crate_path(&format!("packaging/debian/{script}"));
        let (ok, text) = run(Command::new("sh").arg("-n").arg(&path));
        assert!(ok, "{script}: {text}");
        let body = std::fs::read_to_string(&path).unwrap();
        assert!(body.contains("#DEBHELPER#"), "{script}: cargo-deb's systemd snippets go at #DEBHELPER#");
    }
}

/// Files docs/install.md's "Debian package" section promises (and every page of docs/, below).
const PROMISED: &[&str] = &[
    "./usr/bin/mailtls",
    "./etc/mailtls/mailtls.toml",
    "./usr/lib/systemd/system/mailtls.service",
    "./usr/lib/systemd/system/mailtls.service.d/debian.conf",
    "./usr/lib/systemd/system/mailtls-submissions.socket",
    "./usr/lib/systemd/system/mailtls-submission.socket",
    "./usr/lib/systemd/system/mailtls-mx.socket",
    "./usr/lib/systemd/system/mailtls-imaps.socket",
    "./usr/lib/systemd/system/mailtls-imap.socket",
    "./usr/lib/systemd/system/mailtls-pop3s.socket",
    "./usr/lib/systemd/system/mailtls-pop3.socket",
    "./usr/share/man/man8/mailtls.8.gz",
    "./usr/share/man/man5/mailtls.toml.5.gz",
    "./usr/share/bash-completion/completions/mailtls",
    "./usr/share/zsh/vendor-completions/_mailtls",
    "./usr/share/fish/vendor_completions.d/mailtls.fish",
    "./usr/share/doc/mailtls/README.md",
    "./usr/share/doc/mailtls/changelog.Debian.gz",
    "./usr/share/doc/mailtls/copyright",
    "./usr/share/doc/mailtls/examples/mailtls.example.toml",
    "./usr/share/mailtls/prometheus/mailtls-alerts.yml",
    "./usr/share/mailtls/grafana/mailtls.json",
    "./usr/share/lintian/overrides/mailtls",
];

#[test]
#[ignore = "builds the .deb (cargo-deb, dpkg-deb, lintian); tests/run.sh runs it"]
fn package_holds_what_it_promises_and_lintian_is_clean() {
    if !have("cargo-deb") || !have("dpkg-deb") {
        eprintln!("SKIPPED: cargo-deb or dpkg-deb missing (cargo install cargo-deb --locked; apt-get install dpkg-dev)");
        return;
    }
    let (ok, text) = run(Command::new(crate_path("packaging/build-deb.sh")).arg("--debug"));
    assert!(ok, "packaging/build-deb.sh --debug:\n{text}");
    let deb = crate_path(text.lines().last().expect("the .deb's path").trim());
    assert!(deb.extension().is_some_and(|e| e == "deb") && deb.exists(), "{text}");

    let (ok, contents) = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    assert!(ok, "{contents}");
    let files: BTreeSet<&str> = contents.lines().filter_map(|l| l.split_whitespace().nth(5)).collect();
    for promised in PROMISED {
        assert!(files.contains(promised), "{promised} is not in the package:\n{contents}");
    }
    // The README links docs/NAME.md, so the pages keep that place beside it.
    let mut pages = 0;
    for entry in std::fs::read_dir(crate_path("docs")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            pages += 1;
            let installed = format!("./usr/share/doc/mailtls/docs/{name}");
            assert!(files.contains(installed.as_str()), "{installed} is not in the package:\n{contents}");
        }
    }
    assert!(pages > 10, "{pages} docs pages");
    let control = tempfile::tempdir().unwrap();
    let (ok, text) = run(Command::new("dpkg-deb").arg("--control").arg(&deb).arg(control.path()));
    assert!(ok, "{text}");
    let read = |f: &str| std::fs::read_to_string(control.path().join(f)).unwrap_or_default();
    assert_eq!(read("conffiles").trim(), "/etc/mailtls/mailtls.toml", "upgrades must keep an edited config");
    assert!(read("control").contains("adduser"), "postinst uses adduser:\n{}", read("control"));
    assert!(read("postinst").contains("adduser --quiet --system"), "{}", read("postinst"));
    assert!(!read("postinst").contains("deb-systemd-invoke start"), "nothing may start on install");
    assert!(read("postrm").contains("deluser"), "purge removes the user it made");

    let unpacked = tempfile::tempdir().unwrap();
    let (ok, text) = run(Command::new("dpkg-deb").arg("--extract").arg(&deb).arg(unpacked.path()));
    assert!(ok, "{text}");
    let unit =
        std::fs::read_to_string(unpacked.path().join("usr/lib/systemd/system/mailtls.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/mailtls --config /etc/mailtls/mailtls.toml"), "{unit}");
    let settings: Vec<&str> = unit.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(!settings.iter().any(|l| l.contains("/usr/local")), "{unit}");
    let binary = unpacked.path().join("usr/bin/mailtls");
    let (ok, text) = run(Command::new(&binary)
        .arg("--config")
        .arg(unpacked.path().join("etc/mailtls/mailtls.toml"))
        .arg("--check"));
    assert!(ok, "the packaged binary on the packaged config:\n{text}");

    if !have("lintian") {
        eprintln!(
            "SKIPPED: lintian not installed (apt-get install lintian): the package was built but not linted"
        );
        return;
    }
    let (ok, text) =
        run(Command::new("lintian").args(["--pedantic", "--fail-on", "error,warning"]).arg(&deb));
    let complaints: Vec<&str> =
        text.lines().filter(|l| l.starts_with("E: ") || l.starts_with("W: ")).collect();
    assert!(ok && complaints.is_empty(), "lintian:\n{text}");
}
