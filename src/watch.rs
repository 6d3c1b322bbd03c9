//! Watching the directories that hold files mailtls reloads (certificates, routes), so a
//! change takes effect by itself. Directories, not files: certbot renews by swapping
//! symlinks under live/, Kubernetes by swapping a `..data` link; a file watch sees neither.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{Event, EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Quiet time after the last change before reloading: a renewal writes several files
/// (and certbot two symlinks), an editor saves in steps, and a half-written set must not
/// be read.
pub const DEBOUNCE: Duration = Duration::from_millis(400);

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

/// Calls `on_change` once things have settled after any change in `dirs`; `what` names the
/// files in log lines ("certificate", "routes"). Must be called inside the tokio runtime.
pub fn spawn(
    dirs: &[PathBuf],
    what: &'static str,
    on_change: impl Fn() + Send + 'static,
) -> notify::Result<Watch> {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        if event.is_ok_and(|e| is_change(&e.kind)) {
            let _ = tx.send(());
        }
    })?;
    for dir in dirs {
        match watcher.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => tracing::debug!(dir = %dir.display(), "watching for {what} changes"),
            Err(e) => tracing::warn!(dir = %dir.display(), "cannot watch for {what} changes: {e}"),
        }
    }
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Wait until no change has arrived for DEBOUNCE.
            loop {
                match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            on_change();
        }
    });
    Ok(Watch { _watcher: watcher })
}

/// Reading files raises access events too, and the reload itself reads them: only real
/// changes count, or every reload would trigger the next.
fn is_change(kind: &EventKind) -> bool {
    matches!(kind, EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_parents_once() {
        let files = [Path::new("/a/b/cert.pem"), Path::new("/a/b/key.pem"), Path::new("/a/c/x.der")];
        assert_eq!(directories(files), vec![PathBuf::from("/a/b"), PathBuf::from("/a/c")]);
    }

    #[test]
    fn access_is_not_a_change() {
        use notify::event::{AccessKind, CreateKind};
        assert!(!is_change(&EventKind::Access(AccessKind::Any)));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
    }
}
