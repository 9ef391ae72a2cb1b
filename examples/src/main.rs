//! `lb`: the sample load balancer binary. Each subcommand lives in its own module under `cmd/`.
//!
//! ```text
//! lb run     --config lb.yaml          serve the configured interfaces and queues; reload, health, Kubernetes
//! lb list    [--endpoint ADDR:PORT]    show services, backends and counters of a running lb, as ipvsadm -Ln
//! lb replay  --in x.pcap --out y.pcap  run the fast path over a capture, no root
//! lb demo    [--mode nat|dsr|ipip|gue] build namespaces, balance real TCP/UDP flows, clean up (root)
//! ```

#![allow(unreachable_pub, reason = "a binary: `pub` marks what a subcommand module offers the others")]

mod cmd;

/// lb-core's big tables (connection tables, Maglev tables) on transparent huge pages: one TLB entry
/// covers 2 MiB of them instead of 4 KiB (see `lb_io::alloc`).
#[global_allocator]
static ALLOC: lb_io::HugePageAlloc = lb_io::HugePageAlloc;

use clap::{Parser, Subcommand};

/// A userspace packet-processing load balancer (AF_XDP, Maglev, conntrack, NAT / DSR / IP-in-IP).
#[derive(Debug, Parser)]
#[command(name = "lb", version)]
struct Cli {
    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. `info` or `lb_io=debug`; RUST_LOG
    /// when not given.
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the configured interfaces and queues over AF_XDP (file reloads, health checks, Kubernetes feed).
    Run(cmd::run::Args),
    /// Show a running load balancer's services, backends and counters (its /state), as `ipvsadm -Ln` does.
    List(cmd::list::Args),
    /// Run the fast path over a pcap capture and write the transmitted frames to another.
    Replay(cmd::replay::Args),
    /// Build private network namespaces, balance real TCP and UDP flows over AF_XDP, clean up.
    Demo(cmd::demo::Args),
    /// A demo backend server (started by `lb demo` inside a backend namespace).
    #[command(hide = true)]
    DemoBackend(cmd::demo::BackendArgs),
    /// Traffic generator of scripts/bench-throughput.sh.
    #[command(hide = true)]
    BenchGen(cmd::bench::GenArgs),
    /// Forwarder of scripts/bench-throughput.sh.
    #[command(hide = true)]
    BenchForward(cmd::bench::ForwardArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // A filter that does not parse is an error, not a silent `info`: a typo would hide the very
    // lines it asked for.
    let filter = match tracing_subscriber::EnvFilter::try_new(&cli.log) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("error: --log (or RUST_LOG) {:?} is not a log filter: {e}", cli.log);
            return std::process::ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let result = match cli.command {
        Command::Run(args) => cmd::run::main(args),
        Command::List(args) => cmd::list::main(args),
        Command::Replay(args) => cmd::replay::main(args),
        Command::Demo(args) => cmd::demo::main(args),
        Command::DemoBackend(args) => cmd::demo::backend_main(args),
        Command::BenchGen(args) => cmd::bench::gen_main(args),
        Command::BenchForward(args) => cmd::bench::forward_main(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// A connection table of no entries is refused, naming the option: `--conntrack-entries 0` ran
    /// with a table's smallest, 8 entries per core, in which a few NAT flows (two entries each)
    /// evicted one another.
    #[test]
    fn a_connection_table_of_no_entries_is_refused() {
        use clap::Parser;
        for sub in [&["run", "--config", "lb.yaml"][..], &["bench-forward", "--iface", "eth0"][..]] {
            let args =
                |n: &'static str| ["lb"].into_iter().chain(sub.iter().copied()).chain(["--conntrack-entries", n]);
            let err = Cli::try_parse_from(args("0")).expect_err("no entries");
            assert!(err.to_string().contains("--conntrack-entries"), "{err}");
            assert!(Cli::try_parse_from(args("1")).is_ok(), "lb {sub:?} --conntrack-entries 1");
        }
    }

    /// `bench-gen --flows` above 55 536 took source ports past 65 535: they wrapped to 0 and up in a
    /// release build (and panicked in a debug one).
    #[test]
    fn more_flows_than_source_ports_from_10000_are_refused() {
        use clap::Parser;
        let args = |n: &'static str| {
            let to = ["--dst-mac", "02:00:00:00:00:01", "--src-ip", "10.0.0.1", "--dst-ip", "10.0.0.2"];
            ["lb", "bench-gen", "--iface", "eth0"].into_iter().chain(to).chain(["--flows", n])
        };
        assert!(Cli::try_parse_from(args("55536")).is_ok());
        for n in ["55537", "0"] {
            let err = Cli::try_parse_from(args(n)).expect_err(n);
            assert!(err.to_string().contains("--flows"), "{err}");
        }
    }

    /// The command line is well formed, and no help text is a placeholder for work still to come.
    #[test]
    fn help_texts_describe_what_each_command_does() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        let mut texts = vec![cli.get_about().map(ToString::to_string).unwrap_or_default()];
        for sub in cli.get_subcommands() {
            let about = sub.get_about().map(ToString::to_string).unwrap_or_default();
            assert!(!about.is_empty(), "lb {} has no help text", sub.get_name());
            texts.push(about);
            texts.extend(sub.get_arguments().filter_map(|a| a.get_help()).map(ToString::to_string));
            // The help of each value an argument takes (`lb demo --mode`'s, `lb run
            // --neighbour-responder`'s), which clap takes from the doc comments of the value enum.
            for arg in sub.get_arguments() {
                texts.extend(arg.get_possible_values().iter().filter_map(|v| v.get_help()).map(ToString::to_string));
            }
        }
        for text in &texts {
            let lower = text.to_ascii_lowercase();
            assert!(!lower.contains("filled in") && !lower.contains("issue"), "placeholder help text: {text:?}");
            // A rustdoc link means nothing on a terminal: `[`GUE_PORT`]` where the port was meant.
            assert!(!text.contains("[`"), "help text with a rustdoc link: {text:?}");
        }
    }
}
