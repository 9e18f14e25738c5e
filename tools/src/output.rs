//! Standard output of the commands. A closed stdout (`bf scrub | head -1`) ends the output, not the work: the
//! command goes on to its end (every file of a `commit -r` is committed, a scrub's exit status still tells
//! its result), and what it would have printed is dropped. Other write errors (a full disk behind `>`) fail
//! the command.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a write to stdout found the reader gone.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes one line to stdout; `Ok` without writing once stdout is closed.
pub fn line(args: fmt::Arguments<'_>) -> io::Result<()> {
    if CLOSED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut out = io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        r => r,
    }
}
