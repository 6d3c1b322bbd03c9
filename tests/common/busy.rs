//! A file rewritten every 100 ms until dropped: the busy neighbour (a log, a shared volume,
//! an editor's swap file) that must not hold back a reload of the files beside it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct BusyNeighbour {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl BusyNeighbour {
    /// Starts rewriting `path` (created if missing) every 100 ms.
    pub fn start(path: &Path) -> BusyNeighbour {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, path) = (stop.clone(), path.to_owned());
        let thread = std::thread::spawn(move || {
            let mut writes = 0u64;
            while !flag.load(Ordering::Relaxed) {
                writes += 1;
                std::fs::write(&path, format!("write {writes}\n")).expect("neighbour file");
                std::thread::sleep(Duration::from_millis(100));
            }
            writes
        });
        BusyNeighbour { stop, thread: Some(thread) }
    }

    /// Stops writing; returns how many writes there were.
    pub fn stop(mut self) -> u64 {
        self.halt()
    }

    fn halt(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap_or(0))
    }
}

impl Drop for BusyNeighbour {
    fn drop(&mut self) {
        self.halt();
    }
}
