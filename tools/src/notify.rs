//! Notices to the service manager (`sd_notify(3)`, by the `sd-notify` crate) for the servers run as
//! `Type=notify` units (`bf serve`, `bf nbd serve`, `bf mount --foreground`): `READY=1` once a server is bound
//! and serving, `STOPPING=1` when a signal starts its shutdown. Without `NOTIFY_SOCKET` (not started by such a
//! unit) they do nothing; a notice that cannot be sent is logged, never fatal.

use sd_notify::NotifyState;

/// The server is ready; `status` is what `systemctl status` shows (where it serves).
pub(crate) fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The server has begun shutting down (finishing requests, committing, flushing).
pub(crate) fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "could not notify the service manager (NOTIFY_SOCKET)");
    }
}
