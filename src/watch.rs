//! Watching the files mailtls reloads (certificates, routes), so a change takes effect by
//! itself within a bounded time, however busy the directories that hold them are.
//!
//! Directories are watched, not the files: certbot renews by re-pointing symlinks under
//! live/, Kubernetes by swapping a `..data` link, and a watch on the file sees neither. Of
//! the events in a directory only those naming a watched file (or the `..data` link) count:
//! a log file or an editor's swap file written beside a certificate neither triggers a
//! reload nor holds one back. And the wait for the writes to settle has a ceiling, so even
//! a watched file rewritten without pause is reloaded every [`CEILING`].

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{Event, EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Quiet time after the last change before reloading: a renewal writes several files
/// (and certbot two symlinks), an editor saves in steps, and a half-written set must not
/// be read.
pub const DEBOUNCE: Duration = Duration::from_millis(400);

/// Longest a reload waits after the first change of a burst, however many follow: with
/// the quiet time, a change is in service within 2 s of its last write (the reload itself
/// takes milliseconds).
pub const CEILING: Duration = Duration::from_millis(1500);

/// The name of the link the Kubernetes atomic writer swaps in a mounted secret or config
/// map; the visible files are links through it (`tls.crt -> ..data/tls.crt`).
const KUBERNETES_DATA_LINK: &str = "..data";

/// Keeps the watch alive; dropping it stops watching.
pub struct Watch {
    _watcher: notify::RecommendedWatcher,
}

/// The directories to watch for `files`: each file's parent, once.
pub fn directories<'a>(files: impl IntoIterator<Item = &'a Path>) -> Vec<PathBuf> {
    let set: BTreeSet<PathBuf> = files
        .into_iter()
        .filter_map(|f| f.parent())
        .map(|d| if d.as_os_str().is_empty() { PathBuf::from(".") } else { d.to_owned() })
        .collect();
    set.into_iter().collect()
}

/// The names whose events matter: the watched files' own names (certbot's live/ links
/// carry them too) and the Kubernetes `..data` link. Compared by name, not by whole path:
/// a name shared by two watched directories costs at most one reload that finds nothing
/// new, and the paths notify reports need not be spelled like the configured ones.
fn relevant_names(files: &[PathBuf]) -> BTreeSet<OsString> {
    let mut names: BTreeSet<OsString> =
        files.iter().filter_map(|f| f.file_name()).map(OsString::from).collect();
    names.insert(OsString::from(KUBERNETES_DATA_LINK));
    names
}

/// Whether `event` may have changed one of the watched files. An event without paths is
/// the kernel's queue overflowing (a rescan): something may have been missed, so it counts.
fn is_relevant(event: &Event, names: &BTreeSet<OsString>) -> bool {
    is_change(&event.kind)
        && (event.paths.is_empty()
            || event.paths.iter().any(|p| p.file_name().is_some_and(|n| names.contains(n))))
}

/// Calls `on_change` once things have settled after a change to any of `files` (at most
/// [`CEILING`] after the first change of a burst); `what` names the files in log lines
/// ("certificate", "routes"). Must be called inside the tokio runtime.
pub fn spawn(
    files: &[PathBuf],
    what: &'static str,
    on_change: impl Fn() + Send + 'static,
) -> notify::Result<Watch> {
    let names = relevant_names(files);
    let (tx, rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        // An error from the watch itself may hide a change: reload to be sure.
        if event.as_ref().map_or(true, |e| is_relevant(e, &names)) {
            let _ = tx.send(());
        }
    })?;
    for dir in directories(files.iter().map(PathBuf::as_path)) {
        match watcher.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => tracing::debug!(dir = %dir.display(), "watching for {what} changes"),
            Err(e) => tracing::warn!(dir = %dir.display(), "cannot watch for {what} changes: {e}"),
        }
    }
    tokio::spawn(debounced(rx, on_change));
    Ok(Watch { _watcher: watcher })
}

/// Runs `on_change` for each settled burst of changes arriving on `rx`, until it closes.
async fn debounced(mut rx: mpsc::UnboundedReceiver<()>, on_change: impl Fn()) {
    let mut burst = Burst::default();
    loop {
        let due = burst.due();
        tokio::select! {
            change = rx.recv() => match change {
                Some(()) => burst.record(Instant::now()),
                None => return,
            },
            () = sleep_until(due) => {
                burst = Burst::default();
                on_change();
            }
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The changes seen since the last reload: when the first and the last arrived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Burst {
    span: Option<(Instant, Instant)>,
}

impl Burst {
    fn record(&mut self, now: Instant) {
        let first = self.span.map_or(now, |(first, _)| first);
        self.span = Some((first, now));
    }

    /// When to reload: after the quiet time, but never later than the ceiling allows.
    /// `None` while nothing has changed.
    fn due(&self) -> Option<Instant> {
        self.span.map(|(first, last)| (last + DEBOUNCE).min(first + CEILING))
    }
}

/// Reading files raises access events too, and the reload itself reads them: only real
/// changes count, or every reload would trigger the next.
fn is_change(kind: &EventKind) -> bool {
    matches!(kind, EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any)
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind, RenameMode};

    #[test]
    fn directories_are_parents_once() {
        let files = [Path::new("/a/b/cert.pem"), Path::new("/a/b/key.pem"), Path::new("/a/c/x.der")];
        assert_eq!(directories(files), vec![PathBuf::from("/a/b"), PathBuf::from("/a/c")]);
    }

    #[test]
    fn access_is_not_a_change() {
        use notify::event::AccessKind;
        assert!(!is_change(&EventKind::Access(AccessKind::Any)));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
    }

    fn event(kind: EventKind, paths: &[&str]) -> Event {
        paths.iter().fold(Event::new(kind), |e, p| e.add_path(PathBuf::from(p)))
    }

    #[test]
    fn only_watched_names_and_the_kubernetes_link_are_relevant() {
        let names = relevant_names(&[
            PathBuf::from("/etc/le/live/mx/fullchain.pem"),
            PathBuf::from("/srv/routes.toml"),
        ]);
        let write = EventKind::Modify(ModifyKind::Any);
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        assert!(!is_relevant(&event(write, &["/etc/le/live/mx/app.log"]), &names));
        assert!(!is_relevant(
            &event(EventKind::Create(CreateKind::File), &["/srv/.routes.toml.swp"]),
            &names
        ));
        assert!(is_relevant(&event(write, &["/srv/routes.toml"]), &names));
        // certbot: a link re-pointed under a temporary name; Kubernetes: ..data_tmp -> ..data.
        assert!(is_relevant(
            &event(rename, &["/etc/le/live/mx/fullchain.pem_tmp", "/etc/le/live/mx/fullchain.pem"]),
            &names
        ));
        assert!(is_relevant(&event(rename, &["/secret/..data_tmp", "/secret/..data"]), &names));
        // A rescan (no paths): changes may have been lost.
        assert!(is_relevant(&event(EventKind::Any, &[]), &names));
    }

    #[test]
    fn a_quiet_burst_is_due_after_the_quiet_time() {
        let t0 = Instant::now();
        let mut burst = Burst::default();
        assert_eq!(burst.due(), None);
        burst.record(t0);
        burst.record(t0 + Duration::from_millis(100));
        assert_eq!(burst.due(), Some(t0 + Duration::from_millis(100) + DEBOUNCE));
    }

    #[test]
    fn changes_every_100ms_cannot_postpone_past_the_ceiling() {
        let t0 = Instant::now();
        let mut burst = Burst::default();
        for i in 0..100 {
            burst.record(t0 + Duration::from_millis(100 * i));
            assert!(burst.due().is_some_and(|due| due <= t0 + CEILING), "postponed at change {i}");
        }
        assert!(DEBOUNCE + CEILING <= Duration::from_secs(2));
    }

    /// The loop itself on tokio's paused clock: with a change every 100 ms for 10 s, every
    /// change is followed by a reload within the ceiling, the last one included.
    #[tokio::test(start_paused = true)]
    async fn steady_changes_are_each_reloaded_within_the_ceiling() {
        use std::sync::{Arc, Mutex};
        let (tx, rx) = mpsc::unbounded_channel();
        let reloads = Arc::new(Mutex::new(Vec::new()));
        let seen = reloads.clone();
        let task = tokio::spawn(debounced(rx, move || seen.lock().unwrap().push(Instant::now())));
        let mut changes = Vec::new();
        for _ in 0..100 {
            changes.push(Instant::now());
            tx.send(()).unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(CEILING).await;
        let reloads = reloads.lock().unwrap().clone();
        for change in changes {
            let next = reloads.iter().find(|r| **r >= change);
            assert!(
                next.is_some_and(|r| *r - change <= CEILING),
                "a change was not reloaded within the ceiling"
            );
        }
        drop(tx);
        task.await.unwrap();
    }
}
