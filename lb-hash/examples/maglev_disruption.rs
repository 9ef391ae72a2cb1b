//! The distribution of Maglev's disruption over many random backend sets: how much of the table
//! moves between surviving backends when one backend is removed.
//!
//! `cargo run --release -p lb-hash --example maglev_disruption -- N [M] [SETS]` (defaults: M = the
//! smallest prime >= 100 N, SETS = 1000). Each set has N random identities; up to four of its
//! backends are removed in turn (one at a time) and the entries that changed owner between two
//! survivors are counted. Prints the mean, median, 99th and 99.9th percentiles and the maximum as
//! a share of the table: the figures quoted in the `maglev` module comment.

use std::process::ExitCode;

use lb_hash::{is_prime, maglev_table_size_for};

#[path = "../tests/common/disruption.rs"]
mod disruption;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parse = |i: usize| args.get(i).map(|a| a.parse::<u32>());
    let n = match parse(0) {
        Some(Ok(n)) if n >= 2 => n as usize,
        _ => {
            eprintln!("usage: maglev_disruption N [M] [SETS] (N >= 2 backends)");
            return ExitCode::FAILURE;
        }
    };
    let m = match parse(1) {
        None => maglev_table_size_for(n),
        Some(Ok(m)) if is_prime(m) && m as usize >= n => m,
        _ => {
            eprintln!("M must be a prime table size >= N");
            return ExitCode::FAILURE;
        }
    };
    let sets = match parse(2) {
        None => 1000,
        Some(Ok(s)) if s > 0 => s as usize,
        _ => {
            eprintln!("SETS must be a positive number");
            return ExitCode::FAILURE;
        }
    };

    let shares = match disruption::sample(n, m, sets, 0x9e37_79b9_7f4a_7c15) {
        Ok(shares) => shares,
        Err(e) => {
            eprintln!("cannot build a table: {e}");
            return ExitCode::FAILURE;
        }
    };
    let at = |q: f64| disruption::percentile(&shares, q);
    let mean = disruption::mean(&shares);
    println!(
        "N = {n}, M = {m}, {} removals: moved between survivors, % of the table: mean {mean:.3}, \
         p50 {:.3}, p99 {:.3}, p99.9 {:.3}, max {:.3}",
        shares.len(),
        at(0.5),
        at(0.99),
        at(0.999),
        at(1.0)
    );
    ExitCode::SUCCESS
}
