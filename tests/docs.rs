//! The documentation's structure (issue 16): README.md is the front page and starts with
//! the two commands; every page in docs/ is linked from it, named in the man pages' source
//! and installed by the Debian package; every relative link points at a file that exists
//! and, with a #fragment, at a heading of that file (GitHub's anchor rule).
//!
//! Plain files and no network: fast, never ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Component, Path, PathBuf};

use pulldown_cmark::{CodeBlockKind, Event, Parser, Tag, TagEnd};

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    fs::read_to_string(crate_root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The docs pages, as paths relative to the crate root: `docs/install.md`, ...
fn docs_pages() -> Vec<String> {
    let mut pages: Vec<String> = fs::read_dir(crate_root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    pages.sort();
    pages
}

/// Every markdown file whose links are checked: the README and the docs pages.
fn markdown_files() -> Vec<String> {
    let mut files = vec!["README.md".to_owned()];
    files.extend(docs_pages());
    files
}

/// A markdown file as GitHub shows it: its links (destination and the line they are on)
/// and the anchors of its headings.
struct Page {
    links: Vec<(String, usize)>,
    anchors: BTreeSet<String>,
}

fn parse(text: &str) -> Page {
    let mut links = Vec::new();
    let mut headings = Vec::new();
    let mut heading: Option<String> = None;
    for (event, range) in Parser::new(text).into_offset_iter() {
        match event {
            Event::Start(Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. }) => {
                let line = text[..range.start].matches('\n').count() + 1;
                links.push((dest_url.into_string(), line));
            }
            Event::Start(Tag::Heading { .. }) => heading = Some(String::new()),
            Event::End(TagEnd::Heading(_)) => headings.extend(heading.take()),
            Event::Text(t) | Event::Code(t) => {
                if let Some(h) = heading.as_mut() {
                    h.push_str(&t);
                }
            }
            _ => {}
        }
    }
    let mut anchors = BTreeSet::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for h in headings {
        let base = anchor(&h);
        let n = seen.entry(base.clone()).or_insert(0);
        anchors.insert(if *n == 0 { base.clone() } else { format!("{base}-{n}") });
        *n += 1;
    }
    Page { links, anchors }
}

/// GitHub's heading anchor: lowercase, punctuation dropped (`-` and `_` kept), each space
/// a `-`; a repeated anchor gets `-1`, `-2`... (handled by the caller).
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn anchors_follow_githubs_rule() {
    assert_eq!(
        anchor("Inbound SMTP routed by recipient (one MX, many mailbox servers)"),
        "inbound-smtp-routed-by-recipient-one-mx-many-mailbox-servers"
    );
    assert_eq!(anchor("`tls.certificates[].cert`"), "tlscertificatescert");
    assert_eq!(
        anchor("Troubleshooting: what the backend logs mean"),
        "troubleshooting-what-the-backend-logs-mean"
    );
    let page = parse("# A\n## Limits\ntext\n## Limits\n");
    assert_eq!(page.anchors, ["a", "limits", "limits-1"].map(String::from).into());
}

/// `dir/../x` -> `x`, so a link's target can be compared with the file list.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                assert!(out.pop(), "{} leaves the source tree", path.display());
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// What is wrong with the relative links of `files`, one line per broken link.
fn broken_links(files: &[(String, String)]) -> Vec<String> {
    let pages: BTreeMap<String, Page> =
        files.iter().map(|(name, text)| (name.clone(), parse(text))).collect();
    // Other markdown files of the tree a link points into (benches/RESULTS.md, say).
    let mut others: BTreeMap<String, Page> = BTreeMap::new();
    let mut broken = Vec::new();
    for (name, page) in &pages {
        for (dest, line) in &page.links {
            if dest.contains("://") || dest.starts_with("mailto:") {
                continue;
            }
            let (path, fragment) = match dest.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (dest.as_str(), None),
            };
            let target = if path.is_empty() {
                PathBuf::from(name)
            } else {
                normalize(&Path::new(name).parent().unwrap_or(Path::new("")).join(path))
            };
            let key = target.to_string_lossy().into_owned();
            let exists = pages.contains_key(&key) || crate_root().join(&target).exists();
            if !exists {
                broken.push(format!("{name}:{line}: {dest}: no file {key}"));
                continue;
            }
            let Some(fragment) = fragment else { continue };
            if !pages.contains_key(&key) && key.ends_with(".md") && !others.contains_key(&key) {
                others.insert(key.clone(), parse(&read(&key)));
            }
            match pages.get(&key).or_else(|| others.get(&key)) {
                Some(target_page) if target_page.anchors.contains(fragment) => {}
                Some(target_page) => broken.push(format!(
                    "{name}:{line}: {dest}: {key} has no heading #{fragment} (it has {:?})",
                    target_page.anchors
                )),
                None => {
                    broken.push(format!("{name}:{line}: {dest}: a #fragment into {key}, not a markdown page"))
                }
            }
        }
    }
    broken
}

#[test]
fn every_relative_link_points_at_a_file_and_heading_that_exist() {
    let files: Vec<(String, String)> = markdown_files().into_iter().map(|f| (f.clone(), read(&f))).collect();
    let links: usize = files.iter().map(|(_, t)| parse(t).links.len()).sum();
    assert!(links > 50, "only {links} links found: is the parser seeing them?");
    let broken = broken_links(&files);
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_link_checker_finds_a_missing_file_and_a_missing_heading() {
    let files = vec![
        (
            "README.md".to_owned(),
            "# R\n[ok](docs/a.md#two-words) [gone](docs/nope.md) [bad](docs/a.md#three)\n".to_owned(),
        ),
        (
            "docs/a.md".to_owned(),
            "# A\n## Two words\n[back](../README.md#r) [self](#a) [miss](#b)\n".to_owned(),
        ),
    ];
    let broken = broken_links(&files);
    assert_eq!(broken.len(), 3, "{broken:#?}");
    assert!(broken[0].contains("docs/nope.md"), "{broken:#?}");
    assert!(broken[1].contains("#three"), "{broken:#?}");
    assert!(broken[2].contains("docs/a.md:3: #b"), "{broken:#?}");
}

#[test]
fn every_docs_page_is_linked_from_the_readme() {
    let readme = parse(&read("README.md"));
    let linked: BTreeSet<String> =
        readme.links.iter().map(|(dest, _)| dest.split('#').next().unwrap_or_default().to_owned()).collect();
    let pages = docs_pages();
    assert!(pages.len() >= 12, "{pages:?}");
    let missing: Vec<&String> = pages.iter().filter(|p| !linked.contains(p.as_str())).collect();
    assert!(missing.is_empty(), "docs pages the README does not link: {missing:?}");
}

#[test]
fn the_readme_starts_with_the_run_and_test_commands_and_stays_a_front_page() {
    let readme = read("README.md");
    let mut first_block = None;
    let mut in_block = false;
    let mut text = String::new();
    for event in Parser::new(&readme) {
        match event {
            Event::Start(Tag::CodeBlock(CodeBlockKind::Fenced(_))) => in_block = true,
            Event::Text(t) if in_block => text.push_str(&t),
            Event::End(TagEnd::CodeBlock) => {
                first_block = Some(text);
                break;
            }
            _ => {}
        }
    }
    let block = first_block.expect("the README has a code block");
    let commands: Vec<&str> =
        block.lines().map(|l| l.split_once("  #").map_or(l, |(c, _)| c).trim()).collect();
    assert_eq!(
        commands,
        ["cargo run --release -- --config config/mailtls.example.toml", "tests/run.sh"],
        "the README's first block must be the two commands"
    );
    let before = &readme[..readme.find("```").unwrap_or_default()];
    assert!(before.lines().count() < 15, "the two commands must come first, not after {before:?}");
    let lines = readme.lines().count();
    assert!(lines <= 300, "README.md has {lines} lines: it is the front page, topics go to docs/");
}

/// The pages examples/manpages.rs lists in mailtls(8)'s FILES section.
fn man_page_docs() -> BTreeSet<String> {
    let source = read("examples/manpages.rs");
    source.split('"').filter(|s| s.starts_with("docs/") && s.ends_with(".md")).map(str::to_owned).collect()
}

#[test]
fn every_docs_page_is_named_in_the_man_pages_and_nothing_else() {
    let named = man_page_docs();
    let pages: BTreeSet<String> = docs_pages().into_iter().collect();
    let missing: Vec<_> = pages.difference(&named).collect();
    let stale: Vec<_> = named.difference(&pages).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "examples/manpages.rs: pages not named {missing:?}; named but not in docs/ {stale:?}"
    );
}

#[test]
fn the_debian_package_installs_every_docs_page_beside_the_readme() {
    let manifest: toml::Table = read("Cargo.toml").parse().unwrap();
    let assets = manifest["package"]["metadata"]["deb"]["assets"].as_array().expect("deb assets").clone();
    let assets: Vec<(String, String)> = assets
        .iter()
        .map(|a| {
            let a = a.as_array().expect("an asset is [source, destination, mode]");
            (a[0].as_str().unwrap_or_default().to_owned(), a[1].as_str().unwrap_or_default().to_owned())
        })
        .collect();
    // An asset installs `source` into the directory `into` when it names the file itself or
    // is a `DIR/*.md` glob over its directory.
    let installs = |source: &str, into: &str| {
        assets.iter().any(|(s, d)| {
            let covers = s == source
                || s.strip_suffix("*.md").is_some_and(|dir| {
                    source.strip_prefix(dir).is_some_and(|name| !name.contains('/') && name.ends_with(".md"))
                });
            covers && d == into
        })
    };
    assert!(installs("README.md", "usr/share/doc/mailtls/"), "{assets:?}");
    for page in docs_pages() {
        assert!(installs(&page, "usr/share/doc/mailtls/docs/"), "{page} is not installed: {assets:?}");
    }
}

#[test]
fn the_references_annotated_example_is_a_valid_config() {
    let reference = read("docs/configuration.md");
    let section = reference.split_once("\n## Annotated example\n").expect("the annotated example").1;
    let start = section.find("```toml\n").expect("its toml block") + "```toml\n".len();
    let end = start + section[start..].find("```").expect("closed");
    let parsed = mailtls::config::parse(Path::new("/etc/mailtls/mailtls.toml"), &section[start..end]);
    assert!(parsed.is_ok(), "{:?}", parsed.err());
}
