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

/// A name as text output shows it: control characters (newline, tab, escape sequences, C1 controls) and `\`
/// escaped, so no name can forge a line or move the cursor. JSON output carries names as they are.
pub fn shown(name: &str) -> std::borrow::Cow<'_, str> {
    if !name.chars().any(|c| c.is_control() || c == '\\') {
        return name.into();
    }
    let mut s = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\t' => s.push_str("\\t"),
            '\r' => s.push_str("\\r"),
            c if c.is_control() => s.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => s.push(c),
        }
    }
    s.into()
}

#[cfg(test)]
mod tests {
    use super::shown;

    #[test]
    fn control_characters_and_backslashes_are_escaped() {
        assert_eq!(shown("plain name.txt"), "plain name.txt");
        assert_eq!(shown("a\nb\tc\\d"), "a\\nb\\tc\\\\d");
        assert_eq!(shown("x\u{1b}[2J\u{85}y"), "x\\u{1b}[2J\\u{85}y");
        assert!(!shown("forged\n   100  1  healthy  0000  evil").contains('\n'));
    }
}
