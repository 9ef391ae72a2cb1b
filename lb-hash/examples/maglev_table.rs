//! Prints a Maglev table's balance and disruption for N backends and table size M.
//!
//! `cargo run --release -p lb-hash --example maglev_table -- [N] [M]` (defaults: 100, 65537).
//! Balance: each backend's share of the table against its ideal `M / N`.
//! Disruption: remove one backend and count entries that changed owner, split into the removed
//! backend's own (they must move) and entries moved between survivors (Maglev keeps these few).

use std::process::ExitCode;

use lb_hash::{Backend, MaglevTable, maglev_table_size_for};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: u64 = match args.first().map(|a| a.parse()) {
        None => 100,
        Some(Ok(n)) if n >= 2 => n,
        Some(_) => {
            eprintln!("N must be a number of backends >= 2 (usage: maglev_table [N] [M])");
            return ExitCode::FAILURE;
        }
    };
    let m: u32 = match args.get(1).map(|a| a.parse()) {
        None => MaglevTable::DEFAULT_SIZE,
        Some(Ok(m)) => m,
        Some(Err(e)) => {
            eprintln!("M must be a prime table size: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Identities as a caller would derive them from 10.0.x.y:8080.
    let backends: Vec<Backend> = (0..n).map(|i| Backend::new(1 << 48 | (0x0a00_0000 + i) << 16 | 8080, 1)).collect();
    let table = match MaglevTable::new(&backends, m) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot build the table: {e}");
            return ExitCode::FAILURE;
        }
    };
    let counts = table.entry_counts();
    let ideal = f64::from(m) / n as f64;
    let (min, max) = (counts.iter().min().copied().unwrap_or(0), counts.iter().max().copied().unwrap_or(0));
    println!("N = {n}, M = {m} (M / N = {ideal:.2}; maglev_table_size_for(N) = {})", maglev_table_size_for(n as usize));
    println!(
        "balance: min {min} entries ({:+.2} % of ideal), max {max} entries ({:+.2} % of ideal)",
        (f64::from(min) / ideal - 1.0) * 100.0,
        (f64::from(max) / ideal - 1.0) * 100.0
    );

    let removed = backends[n as usize / 2];
    let rest: Vec<Backend> = backends.iter().copied().filter(|b| b.id != removed.id).collect();
    let Ok(after) = MaglevTable::new(&rest, m) else {
        eprintln!("cannot build the table without backend {}", removed.id);
        return ExitCode::FAILURE;
    };
    let (mut own, mut between) = (0u32, 0u32);
    for (&e_before, &e_after) in table.entries().iter().zip(after.entries()) {
        let before = table.backends()[usize::from(e_before)].id;
        let now = after.backends()[usize::from(e_after)].id;
        if before == removed.id {
            own += 1;
        } else if before != now {
            between += 1;
        }
    }
    println!(
        "disruption (remove backend {}): its own {own} entries moved; {between} entries ({:.3} % of the table) moved between survivors",
        removed.id,
        f64::from(between) / f64::from(m) * 100.0
    );
    ExitCode::SUCCESS
}
