//! `bf-bench`: the measuring and drawing half of `scripts/bench`.
//!
//! - `bf-bench stages` times each pipeline stage through the `blockframe` library's own code (AES-256-GCM segment
//!   sealing, AES-256-XTS, Reed-Solomon encode and reconstruct, BLAKE3 shard leaves) on one core and on every
//!   core, and prints the rates as JSON.
//! - `bf-bench chart CSV PNG` draws `scripts/bench`'s results as horizontal MB/s bars with the limit line.

mod chart;
mod stages;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "BlockFrame benchmark helper (run by scripts/bench)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Single-core and all-core rates of each pipeline stage, as JSON on stdout.
    Stages {
        /// Data shards per segment.
        #[arg(short, long, default_value_t = 4)]
        k: usize,
        /// Parity shards per segment.
        #[arg(short, long, default_value_t = 2)]
        m: usize,
        /// Segment size in MiB (the store's default is 32).
        #[arg(long, default_value_t = 32)]
        segment_mib: usize,
        /// Seconds to run each stage for, per thread count.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Threads for the all-core figure [default: the number of CPUs].
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Draws a results CSV (as written by scripts/bench) as a PNG bar chart.
    Chart {
        csv: PathBuf,
        png: PathBuf,
        /// A TrueType font for the labels.
        #[arg(long, default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
        font: PathBuf,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().cmd {
        Cmd::Stages { k, m, segment_mib, seconds, threads } => {
            let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let params = stages::Params { k, m, segment_bytes: segment_mib << 20, seconds, threads };
            stages::run(&params).map(|report| println!("{report}"))
        }
        Cmd::Chart { csv, png, font } => chart::draw(&csv, &png, &font),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bf-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
