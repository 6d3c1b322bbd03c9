//! Writes the operator's reference files into a directory: mailtls(8) and the shell
//! completions from the clap definitions (src/cli.rs), mailtls.toml(5) from
//! docs/configuration.md. Generated, never hand-written, so neither can drift.
//!
//!   cargo run --example manpages -- OUT_DIR
//!
//! packaging/build-deb.sh runs it; OUT_DIR then holds man/mailtls.8, man/mailtls.toml.5,
//! completions/mailtls.bash, completions/_mailtls (zsh) and completions/mailtls.fish.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;
use pulldown_cmark::{CodeBlockKind, Event, HeadingLevel, Parser, Tag, TagEnd};
use roff::{bold, italic, roman, Inline, Roff};

use mailtls::cli::Args;

const REFERENCE: &str = include_str!("../docs/configuration.md");
const SOURCE: &str = concat!("mailtls ", env!("CARGO_PKG_VERSION"));

/// Where the Debian package installs README.md; docs/ keeps its place beside it.
const DOC_DIR: &str = "/usr/share/doc/mailtls/";

/// Every page of docs/, as the README's table lists them; both man pages name them all
/// under FILES (tests/docs.rs checks that this list and docs/ agree).
const DOCS: &[(&str, &str)] = &[
    ("docs/install.md", "installing: the Debian package, from source with the systemd units, a container"),
    ("docs/configuration.md", "every key of mailtls.toml and an annotated example (also mailtls.toml(5))"),
    ("docs/port-roles.md", "the seven port roles, the phases of a connection, what the backend receives"),
    ("docs/postfix.md", "in front of Postfix: master.cf and main.cf, PROXY protocol or XCLIENT"),
    ("docs/dovecot.md", "in front of Dovecot: dovecot.conf, PROXY v2, which trusted networks are safe"),
    ("docs/exim.md", "in front of Exim: hosts_proxy, the submission AUTH setting, what Exim learns"),
    ("docs/opensmtpd.md", "in front of OpenSMTPD: a proxy-v2 listener, what it learns and cannot"),
    ("docs/cyrus.md", "in front of Cyrus IMAP: plaintext for mailtls's services only, IMAP ID"),
    ("docs/courier.md", "in front of Courier IMAP and POP3: loopback ports, MAXPERIP, no ID"),
    ("docs/routing.md", "routing IMAP and POP3 users to their mailbox server, inbound SMTP by recipient"),
    ("docs/certificates.md", "certbot, hot reload, several names, OCSP stapling, the trial certificate"),
    ("docs/operations.md", "signals, logs, reloads, limits, inbound PROXY, metrics, alerts, troubleshooting"),
    ("docs/security.md", "STARTTLS injection, address forgery, SMTP smuggling, bounded input"),
    ("docs/performance.md", "CPU and memory against stunnel, HAProxy and nginx; kernel TLS"),
    ("docs/reliability.md", "load, faults, hostile input, fuzzing and TLS posture, with figures"),
    ("docs/scale-out.md", "several replicas behind a load balancer, shared ticket keys"),
    ("docs/design-decisions.md", "choices made where the design is silent"),
    ("docs/layout.md", "the source tree, module by module"),
];

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: manpages OUT_DIR");
        return ExitCode::FAILURE;
    };
    match write_all(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("manpages: {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}

fn write_all(out: &Path) -> std::io::Result<()> {
    let man = out.join("man");
    let completions = out.join("completions");
    fs::create_dir_all(&man)?;
    fs::create_dir_all(&completions)?;
    fs::write(man.join("mailtls.8"), command_page()?)?;
    fs::write(man.join("mailtls.toml.5"), config_page())?;
    let mut cmd = Args::command();
    for (shell, file) in
        [(Shell::Bash, "mailtls.bash"), (Shell::Zsh, "_mailtls"), (Shell::Fish, "mailtls.fish")]
    {
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd, "mailtls", &mut text);
        fs::write(completions.join(file), text)?;
    }
    Ok(())
}

/// mailtls(8): clap_mangen's sections, then what an operator needs beyond the flags.
fn command_page() -> std::io::Result<Vec<u8>> {
    let man = clap_mangen::Man::new(Args::command())
        .title("mailtls")
        .section("8")
        .source(SOURCE)
        .manual("System Administration");
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    page.write_all(operator_sections().render().as_bytes())?;
    man.render_version_section(&mut page)?;
    Ok(page)
}

fn operator_sections() -> Roff {
    let mut r = Roff::new();
    r.control("SH", ["SIGNALS"]);
    r.control("TP", []).text([bold("SIGHUP")]);
    r.text([roman(
        "Re-read the configuration and the certificates; all of it loads and checks, or the running configuration stays.",
    )]);
    r.control("TP", []).text([bold("SIGTERM"), roman(", "), bold("SIGINT")]);
    r.text([roman("Stop accepting, let open sessions finish for timeouts.drain seconds, then exit 0.")]);
    r.control("SH", ["EXIT STATUS"]);
    r.text([roman(
        "0 on a clean stop or a passing --check or --healthcheck; 1 with one message on standard error otherwise. A configuration error names the file, the line and the key.",
    )]);
    r.control("SH", ["FILES"]);
    for (file, what) in [
        ("/etc/mailtls/mailtls.toml", "the configuration (Debian package); see mailtls.toml(5)"),
        ("/usr/lib/systemd/system/mailtls.service", "the service, Type=notify, started by its sockets"),
        ("/usr/lib/systemd/system/mailtls-*.socket", "one socket unit per port role, disabled until enabled"),
        ("/usr/share/mailtls/", "Prometheus alert rules and a Grafana dashboard"),
        ("/usr/share/doc/mailtls/README.md", "the front page: what mailtls is, a five-minute tour"),
        ("/usr/share/doc/mailtls/examples/", "example configurations"),
    ] {
        r.control("TP", []).text([italic(file)]);
        r.text([roman(what)]);
    }
    docs_files(&mut r);
    r.control("SH", ["SEE ALSO"]);
    r.text([
        bold("mailtls.toml"),
        roman("(5), "),
        bold("systemctl"),
        roman("(1), "),
        bold("systemd.socket"),
        roman("(5); the documentation pages under FILES, one per topic, linked from "),
        italic(format!("{DOC_DIR}README.md")),
    ]);
    r
}

/// mailtls.toml(5) from the reference: `##` becomes a section, `###` a key's subsection.
fn config_page() -> String {
    let mut r = Roff::new();
    r.control("TH", ["MAILTLS.TOML", "5", "", SOURCE, "File Formats"]);
    r.control("SH", ["NAME"]);
    r.text([roman("mailtls.toml - the configuration file of mailtls, a TLS front door for mail servers")]);
    r.control("SH", ["SYNOPSIS"]);
    r.text([italic("/etc/mailtls/mailtls.toml")]);
    // FILES goes before the reference's own closing "See also".
    let (reference, see_also) = REFERENCE.split_once("\n## See also\n").unwrap_or((REFERENCE, ""));
    let mut markdown = MarkdownToRoff::default();
    markdown.render(reference, &mut r);
    r.control("SH", ["FILES"]);
    r.control("TP", []).text([italic("/etc/mailtls/mailtls.toml")]);
    r.text([roman("the configuration (Debian package)")]);
    docs_files(&mut r);
    if !see_also.is_empty() {
        markdown.render(&format!("## See also\n{see_also}"), &mut r);
    }
    r.render()
}

/// The docs pages as FILES entries, under the path the Debian package installs them at.
fn docs_files(r: &mut Roff) {
    for (page, what) in DOCS {
        r.control("TP", []).text([italic(format!("{DOC_DIR}{page}"))]);
        r.text([roman(*what)]);
    }
}

/// A small renderer for the subset of markdown the reference uses: headings, paragraphs,
/// inline code and emphasis, lists, links and code blocks.
#[derive(Default)]
struct MarkdownToRoff {
    inlines: Vec<Inline>,
    heading: Option<HeadingLevel>,
    in_code_block: bool,
    emphasis: bool,
    strong: bool,
    started: bool,
}

impl MarkdownToRoff {
    fn render(&mut self, markdown: &str, r: &mut Roff) {
        for event in Parser::new(markdown) {
            self.event(event, r);
        }
    }

    fn event(&mut self, event: Event<'_>, r: &mut Roff) {
        match event {
            Event::Start(Tag::Heading { level, .. }) => {
                self.heading = Some(level);
                self.inlines.clear();
            }
            Event::End(TagEnd::Heading(level)) => self.heading_done(level, r),
            Event::Start(Tag::Paragraph) => self.inlines.clear(),
            Event::End(TagEnd::Paragraph) => self.paragraph_done(r),
            Event::Start(Tag::CodeBlock(CodeBlockKind::Fenced(_) | CodeBlockKind::Indented)) => {
                self.description(r);
                self.in_code_block = true;
                r.control("PP", []).control("RS", ["4"]).control("nf", []);
            }
            Event::End(TagEnd::CodeBlock) => {
                self.in_code_block = false;
                r.control("fi", []).control("RE", []);
            }
            Event::Start(Tag::Item) => self.inlines.clear(),
            Event::End(TagEnd::Item) => {
                r.control("IP", ["\\(bu", "2"]);
                r.text(std::mem::take(&mut self.inlines));
            }
            Event::Start(Tag::Emphasis) => self.emphasis = true,
            Event::End(TagEnd::Emphasis) => self.emphasis = false,
            Event::Start(Tag::Strong) => self.strong = true,
            Event::End(TagEnd::Strong) => self.strong = false,
            Event::Text(text) if self.in_code_block => {
                for line in text.lines() {
                    r.text([roman(line)]);
                }
            }
            Event::Text(text) => self.inlines.push(self.styled(&text)),
            Event::Code(code) => self.inlines.push(bold(code.as_ref())),
            Event::SoftBreak | Event::HardBreak => self.inlines.push(roman(" ")),
            _ => {}
        }
    }

    fn styled(&self, text: &str) -> Inline {
        if self.strong {
            bold(text)
        } else if self.emphasis {
            italic(text)
        } else {
            roman(text)
        }
    }

    /// The first text after the title opens the DESCRIPTION section.
    fn description(&mut self, r: &mut Roff) {
        if !self.started {
            self.started = true;
            r.control("SH", ["DESCRIPTION"]);
        }
    }

    fn heading_done(&mut self, level: HeadingLevel, r: &mut Roff) {
        self.heading = None;
        let text = plain(&std::mem::take(&mut self.inlines));
        match level {
            // The page's own title: NAME already says it.
            HeadingLevel::H1 => {}
            HeadingLevel::H2 => {
                self.started = true;
                r.control("SH", [text.to_uppercase().as_str()]);
            }
            _ => {
                r.control("SS", [text.as_str()]);
            }
        }
    }

    fn paragraph_done(&mut self, r: &mut Roff) {
        if self.heading.is_some() {
            return;
        }
        self.description(r);
        r.control("PP", []);
        r.text(std::mem::take(&mut self.inlines));
    }
}

/// Heading text without styling (roff control lines take plain arguments).
fn plain(inlines: &[Inline]) -> String {
    let mut r = Roff::new();
    r.text(inlines.to_vec());
    let text = r.to_roff();
    text.replace("\\fB", "").replace("\\fI", "").replace("\\fR", "").replace("\\-", "-").trim().to_owned()
}
