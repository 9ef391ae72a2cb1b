//! `lb list`: the live state of a running load balancer, printed as `ipvsadm -Ln` prints IPVS.
//! Fetches `/state` from the instance's `metrics.listen` address (see `lb_examples::list`).

use super::CmdResult;

/// Arguments of `lb list`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address of the running load balancer's metrics/state endpoint (its `metrics.listen`).
    #[arg(long, default_value = "127.0.0.1:9472")]
    pub endpoint: String,
}

/// Prints the state of the instance at `--endpoint`.
pub fn main(args: Args) -> CmdResult {
    let addr = args.endpoint.parse().map_err(|_| format!("--endpoint {:?} is not ADDRESS:PORT", args.endpoint))?;
    lb_examples::list::print(addr)?;
    Ok(())
}
