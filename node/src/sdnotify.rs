//! systemd's service notification protocol (`sd_notify`), for units with
//! `Type=notify` (deploy/systemd): the node sends `READY=1` once it is ready
//! (the condition `/ready` reports), `STOPPING=1` when it starts to shut
//! down, and `WATCHDOG=1` every half `WATCHDOG_USEC` while it runs, when the
//! unit sets `WatchdogSec`. Not under systemd (no `NOTIFY_SOCKET`), it sends
//! nothing.
//!
//! Invariants: each message is one datagram to the socket `NOTIFY_SOCKET`
//! names (a path, or `@name` in the abstract namespace); a failed send is
//! logged and never stops the node.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where to send notifications, from the environment systemd sets.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// The notifier of this process, when it runs under systemd with
    /// `Type=notify`.
    pub fn from_env() -> Option<Self> {
        let target = std::env::var_os("NOTIFY_SOCKET")?;
        let target = target.to_string_lossy().into_owned();
        let addr = match target.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes())
            }
            None => SocketAddr::from_pathname(&target),
        };
        let (addr, socket) = match (addr, UnixDatagram::unbound()) {
            (Ok(a), Ok(s)) => (a, s),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(socket = %target, error = %e, "cannot use NOTIFY_SOCKET; systemd will not hear from this node");
                return None;
            }
        };
        // WATCHDOG_PID, when set, names the process the watchdog is for.
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .is_none_or(|pid| pid.trim() == std::process::id().to_string());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|us| *us > 0 && for_us)
            .map(Duration::from_micros);
        Some(Self { socket, addr, watchdog })
    }

    /// How often to send `WATCHDOG=1`: half the interval systemd set.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    /// Sends `message` (e.g. `READY=1`).
    pub fn notify(&self, message: &str) {
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            tracing::warn!(message, error = %e, "cannot notify systemd");
        }
    }
}
