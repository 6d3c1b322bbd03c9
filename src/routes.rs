//! The per-user backend map of a routed IMAP/POP3 listener (`routes = "PATH"`): a file
//! read, checked and swapped whole, so a session is always routed by one consistent map.
//!
//! Two formats, chosen by the file name: `*.toml` is TOML,
//!
//! ```toml
//! default = "10.0.0.1:143"             # required: everyone the map does not name
//! [routes]
//! "alice@example.org" = "10.0.0.2:143" # one address
//! "@example.com" = "10.0.0.3:143"      # a whole domain
//! ```
//!
//! and any other name is the line format of `routes/lines.rs` (`alice@example.org
//! 10.0.0.2:143`, one pair per line, as Postfix maps are written), which loads a million
//! addresses in well under a second where TOML takes several. Both become the same compact
//! map (`routes/compact.rs`).
//!
//! Matching: the exact address wins over its domain, the domain over `default`. The whole
//! name is compared without regard to ASCII case, the local part included: RFC 5321 lets a
//! server treat local parts case-sensitively, but the servers this routes to do not
//! (Dovecot lowercases user names by default, `auth_username_format = %Lu`), and a map that
//! told "Alice@" from "alice@" would split one user's logins across two mailbox servers.
//! Keys that differ only in case are therefore refused as duplicates.

mod compact;
mod lines;

use std::collections::BTreeMap;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Deserialize;
use tokio::sync::Notify;
use toml::Spanned;

use crate::config;
use crate::metrics::Metrics;
use compact::{Builder, Map};

/// Why a routes file was refused; every message names the file, and where it can, the line
/// and key, like config errors do.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("cannot read routes file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Syntax { path: PathBuf, line: usize, message: String },
    #[error("{path}:{line}: {key}: {message}")]
    Invalid { path: PathBuf, line: usize, key: String, message: String },
}

/// Which rule of the map chose a backend (logged, and counted in metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    Address,
    Domain,
    Default,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Rule::Address => "address",
            Rule::Domain => "domain",
            Rule::Default => "default",
        }
    }
}

/// One validated map. Keys are stored lowercased; domains without their `@`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routes {
    /// The backend of everyone the map does not name.
    pub default: String,
    map: Map,
}

impl Routes {
    fn of(map: Map) -> Routes {
        Routes { default: map.default().to_owned(), map }
    }

    /// The backend for the login name `user` and the rule that chose it. A name without
    /// `@` (a bare login name) can only match the default.
    pub fn route(&self, user: &str) -> (&str, Rule) {
        let user = user.to_ascii_lowercase();
        if let Some(backend) = self.map.address(&user) {
            return (backend, Rule::Address);
        }
        // The domain is what follows the last '@': a quoted local part may hold one itself.
        if let Some((_, domain)) = user.rsplit_once('@') {
            if let Some(backend) = self.map.domain(domain) {
                return (backend, Rule::Domain);
            }
        }
        (&self.default, Rule::Default)
    }

    /// How many addresses and domains the map names (for the log line of a load).
    pub fn size(&self) -> (usize, usize) {
        (self.map.addresses(), self.map.domain_count())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoutes {
    default: Spanned<String>,
    #[serde(default)]
    routes: BTreeMap<Spanned<String>, Spanned<String>>,
}

/// Reads and validates the routes file at `path`, in the format its name says. Blocking
/// and, for a large map, long: call it off the async runtime's threads.
pub fn load(path: &Path) -> Result<Routes, RoutesError> {
    let read_error = |source| RoutesError::Read { path: path.to_owned(), source };
    if is_toml(path) {
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        return parse(path, &text);
    }
    let file = std::fs::File::open(path).map_err(read_error)?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    lines::read(path, BufReader::with_capacity(64 * 1024, file), size).map(Routes::of)
}

/// Whether `path` names a TOML map (`*.toml`); anything else is the line format.
pub fn is_toml(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("toml"))
}

/// Parses and validates TOML routes text; `path` is used in messages.
pub fn parse(path: &Path, text: &str) -> Result<Routes, RoutesError> {
    let raw: RawRoutes = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| config::line_of(text, s.start)).unwrap_or(0);
        RoutesError::Syntax { path: path.to_owned(), line, message: e.message().to_owned() }
    })?;
    let invalid = |key: String, span: std::ops::Range<usize>, message: String| RoutesError::Invalid {
        path: path.to_owned(),
        line: config::line_of(text, span.start),
        key,
        message,
    };
    let mut builder = Builder::with_capacity(raw.routes.len());
    builder
        .set_default(raw.default.get_ref())
        .map_err(|e| invalid("default".to_owned(), raw.default.span(), e.message))?;
    // File order, so that of two clashing keys the later one is named.
    let mut entries: Vec<_> = raw.routes.into_iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    for (key, value) in entries {
        builder.add(key.get_ref(), value.get_ref()).map_err(|e| {
            let span = if e.in_backend { value.span() } else { key.span() };
            invalid(format!("routes.{:?}", key.get_ref()), span, e.message)
        })?;
    }
    // The default was set above, so the builder always finishes.
    builder.finish().map(Routes::of).ok_or_else(|| RoutesError::Syntax {
        path: path.to_owned(),
        line: 0,
        message: "missing `default`".to_owned(),
    })
}

/// The map in service for one listener, replaced whole by a reload (file change, SIGHUP).
/// Sessions look it up when their client identifies itself, so a reload applies to every
/// login after it, and never to a session already routed.
pub struct RouteTable {
    pub path: PathBuf,
    current: ArcSwap<Routes>,
    metrics: Arc<Metrics>,
    /// Woken when a reload changed the default backend, whose capabilities are then learned
    /// again.
    pub default_changed: Notify,
    /// One reload at a time, so at most one new map is ever being built beside the old.
    reloading: Mutex<()>,
}

impl RouteTable {
    /// Loads the map at `path`; the caller decides what a failure means (start: fatal).
    pub fn load(path: &Path, metrics: Arc<Metrics>) -> Result<RouteTable, RoutesError> {
        let routes = load(path)?;
        log_loaded(path, &routes, "loaded");
        Ok(RouteTable::with(path, routes, metrics))
    }

    /// A table over an already validated map (a config reload loads before it swaps).
    pub fn with(path: &Path, routes: Routes, metrics: Arc<Metrics>) -> RouteTable {
        RouteTable {
            path: path.to_owned(),
            current: ArcSwap::from_pointee(routes),
            metrics,
            default_changed: Notify::new(),
            reloading: Mutex::new(()),
        }
    }

    pub fn current(&self) -> Arc<Routes> {
        self.current.load_full()
    }

    /// Reads the file again and swaps the new map in only if all of it is valid; otherwise
    /// the map in service stays. Returns whether the file's map is now in service. Blocking
    /// (see [`load`]): the watcher calls it on a blocking thread.
    pub fn reload(&self, trigger: &str) -> bool {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match load(&self.path) {
            Ok(routes) => {
                self.adopt(routes, trigger);
                true
            }
            Err(e) => {
                self.metrics.route_reload(false);
                tracing::error!(trigger, "routes reload refused, the map in service stays: {e}");
                false
            }
        }
    }

    /// Reads the file while no watcher reload of this table runs (a SIGHUP reload, which
    /// adopts the map once the whole config is checked). Blocking, like [`load`].
    pub fn load_exclusive(&self) -> Result<Routes, RoutesError> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        load(&self.path)
    }

    /// Puts a validated map in service (a no-op, not counted, when nothing changed).
    pub fn adopt(&self, routes: Routes, trigger: &str) {
        let old = self.current.load();
        if **old == routes {
            tracing::debug!(trigger, routes = %self.path.display(), "routes unchanged");
            return;
        }
        let default_changed = old.default != routes.default;
        log_loaded(&self.path, &routes, "reloaded");
        self.current.store(Arc::new(routes));
        self.metrics.route_reload(true);
        if default_changed {
            self.default_changed.notify_one();
        }
    }

    /// Counts a map that a config reload found invalid.
    pub fn refused(&self) {
        self.metrics.route_reload(false);
    }
}

fn log_loaded(path: &Path, routes: &Routes, what: &str) {
    let (addresses, domains) = routes.size();
    tracing::info!(
        routes = %path.display(),
        default = %routes.default,
        addresses,
        domains,
        "routes {what}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = r#"
default = "10.0.0.1:143"
[routes]
"alice@example.org" = "10.0.0.2:143"
"@example.org" = "10.0.0.3:143"
"Bob@Example.COM" = "[::1]:143"
"#;

    fn routes() -> Routes {
        parse(Path::new("/etc/mailtls/routes.toml"), MAP).expect("valid map")
    }

    fn error_of(text: &str) -> String {
        match parse(Path::new("/etc/mailtls/routes.toml"), text) {
            Ok(r) => panic!("map should have been refused: {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn address_beats_domain_beats_default() {
        let r = routes();
        assert_eq!(r.route("alice@example.org"), ("10.0.0.2:143", Rule::Address));
        assert_eq!(r.route("carol@example.org"), ("10.0.0.3:143", Rule::Domain));
        assert_eq!(r.route("dave@example.net"), ("10.0.0.1:143", Rule::Default));
        assert_eq!(r.route("bare-name"), ("10.0.0.1:143", Rule::Default));
        assert_eq!(r.route(""), ("10.0.0.1:143", Rule::Default));
        assert_eq!(r.route("@example.org"), ("10.0.0.3:143", Rule::Domain));
    }

    #[test]
    fn matching_ignores_case_in_both_parts() {
        let r = routes();
        assert_eq!(r.route("ALICE@EXAMPLE.ORG"), ("10.0.0.2:143", Rule::Address));
        assert_eq!(r.route("Carol@Example.Org"), ("10.0.0.3:143", Rule::Domain));
        assert_eq!(r.route("bob@example.com"), ("[::1]:143", Rule::Address));
    }

    #[test]
    fn the_domain_is_after_the_last_at() {
        let r = routes();
        assert_eq!(r.route("\"odd@name\"@example.org"), ("10.0.0.3:143", Rule::Domain));
        assert_eq!(r.route("alice@example.org.evil"), ("10.0.0.1:143", Rule::Default));
        assert_eq!(r.route("alice@sub.example.org"), ("10.0.0.1:143", Rule::Default));
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = error_of(&MAP.replace("\"10.0.0.3:143\"", "\"10.0.0.3\""));
        assert_eq!(e, "/etc/mailtls/routes.toml:5: routes.\"@example.org\": \"10.0.0.3\" is not host:port");
        let e = error_of(&MAP.replace("default = \"10.0.0.1:143\"", "default = \"x\""));
        assert!(e.starts_with("/etc/mailtls/routes.toml:2: default:"), "{e}");
        let e = error_of(&MAP.replace("\"Bob@Example.COM\"", "\"bob\""));
        assert!(e.starts_with("/etc/mailtls/routes.toml:6: routes.\"bob\": a key is a full address"), "{e}");
        let e = error_of(&format!("{MAP}\"ALICE@example.org\" = \"10.0.0.9:143\"\n"));
        assert!(e.contains(":7: routes.\"ALICE@example.org\": listed twice"), "{e}");
        let e = error_of(&MAP.replace("default = \"10.0.0.1:143\"\n", ""));
        assert!(e.contains("missing field `default`"), "{e}");
        let e = error_of(&format!("defualt = 1\n{MAP}"));
        assert!(e.starts_with("/etc/mailtls/routes.toml:1:"), "{e}");
        let e = error_of(&MAP.replace("[routes]", "[routes"));
        assert!(e.starts_with("/etc/mailtls/routes.toml:3:"), "{e}");
        for key in ["@", "a@", "@@x", "a b@x", "@.x", "@x."] {
            let e = error_of(&format!("default = \"h:1\"\n[routes]\n\"{key}\" = \"h:2\"\n"));
            assert!(e.contains(":3: routes."), "{key}: {e}");
        }
    }

    #[test]
    fn the_example_map_parses() {
        let r =
            parse(Path::new("routes.example.toml"), include_str!("../config/routes.example.toml")).unwrap();
        assert_eq!(r.route("Bob@EXAMPLE.com"), ("127.0.0.1:31143", Rule::Domain));
    }

    #[test]
    fn the_example_maps_say_the_same_in_both_formats() {
        let dir = tempfile::tempdir().unwrap();
        let lines = dir.path().join("routes.example.map");
        std::fs::write(&lines, include_str!("../config/routes.example.map")).unwrap();
        let toml =
            parse(Path::new("routes.example.toml"), include_str!("../config/routes.example.toml")).unwrap();
        assert_eq!(load(&lines).unwrap(), toml);
    }

    #[test]
    fn an_empty_map_sends_everyone_to_the_default() {
        let r = parse(Path::new("r.toml"), "default = \"mail:143\"\n").unwrap();
        assert_eq!(r.route("anyone@anywhere"), ("mail:143", Rule::Default));
    }

    #[test]
    fn the_file_name_chooses_the_format() {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("routes.TOML");
        std::fs::write(&toml, MAP).unwrap();
        let lines = dir.path().join("routes.map");
        std::fs::write(
            &lines,
            "default 10.0.0.1:143\nalice@example.org 10.0.0.2:143\n@example.org 10.0.0.3:143\nBob@Example.COM [::1]:143\n",
        )
        .unwrap();
        assert_eq!(load(&toml).unwrap(), load(&lines).unwrap(), "the same map in both formats");
        std::fs::write(&lines, MAP).unwrap();
        let e = load(&lines).unwrap_err().to_string();
        assert!(e.contains("routes.map:2: expected `address backend`") && e.contains("named *.toml"), "{e}");
        let e = load(&dir.path().join("missing.map")).unwrap_err().to_string();
        assert!(e.starts_with("cannot read routes file"), "{e}");
    }

    #[test]
    fn a_reload_keeps_the_last_good_map() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        std::fs::write(&path, MAP).unwrap();
        let metrics = Arc::new(Metrics::new());
        let table = RouteTable::load(&path, metrics.clone()).unwrap();
        std::fs::write(&path, "default = \"nope\"\n").unwrap();
        assert!(!table.reload("test"));
        assert_eq!(table.current().route("alice@example.org").0, "10.0.0.2:143");
        std::fs::write(&path, MAP.replace("10.0.0.2:143", "10.0.0.7:143")).unwrap();
        assert!(table.reload("test"));
        assert_eq!(table.current().route("alice@example.org").0, "10.0.0.7:143");
        assert_eq!(
            (Metrics::get(&metrics.route_reloads_ok), Metrics::get(&metrics.route_reloads_failed)),
            (1, 1)
        );
    }
}
