//! `lb run`: serve the configured interfaces and queues. Filled in by issue 6 (the Kubernetes / YAML
//! control plane), on lb-io's `VipSteering`, `XskDevice`, `PollLoop` and `update_channel`.

use std::path::PathBuf;

use super::CmdResult;

/// Arguments of `lb run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The YAML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Not yet implemented here: issue 6 owns it.
pub fn main(_args: Args) -> CmdResult {
    Err(
        "`lb run` is provided by the control-plane work (issue 6) and is not in this build yet"
            .into(),
    )
}
