//! The in-memory form of a routes map, built for a million addresses: every address in one
//! lowercased byte arena, a hash index of entry numbers, and backends interned once.
//!
//! Per address this holds the address's bytes, a 4-byte arena offset, a 2-byte backend
//! number and about 5 to 10 bytes of hash index (4-byte slots plus a control byte, at most
//! 7/8 full): some 32 to 40 bytes for "user123456@example.org", where a `HashMap<String,
//! String>` took about 500. Backends are few (mailbox servers), so each is stored once.
//! Hand-written rather than a crate: the index is hashbrown's `HashTable`; what is left is
//! the arena bookkeeping that no map crate offers for keys stored outside the table.

use std::collections::HashMap;
use std::hash::BuildHasher;

use hashbrown::HashTable;

/// Distinct backends a map may name (the backend number is a u16).
pub const MAX_BACKENDS: usize = u16::MAX as usize + 1;

/// What an entry did wrong, and whether the key or the backend is to blame (so the TOML
/// format can point at the right span).
#[derive(Debug)]
pub struct EntryError {
    pub in_backend: bool,
    pub message: String,
}

impl EntryError {
    fn key(message: impl Into<String>) -> EntryError {
        EntryError { in_backend: false, message: message.into() }
    }
    fn backend(message: String) -> EntryError {
        EntryError { in_backend: true, message }
    }
}

/// A validated map. Equality is by content in file order (the index is derived).
#[derive(Clone, Debug)]
pub struct Map {
    default: u16,
    parts: Parts,
}

/// What a map is made of, and a builder fills in.
#[derive(Clone, Debug, Default)]
struct Parts {
    backends: Vec<Box<str>>,
    /// The lowercased addresses, back to back in file order.
    arena: Vec<u8>,
    /// Where address `i` starts in `arena`; it ends where `i + 1` starts.
    starts: Vec<u32>,
    /// The backend number of address `i`.
    targets: Vec<u16>,
    /// Address numbers, hashed by the address's bytes.
    index: HashTable<u32>,
    hasher: std::hash::RandomState,
    /// Whole domains (`@example.org`), without the `@`; few, so a plain map.
    domains: HashMap<Box<str>, u16>,
}

impl PartialEq for Map {
    fn eq(&self, other: &Map) -> bool {
        let (a, b) = (&self.parts, &other.parts);
        self.default() == other.default()
            && a.backends == b.backends
            && a.arena == b.arena
            && a.starts == b.starts
            && a.targets == b.targets
            && a.domains == b.domains
    }
}

impl Eq for Map {}

impl Map {
    pub fn default(&self) -> &str {
        &self.parts.backends[usize::from(self.default)]
    }

    /// The backend of the exact (already lowercased) address.
    pub fn address(&self, lower: &str) -> Option<&str> {
        let p = &self.parts;
        let hash = p.hasher.hash_one(lower.as_bytes());
        let id = p.index.find(hash, |&id| key_of(&p.arena, &p.starts, id) == lower.as_bytes())?;
        Some(&p.backends[usize::from(p.targets[*id as usize])])
    }

    /// The backend of the (already lowercased) domain.
    pub fn domain(&self, lower: &str) -> Option<&str> {
        self.parts.domains.get(lower).map(|&b| &*self.parts.backends[usize::from(b)])
    }

    pub fn addresses(&self) -> usize {
        self.parts.starts.len()
    }

    pub fn domain_count(&self) -> usize {
        self.parts.domains.len()
    }
}

fn key_of<'a>(arena: &'a [u8], starts: &[u32], id: u32) -> &'a [u8] {
    let i = id as usize;
    let start = starts[i] as usize;
    let end = starts.get(i + 1).map_or(arena.len(), |&e| e as usize);
    &arena[start..end]
}

/// Builds a [`Map`] entry by entry, validating as it goes; `finish` needs the default.
pub struct Builder {
    interned: HashMap<Box<str>, u16>,
    default: Option<u16>,
    parts: Parts,
}

impl Builder {
    /// `expected`: about how many addresses will come (sizes the arrays once).
    pub fn with_capacity(expected: usize) -> Builder {
        let parts = Parts {
            arena: Vec::with_capacity(expected.saturating_mul(24)),
            starts: Vec::with_capacity(expected),
            targets: Vec::with_capacity(expected),
            index: HashTable::with_capacity(expected),
            ..Parts::default()
        };
        Builder { interned: HashMap::new(), default: None, parts }
    }

    pub fn has_default(&self) -> bool {
        self.default.is_some()
    }

    pub fn set_default(&mut self, backend: &str) -> Result<(), EntryError> {
        self.default = Some(self.intern(backend)?);
        Ok(())
    }

    /// Adds `key` (an address or `@domain`, any case) routed to `backend`. A refused entry
    /// leaves the builder as it was.
    pub fn add(&mut self, key: &str, backend: &str) -> Result<(), EntryError> {
        let start = self.parts.arena.len();
        self.parts.arena.extend(key.bytes().map(|b| b.to_ascii_lowercase()));
        let added = self.add_arena_tail(start, backend);
        if added.is_err() {
            self.parts.arena.truncate(start);
        }
        added
    }

    /// Files the key at `arena[start..]`; on error the caller drops it from the arena.
    fn add_arena_tail(&mut self, start: usize, backend: &str) -> Result<(), EntryError> {
        let kind = classify(&self.parts.arena[start..])?;
        if kind == Kind::Domain {
            // Lowercased bytes of a &str are still UTF-8 (only ASCII letters change).
            let domain =
                String::from_utf8_lossy(&self.parts.arena[start + 1..]).into_owned().into_boxed_str();
            self.parts.arena.truncate(start);
            if self.parts.domains.contains_key(&domain) {
                return Err(EntryError::key(DUPLICATE));
            }
            let target = self.intern(backend)?;
            self.parts.domains.insert(domain, target);
            return Ok(());
        }
        let (Ok(offset), Ok(id)) = (u32::try_from(start), u32::try_from(self.parts.starts.len())) else {
            return Err(EntryError::key("the map is too large (more than 4 GiB of addresses)"));
        };
        let p = &self.parts;
        let hash = p.hasher.hash_one(&p.arena[start..]);
        let (old, new) = p.arena.split_at(start);
        if p.index.find(hash, |&other| key_of(old, &p.starts, other) == new).is_some() {
            return Err(EntryError::key(DUPLICATE));
        }
        let target = self.intern(backend)?;
        let p = &mut self.parts;
        p.starts.push(offset);
        p.targets.push(target);
        let (arena, starts, hasher) = (&p.arena, &p.starts, &p.hasher);
        p.index.insert_unique(hash, id, |&other| hasher.hash_one(key_of(arena, starts, other)));
        Ok(())
    }

    /// The finished map, its arrays trimmed to size; `None` without a default.
    pub fn finish(mut self) -> Option<Map> {
        let default = self.default?;
        let p = &mut self.parts;
        p.arena.shrink_to_fit();
        p.starts.shrink_to_fit();
        p.targets.shrink_to_fit();
        let (arena, starts, hasher) = (&p.arena, &p.starts, &p.hasher);
        p.index.shrink_to_fit(|&id| hasher.hash_one(key_of(arena, starts, id)));
        Some(Map { default, parts: self.parts })
    }

    /// The number of `backend`, checked the first time it is seen.
    fn intern(&mut self, backend: &str) -> Result<u16, EntryError> {
        if let Some(&n) = self.interned.get(backend) {
            return Ok(n);
        }
        crate::config::check_backend(backend).map_err(EntryError::backend)?;
        let n = u16::try_from(self.parts.backends.len()).map_err(|_| {
            EntryError::backend(format!("more than {MAX_BACKENDS} distinct backends in one map"))
        })?;
        self.parts.backends.push(backend.into());
        self.interned.insert(backend.into(), n);
        Ok(n)
    }
}

const DUPLICATE: &str = "listed twice (names are compared without regard to case)";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Address,
    Domain,
}

/// A key is a full address (`local@domain`) or a domain (`@domain`); `lower` is lowercased.
fn classify(lower: &[u8]) -> Result<Kind, EntryError> {
    const SHAPE: &str = "a key is a full address (\"alice@example.org\") or a domain (\"@example.org\")";
    // Whitespace and control characters are ASCII (or, beyond it, never in an address).
    let text = String::from_utf8_lossy(lower);
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(EntryError::key(format!("{SHAPE}; spaces and control characters cannot be part of one")));
    }
    let Some(at) = lower.iter().rposition(|&b| b == b'@') else { return Err(EntryError::key(SHAPE)) };
    let domain = &lower[at + 1..];
    if domain.is_empty() || domain.starts_with(b".") || domain.ends_with(b".") {
        return Err(EntryError::key(format!(
            "{SHAPE}; {:?} is not a domain",
            String::from_utf8_lossy(domain)
        )));
    }
    if at == 0 {
        return Ok(Kind::Domain);
    }
    if lower[0] == b'@' {
        return Err(EntryError::key(SHAPE));
    }
    Ok(Kind::Address)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_entry_leaves_the_map_as_it_was() {
        let mut b = Builder::with_capacity(2);
        b.set_default("10.0.0.1:143").unwrap();
        b.add("Alice@Example.org", "10.0.0.2:143").unwrap();
        assert!(!b.add("alice@EXAMPLE.ORG", "10.0.0.3:143").unwrap_err().in_backend, "duplicate key");
        assert!(b.add("bob@example.org", "no-port").unwrap_err().in_backend, "bad backend");
        assert!(!b.add("carol", "10.0.0.2:143").unwrap_err().in_backend, "not an address");
        b.add("bob@example.org", "10.0.0.2:143").unwrap();
        b.add("@Example.NET", "10.0.0.4:143").unwrap();
        assert!(b.add("@example.net", "10.0.0.4:143").is_err(), "duplicate domain");
        let map = b.finish().unwrap();
        assert_eq!(map.address("alice@example.org"), Some("10.0.0.2:143"));
        assert_eq!(map.address("bob@example.org"), Some("10.0.0.2:143"));
        assert_eq!(map.address("bob@example.or"), None);
        assert_eq!(map.address("carol"), None);
        assert_eq!(map.domain("example.net"), Some("10.0.0.4:143"));
        assert_eq!((map.addresses(), map.domain_count()), (2, 1));
        assert_eq!(map.parts.backends.len(), 3, "10.0.0.3 and no-port were never interned");
    }

    #[test]
    fn a_map_needs_a_default() {
        let mut b = Builder::with_capacity(0);
        b.add("a@b.c", "h:1").unwrap();
        assert!(b.finish().is_none());
    }
}
