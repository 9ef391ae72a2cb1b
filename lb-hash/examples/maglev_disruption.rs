//! The distribution of Maglev's disruption over many random backend sets: how much of the table
//! moves between surviving backends when one backend is removed.
//!
//! `cargo run --release -p lb-hash --example maglev_disruption -- N [M] [SETS]` (defaults: M = the
//! smallest prime >= 100 N, SETS = 1000). Each set has N random identities; up to four of its
//! backends are removed in turn (one at a time) and the entries that changed owner between two
//! survivors are counted. Prints the mean, median, 99th and 99.9th percentiles and the maximum as
//! a share of the table: the figures quoted in the `maglev` module comment.

use std::process::ExitCode;

use lb_hash::{Backend, BackendId, MaglevTable, is_prime, maglev_table_size_for};

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

    // xorshift64: identities differ from run to run only if the seed does.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let owners =
        |t: &MaglevTable| -> Vec<BackendId> { t.entries().iter().map(|&e| t.backends()[usize::from(e)].id).collect() };
    let mut shares = Vec::with_capacity(sets * n.min(4));
    for _ in 0..sets {
        let set: Vec<Backend> = (0..n).map(|_| Backend::new(next(), 1)).collect();
        let Ok(before) = MaglevTable::new(&set, m) else {
            eprintln!("cannot build a table of {m} entries for {n} backends");
            return ExitCode::FAILURE;
        };
        let before = owners(&before);
        for removed in set.iter().take(4).map(|b| b.id) {
            let survivors: Vec<Backend> = set.iter().copied().filter(|b| b.id != removed).collect();
            let Ok(after) = MaglevTable::new(&survivors, m) else {
                eprintln!("cannot build the table without backend {removed}");
                return ExitCode::FAILURE;
            };
            let between = before.iter().zip(&owners(&after)).filter(|&(o, a)| *o != removed && o != a).count();
            shares.push(between as f64 / f64::from(m) * 100.0);
        }
    }
    shares.sort_by(f64::total_cmp);
    let at = |q: f64| shares[((shares.len() - 1) as f64 * q).round() as usize];
    let mean = shares.iter().sum::<f64>() / shares.len() as f64;
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
