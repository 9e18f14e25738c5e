//! One module per command group; [`run`] dispatches a parsed command.

mod files;
mod init;
mod location;
mod lost_found;
pub(crate) mod mount;
mod recover;
mod scrub;
mod serve;
mod status;
mod volume;

use anyhow::Result;

use crate::cli::Command;
use crate::settings::Settings;
use crate::EXIT_OK;

/// Runs one command; returns the exit status.
pub fn run(cmd: Command, s: &Settings) -> Result<u8> {
    match cmd {
        Command::Init(a) => init::init(&a, s).map(|_| EXIT_OK),
        Command::Commit(a) => files::commit_cmd(&a, s),
        Command::Get(a) => files::get(&a, s),
        Command::Ls(a) => files::ls(&a, s),
        Command::Rm(a) => files::rm(&a, s),
        Command::Verify(a) => files::verify(&a, s),
        Command::Mount(a) => mount::mount_cmd(&a, s),
        Command::Umount(a) => mount::umount_cmd(&a),
        Command::Scrub(a) => scrub::scrub_cmd(&a, s),
        Command::Status(a) => status::status_cmd(&a, s),
        Command::Recover(a) => recover::recover_cmd(&a, s),
        Command::LostFound(a) => lost_found::lost_found_cmd(&a, s),
        Command::Location(c) => location::location_cmd(&c, s),
        Command::Rebalance(a) => location::rebalance_cmd(&a, s),
        Command::Volume(c) => volume::volume_cmd(&c, s),
        Command::Nbd(c) => volume::nbd_cmd(&c, s),
        Command::Serve(a) => serve::serve_cmd(&a, s),
    }
}
