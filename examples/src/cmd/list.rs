//! `lb list`: show services, backends and counters of a running load balancer. Filled in by issue 6.

use super::CmdResult;

/// Arguments of `lb list`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address of the running load balancer's state endpoint.
    #[arg(long)]
    pub endpoint: Option<String>,
}

/// Not yet implemented here: issue 6 owns it.
pub fn main(_args: Args) -> CmdResult {
    Err(
        "`lb list` is provided by the control-plane work (issue 6) and is not in this build yet"
            .into(),
    )
}
