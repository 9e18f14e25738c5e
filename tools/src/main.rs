//! `bf`: the BlockFrame command-line tool.

/// `println!` to [`output::line`]: it returns the write's result (`println!` panics on a closed stdout).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}

mod cli;
mod cmd;
mod notify;
mod open;
mod output;
mod settings;
mod units;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use blockframe::Error;

/// Exit status when every checked file is fully healthy.
pub const EXIT_OK: u8 = 0;
/// Exit status for an error that is not about the data (bad arguments, wrong key, missing file, I/O).
pub const EXIT_ERROR: u8 = 1;
/// Exit status when data is intact but redundancy is reduced (some shards missing or corrupt).
pub const EXIT_DEGRADED: u8 = 3;
/// Exit status when some data cannot be rebuilt.
pub const EXIT_LOST: u8 = 4;

fn init_logging(level: &str) {
    // fuser logs unimplemented optional requests (xattrs) as warnings: keep its output to errors unless asked.
    let level = if level.contains("fuser") { level.to_string() } else { format!("{level},fuser=error") };
    let level = level.as_str();
    let filter =
        tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Caps glibc's malloc arenas at two, and fixes its mmap threshold at 1 MiB. Each thread that allocates
/// otherwise gets an arena of its own, and the many short-lived I/O threads of `bf nbd serve` (one per request
/// in flight) left about 150 MiB of freed but unreturned arena memory behind: peak RSS 295 MiB against 141 MiB
/// with two arenas, at the same throughput. Left dynamic, the mmap threshold grows to the size of the largest
/// buffer freed (32 MiB segments), so later segment buffers came from the arenas and stayed there when freed:
/// the mount server started at 41 MiB RSS (16 request threads) against 7 MiB with the threshold fixed.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}

/// Whether `e` is a write to a reader that went away.
fn is_broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    let io = e.downcast_ref::<std::io::Error>().or_else(|| match e.downcast_ref::<Error>() {
        Some(Error::Io { source, .. }) => Some(source),
        _ => None,
    });
    io.is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = cli::Cli::parse();
    let settings = match settings::Settings::resolve(&cli.global) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bf: {e:#}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    init_logging(&settings.log_level);
    match cmd::run(cli.command, &settings) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // A closed pipe (`bf get x -o - | head`) is not an error.
            if e.chain().any(is_broken_pipe) {
                return ExitCode::from(EXIT_OK);
            }
            eprintln!("bf: {}", output::shown(&format!("{e:#}")));
            let code = match e.downcast_ref::<Error>() {
                Some(Error::TooManyLost { .. }) | Some(Error::Authentication { .. }) => EXIT_LOST,
                _ => EXIT_ERROR,
            };
            ExitCode::from(code)
        }
    }
}
