//! systemd socket activation (the `sd_listen_fds(3)` protocol): the service manager binds the listening
//! socket, starts the server with it open as file descriptor 3, and says so in `LISTEN_FDS` (how many, from
//! fd 3 on) and `LISTEN_PID` (the process they are meant for). The server then accepts on that socket
//! instead of binding its own, so it can be started on the first connection, restarted without refusing
//! clients (the socket stays open in the manager meanwhile), and bound to a privileged port or a socket
//! path in `/run` without the rights to bind it. `bf nbd serve` (TCP or Unix) and `bf serve` (TCP) take it.
//!
//! [`passed_fds`] is the pure reading of the two variables; [`take_listener`] checks fd 3 (a socket, listening,
//! stream, TCP or Unix) and takes it, once per process.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// The first file descriptor passed (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// Why a socket passed by the service manager cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActivationError {
    /// `LISTEN_PID` or `LISTEN_FDS` is not a number.
    #[error("{var}={value:?} is not a number (set by a service manager's socket activation)")]
    Invalid {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// More than one socket was passed; this server listens on one.
    #[error("{count} sockets were passed (LISTEN_FDS={count}); give the socket unit one ListenStream=")]
    TooMany {
        /// How many.
        count: usize,
    },
    /// fd 3 is not a listening stream socket of a kind served (TCP or Unix).
    #[error("file descriptor 3 passed by socket activation is not {what}")]
    NotAListener {
        /// What it should have been.
        what: &'static str,
    },
    /// A system call on fd 3 failed.
    #[error("checking file descriptor 3 passed by socket activation: {0}")]
    Io(#[from] io::Error),
    /// The socket was taken already by this process.
    #[error("the socket passed by socket activation was taken already")]
    Taken,
}

/// How many sockets the service manager passed to the process `own_pid`, from the values of `LISTEN_PID`
/// and `LISTEN_FDS`: 0 when either is unset or `LISTEN_PID` names another process (the variables were
/// inherited, not meant for us), as `sd_listen_fds` does.
pub fn passed_fds(listen_pid: Option<&str>, listen_fds: Option<&str>, own_pid: u32) -> Result<usize, ActivationError> {
    let (Some(pid), Some(fds)) = (listen_pid, listen_fds) else { return Ok(0) };
    let invalid = |var, value: &str| ActivationError::Invalid { var, value: value.into() };
    let listen_pid: u32 = pid.trim().parse().map_err(|_| invalid("LISTEN_PID", pid))?;
    if listen_pid != own_pid {
        return Ok(0);
    }
    fds.trim().parse().map_err(|_| invalid("LISTEN_FDS", fds))
}

/// A listening socket passed by the service manager, not yet registered with a runtime.
#[derive(Debug)]
pub enum PassedListener {
    /// A TCP socket (`ListenStream=127.0.0.1:10809`).
    Tcp(std::net::TcpListener),
    /// A Unix socket (`ListenStream=/run/blockframe/nbd.sock`); its file belongs to the service manager.
    Unix(std::os::unix::net::UnixListener),
}

static TAKEN: AtomicBool = AtomicBool::new(false);

/// The socket passed by socket activation, if this process was given one: `None` when it was not (see
/// [`passed_fds`]). Removes `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` from the environment so that
/// child processes do not take them for theirs; call it before starting threads (the environment is
/// process-global). The socket is made close-on-exec and non-blocking.
pub fn take_listener() -> Result<Option<PassedListener>, ActivationError> {
    let var = |k| std::env::var(k).ok();
    let count = passed_fds(var("LISTEN_PID").as_deref(), var("LISTEN_FDS").as_deref(), std::process::id())?;
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    match count {
        0 => return Ok(None),
        1 => {}
        count => return Err(ActivationError::TooMany { count }),
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(ActivationError::Taken);
    }
    let fd = LISTEN_FDS_START;
    let family = check_listening_stream(fd)?;
    // SAFETY: fd 3 was handed to this process by the activation protocol (LISTEN_PID is our pid), it is an open
    // listening stream socket (checked above), and TAKEN makes this the only place that takes ownership of it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(&owned)?;
    let l = match family {
        libc::AF_INET | libc::AF_INET6 => PassedListener::Tcp(std::net::TcpListener::from(owned)),
        libc::AF_UNIX => PassedListener::Unix(std::os::unix::net::UnixListener::from(owned)),
        _ => return Err(ActivationError::NotAListener { what: "a TCP or Unix socket" }),
    };
    match &l {
        PassedListener::Tcp(t) => t.set_nonblocking(true)?,
        PassedListener::Unix(u) => u.set_nonblocking(true)?,
    }
    Ok(Some(l))
}

/// Checks that `fd` is a listening stream socket; returns its address family.
fn check_listening_stream(fd: RawFd) -> Result<libc::c_int, ActivationError> {
    let int_opt = |opt| -> io::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`, which is a c_int of that size; a bad fd is
        // reported as an error, not undefined behaviour.
        let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&mut v as *mut libc::c_int).cast(), &mut len) };
        if r == 0 {
            Ok(v)
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let socket_type = int_opt(libc::SO_TYPE).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTSOCK) => ActivationError::NotAListener { what: "a socket" },
        Some(libc::EBADF) => ActivationError::NotAListener { what: "open" },
        _ => ActivationError::Io(e),
    })?;
    if socket_type != libc::SOCK_STREAM {
        return Err(ActivationError::NotAListener { what: "a stream socket (ListenStream=)" });
    }
    if int_opt(libc::SO_ACCEPTCONN)? == 0 {
        return Err(ActivationError::NotAListener { what: "listening (Accept=no is needed)" });
    }
    int_opt(libc::SO_DOMAIN).map_err(ActivationError::Io)
}

fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_sockets_meant_for_this_process() {
        assert_eq!(passed_fds(None, None, 42).ok(), Some(0));
        assert_eq!(passed_fds(Some("42"), None, 42).ok(), Some(0));
        assert_eq!(passed_fds(None, Some("1"), 42).ok(), Some(0));
        assert_eq!(passed_fds(Some("41"), Some("1"), 42).ok(), Some(0), "inherited from a parent");
        assert_eq!(passed_fds(Some("42"), Some("1"), 42).ok(), Some(1));
        assert_eq!(passed_fds(Some("42"), Some("2"), 42).ok(), Some(2));
        assert!(matches!(
            passed_fds(Some("x"), Some("1"), 42),
            Err(ActivationError::Invalid { var: "LISTEN_PID", .. })
        ));
        assert!(matches!(
            passed_fds(Some("42"), Some("-1"), 42),
            Err(ActivationError::Invalid { var: "LISTEN_FDS", .. })
        ));
    }

    #[test]
    fn a_file_or_a_socket_that_does_not_listen_is_refused() {
        use std::os::fd::AsRawFd;
        let f = tempfile::tempfile().expect("tempfile");
        assert!(matches!(
            check_listening_stream(f.as_raw_fd()),
            Err(ActivationError::NotAListener { what: "a socket" })
        ));
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        assert!(matches!(check_listening_stream(a.as_raw_fd()), Err(ActivationError::NotAListener { .. })));
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        assert_eq!(check_listening_stream(l.as_raw_fd()).ok(), Some(libc::AF_INET));
        let dir = tempfile::tempdir().expect("tempdir");
        let u = std::os::unix::net::UnixListener::bind(dir.path().join("s")).expect("bind unix");
        assert_eq!(check_listening_stream(u.as_raw_fd()).ok(), Some(libc::AF_UNIX));
    }
}
