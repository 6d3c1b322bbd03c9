//! systemd integration: listening sockets inherited by name (socket activation) and state
//! notifications (READY, RELOADING, STOPPING, STATUS, WATCHDOG) to the service manager.
//!
//! Outside systemd every call here is a no-op: no NOTIFY_SOCKET, no LISTEN_FDS.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::Duration;

use listenfd::ListenFd;
use sd_notify::NotifyState;

/// The name under which the admin endpoint's socket may be passed.
pub const ADMIN_SOCKET_NAME: &str = "admin";

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("inherited socket #{index} ({name:?}) is not a listening TCP socket: {source}")]
    NotTcp { index: usize, name: String, source: std::io::Error },
    #[error(
        "systemd passed {fds} socket(s) but LISTEN_FDNAMES names {names}; \
         give every ListenStream= a FileDescriptorName="
    )]
    NameCount { fds: usize, names: usize },
}

/// Sockets passed by systemd, by FileDescriptorName (several ListenStream= lines may share
/// one name: 0.0.0.0:993 and [::]:993 both for "imaps").
#[derive(Debug, Default)]
pub struct Inherited {
    by_name: BTreeMap<String, Vec<TcpListener>>,
}

impl Inherited {
    /// No inherited sockets (not socket-activated; tests).
    pub fn none() -> Inherited {
        Inherited::default()
    }

    /// Takes the sockets systemd passed to this process. Call before any thread starts:
    /// taking them clears LISTEN_FDS / LISTEN_PID so nothing else adopts them twice.
    pub fn from_env() -> Result<Inherited, SystemdError> {
        // Read the names first: listenfd clears the variables it owns.
        let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
            .map(|v| v.split(':').map(str::to_owned).collect())
            .unwrap_or_default();
        let mut fds = ListenFd::from_env();
        let count = fds.len();
        if count > 0 && names.len() != count {
            return Err(SystemdError::NameCount { fds: count, names: names.len() });
        }
        let mut by_name: BTreeMap<String, Vec<TcpListener>> = BTreeMap::new();
        for (index, name) in names.into_iter().enumerate().take(count) {
            match fds.take_tcp_listener(index) {
                Ok(Some(listener)) => by_name.entry(name).or_default().push(listener),
                Ok(None) => {}
                Err(source) => return Err(SystemdError::NotTcp { index, name, source }),
            }
        }
        Ok(Inherited { by_name })
    }

    /// Removes and returns the sockets named `name` (empty when there are none).
    pub fn take(&mut self, name: &str) -> Vec<TcpListener> {
        self.by_name.remove(name).unwrap_or_default()
    }

    /// Names still unclaimed: each is a socket no listener will ever serve.
    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }
}

/// Sends `states` if running under a service manager. A lost notification must not stop
/// mail, so a failure is only logged.
fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("systemd notification failed: {e}");
    }
}

/// Every listener accepts.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload begins. MONOTONIC_USEC lets systemd (253+, Type=notify-reload) tell this
/// reload's RELOADING=1 from an older one; without a clock reading it is left out.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// Shutdown began: no new connections, sessions draining.
pub fn stopping(status: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// How often to ping the watchdog: half of WatchdogSec, as sd_watchdog_enabled(3) advises,
/// so one late tick does not kill a healthy process. `None` when no watchdog is set.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2).filter(|d| !d.is_zero())
}

pub fn watchdog() {
    notify(&[NotifyState::Watchdog]);
}
