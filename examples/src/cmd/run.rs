//! `lb run`: serve the configured interfaces and queues, with the control plane (configuration file,
//! reloads, Kubernetes feed, health checks, `/metrics`, `/state`, `/ready`, `/livez`) of
//! `lb_examples::control`.
//!
//! One poll loop per (interface, queue): an AF_XDP socket, lb-core's `Worker` (as
//! `lb_examples::control::LbProcessor`) and an update channel. Per interface, the steering XDP program
//! sends the services' frames (VIP, port, protocol) and NAT replies to the sockets; everything else
//! stays with the kernel. The control side builds tables and sends them to every loop; a loop swaps
//! them in at its next round. The steering maps (`control::steering_for`) follow so that no frame
//! reaches a loop whose tables do not serve it (such a frame is passed, and a frame an AF_XDP
//! socket passes is lost: the kernel never sees it):
//! 1. before the tables go out, the maps steer only what both the running and the new tables serve
//!    (`SteeringSet::intersection`): a removed service's frames go to the kernel from then on (a
//!    removed NodePort's clients get its reset), and a new service's are not steered yet;
//! 2. the tables go to every loop (a loop with a full queue gets them later);
//! 3. once every loop has swapped them in (`UpdateSender::is_applied`, checked by the control loop
//!    `control::FIRST_RETRY_AFTER` the publish, then at doubling waits up to every
//!    `control::RETRY_PENDING_EVERY`, never waited for), the maps steer all they serve.
//!
//! A loop that does not swap them in keeps the new services unsteered, with a warning after
//! `SLOW_SWAP_WARNING`; what both tables serve stays steered meanwhile.
//!
//! With `--neighbour-responder auto|all`, each worker also answers ARP / NDP for the VIPs and NAT
//! source addresses with its interface's MAC (an L2 deployment; see `control::NeighbourResponder`
//! for which addresses), and each interface joins the solicited-node groups of the IPv6 ones
//! (`lb_io::interface::MulticastGroups`); addresses new to the responder are announced, untagged, on
//! each interface (gratuitous ARP, unsolicited neighbour advertisement) once the loops answer for
//! them, and again at the refreshes after ([`announcements_of`], [`ANNOUNCE_AGAIN_AFTER`]). Each
//! interface's MAC, which its loops send from and answer with, is read again at each refresh, and a
//! new one is announced ([`Workers::reread_macs`]).
//! With `interfaces: []` it runs the control plane alone: a dry run whose tables `lb list` shows.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lb_core::config::{Config, ForwardMode};
use lb_core::conntrack::ConntrackSeed;
use lb_core::service::{Limits, TableBuilder, Tables};
use lb_core::worker::{Worker, WorkerConfig, snat_port_share};
use lb_examples::control::{
    InterfaceMac, LbProcessor, NeighbourResponder, TablesSink, draw_conntrack_seed, run_blocking, steering_for,
    steering_for_config,
};
use lb_examples::metrics::PublishedCounters;
use lb_io::bpf::AttachMode;
use lb_io::bpf::xdp::{SteeringConfig, SteeringSet, VipSteering};
use lb_io::interface::{MulticastGroups, PacketSocket};
use lb_io::{
    HandoffConfig, LoopConfig, LoopStats, PollLoop, Running, StopFlag, UpdateSender, XskConfig, XskDevice,
    update_channel,
};

use super::CmdResult;

/// Arguments of `lb run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The YAML configuration file.
    #[arg(long)]
    pub config: PathBuf,
    /// Connection-table entries per core (a NAT flow takes two).
    #[arg(long, default_value_t = 1 << 18, value_parser = conntrack_entries)]
    pub conntrack_entries: usize,
    /// Maglev table entries the tables may hold, summed over the distinct tables (mh, sh, dh; up to
    /// 6 bytes an entry, held once for all loops). Default: 268439552 (4096 tables of the default
    /// 65537 entries), or what half the memory this process may use holds where less. Given, it
    /// must fit that memory beside the connection tables; Kubernetes Services beyond it are left
    /// out, a file beyond it is rejected.
    #[arg(long)]
    pub maglev_entries: Option<usize>,
    /// Pin poll loop i to core FIRST+i.
    #[arg(long)]
    pub first_core: Option<usize>,
    /// Attach the XDP program in generic (SKB) mode instead of native.
    #[arg(long)]
    pub generic: bool,
    /// Say that NIC flow-steering rules send each loop's queue the NAT replies to its own SNAT port
    /// share (logged at start). No longer needed: a loop hands a reply for another loop's port to
    /// that loop. Kept so command lines that pass it still start.
    #[arg(long, hide = true)]
    pub nat_replies_steered: bool,
    /// Answer ARP and IPv6 neighbour solicitations for the VIPs (not Kubernetes cluster IPs nor
    /// NodePorts) and NAT source addresses with the interface's MAC (an L2 deployment, VIPs not routed to this node; on one node per segment):
    /// `auto` for the addresses no interface of the node holds, `all` for every one, `off` (the
    /// default) to leave all ARP / NDP to the kernel.
    #[arg(long, value_enum, default_value_t = NeighbourResponder::Off)]
    pub neighbour_responder: NeighbourResponder,
}

/// Parses `--conntrack-entries`: at least one (0 would be a table's smallest, 8 entries, in which
/// a few NAT flows, two entries each, evict one another).
pub fn conntrack_entries(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("a connection table needs at least 1 entry per core (the default is 262144)".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Where [`Workers`] writes the steering: each interface's XDP maps ([`VipSteering`]; a recorder in
/// tests).
trait SteeringMaps: Send {
    /// Makes the maps steer exactly `want`.
    fn steer(&mut self, want: SteeringSet) -> Result<(), String>;
}

impl SteeringMaps for VipSteering {
    fn steer(&mut self, want: SteeringSet) -> Result<(), String> {
        self.set(want).map_err(|e| e.to_string())
    }
}

/// Sends tables to every loop and steers exactly their services and NAT replies to the sockets, in
/// the order the module comment gives.
struct Workers<M: SteeringMaps = VipSteering> {
    loops: Vec<UpdateSender<Arc<Tables>>>,
    steering: Vec<M>,
    /// The steering maps' sizes (every interface's program is loaded with these).
    steering_config: SteeringConfig,
    /// Which addresses ARP / NDP is answered for (`--neighbour-responder`).
    responder: NeighbourResponder,
    /// Per interface (responder on), the solicited-node groups of the IPv6 addresses answered for.
    groups: Vec<MulticastGroups>,
    /// Some interface holds fewer of those groups than asked for (a join failed): each refresh
    /// tries again ([`Workers::join_groups`]).
    groups_short: bool,
    /// Per interface, its MAC as last read, shared with its poll loops (which answer ARP / NDP with
    /// it and send from it): read again at each refresh ([`Workers::reread_macs`]).
    macs: Vec<(String, Arc<InterfaceMac>)>,
    /// Per interface (responder on), a socket for announcements and the MAC they carry.
    announcers: Vec<(String, PacketSocket, Arc<InterfaceMac>)>,
    /// The addresses answered for so far (announced when they joined the set).
    answered: BTreeSet<IpAddr>,
    /// The addresses answered for whose announcements are not all sent: how many are left, and
    /// when the next is due ([`Workers::announce_due`]).
    announcing: std::collections::BTreeMap<IpAddr, (u8, std::time::Instant)>,
    /// The least time between two announcements of one address ([`ANNOUNCE_AGAIN_AFTER`]).
    announce_again_after: Duration,
    /// The last tables published, and where their steering stands.
    published: Option<(Arc<Tables>, Steering)>,
    /// The set the maps were last set to (or, after a write that failed, were being set to): every
    /// table a loop holds or has queued serves all it steers.
    steered: SteeringSet,
    /// How long the loops may take to swap in the last tables before a warning
    /// ([`SLOW_SWAP_WARNING`]).
    slow_swap_warning: Duration,
    /// The SNAT settings last checked against the kernel's ephemeral ports
    /// ([`warn_if_snat_ports_are_ephemeral`]): at start, and again when a reload brings others (a
    /// family's first SNAT address, or the range of a node that had none).
    snat_checked: SnatSettings,
    /// Per interface, its receive queues no loop serves, read again at each refresh.
    queues: Vec<UnservedQueues>,
    /// What the control loop builds tables with: lb-core's slot limits, as the loops' first tables
    /// have them, and a Maglev budget within this process's memory ([`maglev_budget`]).
    limits: Limits,
    /// The connection table seed of every table of this run, the loops' first ones too: drawn at
    /// random when the run starts ([`draw_conntrack_seed`]), kept across reloads.
    conntrack_seed: ConntrackSeed,
}

/// Where the steering of the last tables published stands.
#[derive(Debug)]
enum Steering {
    /// Some loop has not swapped them in yet: the maps steer only what every table a loop may
    /// hold serves. Checked by the control loop's retries (1 ms after the publish, then
    /// less and less often, up to every [`lb_examples::control::RETRY_PENDING_EVERY`]); `warned` once
    /// the wait passed [`Workers::slow_swap_warning`].
    Waiting { since: std::time::Instant, warned: bool },
    /// Every loop runs them, and the maps steer this set, theirs (host marks included):
    /// [`TablesSink::refresh`] re-derives it when the node's addresses change.
    Applied(SteeringSet),
    /// Every loop runs them, but writing their steering failed: [`TablesSink::refresh`] tries again.
    Failed,
}

/// How many times an address is announced when the responder starts answering for it: an IPv4 one
/// twice (RFC 5227's ANNOUNCE_NUM), an IPv6 one three times (RFC 4861's MAX_NEIGHBOR_ADVERTISEMENT),
/// so that one lost frame does not leave neighbours on a previous owner's MAC until their entry goes
/// stale.
fn announcements_of(addr: IpAddr) -> u8 {
    if addr.is_ipv6() { 3 } else { 2 }
}

/// The least time between two announcements of one address: RFC 4861's RetransTimer. The repeats go
/// out with the control loop's refresh, every 2 s (RFC 5227's ANNOUNCE_INTERVAL), the first at the
/// first refresh at least this long after the first announcement.
const ANNOUNCE_AGAIN_AFTER: Duration = Duration::from_secs(1);

/// How long the poll loops may take to swap in new tables (a loop applies them at its next round,
/// within milliseconds) before a warning that the steering of the services they add waits for them.
const SLOW_SWAP_WARNING: Duration = Duration::from_secs(5);

/// A node's SNAT addresses and port range.
type SnatSettings = (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>, (u16, u16));

fn snat_settings(node: &lb_core::config::NodeConfig) -> SnatSettings {
    (node.snat_v4, node.snat_v6, node.snat_ports)
}

/// Refuses NAT services when `node.snat_ports` has fewer ports than there are poll loops: each loop
/// takes a share of its own (`snat_port_share`), and a loop without one would drop every NAT flow it
/// gets as `NoSnatPort`. (A reply that RSS delivers to a loop that does not own its SNAT port is
/// handed to the owner: `lb_io::handoff`.)
fn check_nat_replies(config: &Config, loops: usize) -> Result<(), String> {
    let Some(s) = config.services.iter().find(|s| s.mode == ForwardMode::Nat) else { return Ok(()) };
    let (first, last) = config.node.snat_ports;
    let ports = usize::from(last.saturating_sub(first)) + 1;
    // (An empty or zero-based range is lb-core's `BadSnatPorts`, reported by the build.)
    if first != 0 && first <= last && ports < loops {
        return Err(format!(
            "service {} uses NAT, but node.snat_ports {first}-{last} holds {ports} ports for {loops} poll loops, \
             each of which needs a share of its own: widen the range",
            s.name
        ));
    }
    Ok(())
}

/// Refuses a configuration whose steering would not fit the XDP program's maps: its addresses (VIPs,
/// and the SNAT addresses when a service uses NAT; the responder's addresses are among these) and
/// its (VIP, port, protocol) services. Checked before anything is built, because a map update that
/// fails only after the workers have the new tables leaves them serving what is not steered.
/// The counts are lb-io's own ([`lb_io::bpf::xdp::SteeringSet::address_count`]) over the set
/// `publish` will write (`steering_for_config`), so the check cannot drift from the maps. The set
/// written while the loops swap the tables in, the intersection of the running and the new ones,
/// is never larger than either, and the maps drop stale entries before they take new ones.
fn check_steering_capacity(config: &Config, steering: &SteeringConfig) -> Result<(), String> {
    let want = steering_for_config(config);
    let addresses = want.address_count();
    if addresses > steering.max_vips as usize {
        return Err(format!(
            "{addresses} addresses to steer (VIPs and SNAT addresses), the XDP program holds at most {}",
            steering.max_vips
        ));
    }
    if want.services.len() > steering.max_services as usize {
        return Err(format!(
            "{} services to steer, the XDP program holds at most {}",
            want.services.len(),
            steering.max_services
        ));
    }
    Ok(())
}

impl<M: SteeringMaps> TablesSink for Workers<M> {
    fn check(&self, config: &Config) -> Result<(), String> {
        check_nat_replies(config, self.loops.len())?;
        check_steering_capacity(config, &self.steering_config)
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    fn conntrack_seed(&self) -> ConntrackSeed {
        self.conntrack_seed
    }

    fn max_addresses(&self) -> Option<usize> {
        Some(self.steering_config.max_vips as usize)
    }

    /// Tables a loop had no room for wait, or the steering of the tables waits for the loops.
    fn has_pending(&self) -> bool {
        self.loops.has_pending() || matches!(self.published, Some((_, Steering::Waiting { .. })))
    }

    /// Hands waiting tables over, then steers the last tables' services if every loop runs them
    /// now (warning once if that takes long).
    fn deliver_pending(&mut self) -> Result<(), String> {
        self.loops.deliver_pending()?;
        self.steer_if_swapped();
        Ok(())
    }

    /// Steers what both the running and the new tables serve, hands the new tables to every loop,
    /// and steers all they serve once every loop has swapped them in (see the module comment).
    fn publish(&mut self, tables: &Arc<Tables>) -> Result<(), String> {
        let want = steering_for(tables, self.responder);
        // What every loop's tables serve: the last tables' steering if every loop runs them, or
        // else what is steered (served by every table a loop may hold, as that was in its turn).
        let before = match &self.published {
            Some((last, _)) if self.loops_swapped() => steering_for(last, self.responder),
            _ => self.steered.clone(),
        };
        let during = before.intersection(&want);
        // A wait that goes on (a loop still has not swapped in the last tables) keeps its start,
        // and its one warning.
        let waiting = match &self.published {
            Some((_, Steering::Waiting { since, warned })) => Steering::Waiting { since: *since, warned: *warned },
            _ => Steering::Waiting { since: std::time::Instant::now(), warned: false },
        };
        if let Err(e) = self.apply_steering(&during) {
            // The loops keep the last tables; their own steering is written again once they run
            // them (it may be written already, but the maps now hold part of `during`).
            if let Some((_, steering)) = &mut self.published {
                *steering = waiting;
            }
            return Err(e);
        }
        if let Err(e) = self.loops.publish(tables) {
            // A loop has gone (which stops the run): the loops before it have the new tables, those
            // after it do not, and none can be waited for. What both tables serve stays steered.
            self.published = None;
            return Err(e);
        }
        self.published = Some((tables.clone(), waiting));
        let snat = snat_settings(tables.node());
        if snat != self.snat_checked {
            warn_if_snat_ports_are_ephemeral(tables.node());
            self.snat_checked = snat;
        }
        // No loops (a dry run): nothing to wait for. (Loops are checked again on the control
        // loop's next tick, which also warns when they take long.)
        if self.loops_swapped() {
            self.steer_if_swapped();
        }
        Ok(())
    }

    /// An address added to or removed from the node changes which steered addresses are the host's
    /// (their fragments and foreign ICMP go to the kernel) and, with `--neighbour-responder auto`,
    /// which are answered for: applied here without waiting for a configuration change. A steering
    /// update that failed is tried again here too, and so are IPv6 groups that could not be joined;
    /// each interface's MAC is read again (a change is announced), and the announcements that are
    /// due go out. Steering that waits for the loops is left to [`TablesSink::deliver_pending`].
    /// Each interface's receive queues are read again too, and queues no loop serves warned of
    /// when they change ([`UnservedQueues`]).
    fn refresh(&mut self) -> Result<(), String> {
        for queues in &mut self.queues {
            queues.check();
        }
        let now = std::time::Instant::now();
        self.reread_macs(now);
        self.announce_due(now);
        let Some((tables, steering)) = &self.published else { return Ok(()) };
        let want = steering_for(tables, self.responder);
        match steering {
            Steering::Waiting { .. } => return Ok(()),
            Steering::Applied(applied) if *applied == want => {
                if self.groups_short {
                    self.join_groups(&want.neighbour);
                }
                return Ok(());
            }
            Steering::Applied(_) | Steering::Failed => {}
        }
        let tables = tables.clone();
        if let Err(e) = self.apply_steering(&want) {
            self.published = Some((tables, Steering::Failed));
            return Err(e);
        }
        tracing::info!(host = ?want.host, "the node's addresses changed (or a steering update had failed): steering updated");
        self.published = Some((tables, Steering::Applied(want)));
        Ok(())
    }
}

impl<M: SteeringMaps> Workers<M> {
    /// No loops and no interfaces yet; `snat_checked` the SNAT settings already checked.
    fn new(steering_config: SteeringConfig, responder: NeighbourResponder, snat_checked: SnatSettings) -> Self {
        Workers {
            loops: Vec::new(),
            steering: Vec::new(),
            steering_config,
            responder,
            groups: Vec::new(),
            groups_short: false,
            macs: Vec::new(),
            announcers: Vec::new(),
            answered: BTreeSet::new(),
            announcing: std::collections::BTreeMap::new(),
            announce_again_after: ANNOUNCE_AGAIN_AFTER,
            published: None,
            steered: SteeringSet::default(),
            slow_swap_warning: SLOW_SWAP_WARNING,
            snat_checked,
            queues: Vec::new(),
            limits: Limits::default(),
            conntrack_seed: draw_conntrack_seed(),
        }
    }

    /// Whether every loop runs the last tables published.
    fn loops_swapped(&self) -> bool {
        self.loops.iter().all(UpdateSender::is_applied)
    }

    /// Writes the last tables' steering if they wait for the loops and every loop runs them now;
    /// warns once when some loop has not after [`Workers::slow_swap_warning`] (what is steered in
    /// the meantime, served by both tables, stays). A failed write is logged and left to
    /// [`TablesSink::refresh`].
    fn steer_if_swapped(&mut self) {
        let Some((_, Steering::Waiting { since, warned })) = &self.published else { return };
        let (since, was_warned) = (*since, *warned);
        if !self.loops_swapped() {
            if !was_warned && since.elapsed() >= self.slow_swap_warning {
                let waiting: Vec<usize> = (0..self.loops.len()).filter(|&i| !self.loops[i].is_applied()).collect();
                if let Some((tables, Steering::Waiting { warned, .. })) = &mut self.published {
                    *warned = true;
                    tracing::warn!(
                        workers = ?waiting,
                        version = tables.version(),
                        "poll loops have not swapped in the new tables after {:?} (stuck?): the services and NAT \
                         addresses the tables add are steered to the loops once they do; meanwhile what the old and \
                         the new tables both serve stays steered",
                        since.elapsed()
                    );
                }
            }
            return;
        }
        let Some((tables, _)) = &self.published else { return };
        let version = tables.version();
        let tables = tables.clone();
        let want = steering_for(&tables, self.responder);
        match self.apply_steering(&want) {
            Ok(()) => {
                if was_warned {
                    tracing::warn!(version, "every poll loop runs the new tables now: their services are steered");
                } else {
                    tracing::info!(version, "every poll loop runs the new tables: their services are steered");
                }
                self.published = Some((tables, Steering::Applied(want)));
            }
            Err(e) => {
                tracing::error!("{e}; tried again every {:?}", lb_examples::control::REFRESH_EVERY);
                self.published = Some((tables, Steering::Failed));
            }
        }
    }

    /// Reads each interface's MAC again. When one changed (a bond's failover with
    /// `fail_over_mac=active`, `ip link set IF address`), the interface's loops answer ARP / NDP with
    /// the new one and send from it from their next burst, and every address answered for is
    /// announced again from `now`, so neighbours stop sending to the old MAC.
    fn reread_macs(&mut self, now: std::time::Instant) {
        let mut changed = false;
        for (name, mac) in &self.macs {
            // An interface that is gone fails its loops, which stops `lb run`.
            let Ok(new) = lb_io::interface::mac_address(name) else { continue };
            let old = mac.get();
            if new != old {
                mac.set(new);
                changed = true;
                let answers = if self.responder == NeighbourResponder::Off {
                    ""
                } else {
                    ", ARP / NDP answers carry it, and the addresses answered for are announced again"
                };
                tracing::warn!(
                    interface = %name,
                    "the MAC of {name} changed from {} to {}: frames leave from it from now on{answers}",
                    lb_io::netns::format_mac(old),
                    lb_io::netns::format_mac(new)
                );
            }
        }
        if changed {
            for addr in &self.answered {
                self.announcing.insert(*addr, (announcements_of(*addr), now));
            }
        }
    }

    /// Sends on every interface the announcements due at `now` (gratuitous ARP, unsolicited NA), so
    /// neighbours holding another MAC for an address (a previous owner) switch now, not when their
    /// entry goes stale; each address again no sooner than [`Workers::announce_again_after`], until
    /// [`announcements_of`] it are sent.
    fn announce_due(&mut self, now: std::time::Instant) {
        let mut frame = [0u8; 128];
        let (announcers, again) = (&self.announcers, self.announce_again_after);
        self.announcing.retain(|addr, (left, due)| {
            if now < *due {
                return true;
            }
            for (name, socket, mac) in announcers {
                let sent = lb_core::neighbour::announcement(mac.get(), *addr, &mut frame)
                    .ok_or_else(|| std::io::Error::other("frame buffer too short"))
                    .and_then(|n| socket.send(&frame[..n]));
                if let Err(e) = sent {
                    tracing::warn!(interface = %name, "announcing {addr}: {e}");
                }
            }
            *left = left.saturating_sub(1);
            *due = now + again;
            *left > 0
        });
    }

    /// Makes every interface hold exactly the solicited-node groups of the IPv6 ones of `addresses`:
    /// solicitations for an address reach this node only if it listens to its group. A failure (a
    /// socket's memberships are bounded by its option memory, `net.core.optmem_max`) is warned of
    /// once and tried again at each refresh until every group is held.
    fn join_groups(&mut self, addresses: &BTreeSet<IpAddr>) {
        let groups: Vec<_> = addresses
            .iter()
            .filter_map(|a| match a {
                IpAddr::V6(a) => Some(lb_core::neighbour::solicited_node(*a)),
                IpAddr::V4(_) => None,
            })
            .collect();
        let mut short = false;
        for g in &mut self.groups {
            if let Err(e) = g.set(groups.iter().copied()) {
                if !self.groups_short {
                    let hint = if e.kind() == std::io::ErrorKind::OutOfMemory {
                        "each group takes option memory of the socket, at most net.core.optmem_max bytes: raise it \
                         (sysctl -w net.core.optmem_max=N)"
                    } else {
                        "or let every multicast frame in instead: ip link set IF allmulticast on"
                    };
                    tracing::warn!(
                        "{e}; IPv6 neighbour solicitations for the addresses of the groups not joined may not arrive \
                         (tried again every {:?}): {hint}",
                        lb_examples::control::REFRESH_EVERY
                    );
                }
                short = true;
            }
        }
        if self.groups_short && !short {
            tracing::info!("every IPv6 solicited-node group of the addresses answered for is joined now");
        }
        self.groups_short = short;
    }

    /// Sets every interface's steering maps to `want`, joins the IPv6 solicited-node groups of the
    /// addresses answered for, and announces those new to the set.
    fn apply_steering(&mut self, want: &SteeringSet) -> Result<(), String> {
        self.steered.clone_from(want);
        for s in &mut self.steering {
            s.steer(want.clone()).map_err(|e| format!("steering services: {e}"))?;
        }
        self.join_groups(&want.neighbour);
        // Addresses new to the responder are announced now, and again by the refreshes after.
        let now = std::time::Instant::now();
        for addr in want.neighbour.difference(&self.answered) {
            self.announcing.insert(*addr, (announcements_of(*addr), now));
        }
        self.announcing.retain(|addr, _| want.neighbour.contains(addr));
        self.answered.clone_from(&want.neighbour);
        self.announce_due(now);
        Ok(())
    }
}

/// Where `lb run` records the receive VLAN offloads it turned off, one file per namespace and
/// interface, until it turns them on again (`lb_io::offload::rx_vlan_off_recorded`, which also removes
/// the records a killed run left of an interface or a namespace since gone).
const OFFLOAD_RECORDS: &str = "/run/lb";

/// Turns off `name`'s receive VLAN offloads (`lb_io::offload`), so tagged frames reach XDP and lb-core
/// tagged and leave tagged; logs what it did, and warns when a feature stays on.
fn rx_vlan_offload_off(name: &str) -> Option<lb_io::offload::RxVlanOff> {
    // Recorded under /run until turned back on, so a run killed before it could (SIGKILL) leaves
    // them to the next run to turn on, rather than off for good.
    let recorded = lb_io::offload::record_path(std::path::Path::new(OFFLOAD_RECORDS), name)
        .and_then(|record| lb_io::offload::rx_vlan_off_recorded(name, &record));
    let off = match recorded {
        Ok(r) => Ok(r),
        Err(e) => {
            tracing::warn!(
                interface = name,
                "cannot record the receive VLAN offloads under {OFFLOAD_RECORDS} ({e}); a run killed with SIGKILL would leave them off"
            );
            lb_io::offload::rx_vlan_off(name)
        }
    };
    match off {
        Ok(r) => {
            if !r.turned_off.is_empty() {
                tracing::info!(interface = name, features = ?r.turned_off, "receive VLAN offloads turned off until exit, so VLAN tags reach the load balancer");
            }
            if !r.still_on.is_empty() {
                tracing::warn!(interface = name, features = ?r.still_on, "receive VLAN offloads cannot be turned off: VLAN-tagged frames reach the load balancer untagged and leave untagged; serve untagged traffic on this interface");
            }
            Some(r)
        }
        Err(e) => {
            tracing::warn!(
                interface = name,
                "cannot read or turn off the receive VLAN offloads ({e}); VLAN-tagged frames may reach the load balancer untagged"
            );
            None
        }
    }
}

/// The receive queues of interface `name` (its `/sys/class/net/NAME/queues/rx-N`) that `served`
/// leaves out, in order; `None` when they cannot be read (no such interface).
fn unserved_rx_queues(name: &str, served: &[u32]) -> Option<Vec<u32>> {
    let dir = std::fs::read_dir(format!("/sys/class/net/{name}/queues")).ok()?;
    let mut out: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("rx-")?.parse().ok())
        .filter(|q| !served.contains(q))
        .collect();
    out.sort_unstable();
    Some(out)
}

/// The receive queues of one interface that no poll loop serves, watched: the NIC's RSS can put
/// frames on them, the XDP program finds no socket there and leaves them to the kernel, which knows
/// no VIP, so part of the traffic is lost without a counter of ours. Warned of at start and again
/// whenever they change while `lb run` runs (`ethtool -L IF combined N` giving the NIC more queues:
/// the flows RSS moves to them are lost), so a change is never silent.
#[derive(Debug)]
struct UnservedQueues {
    interface: String,
    served: Vec<u32>,
    /// The queues not served, as last read.
    unserved: Vec<u32>,
}

impl UnservedQueues {
    /// Reads `interface`'s queues and warns when some are not among `served`.
    fn new(interface: &str, served: &[u32]) -> Self {
        let mut queues =
            UnservedQueues { interface: interface.to_string(), served: served.to_vec(), unserved: Vec::new() };
        queues.check();
        queues
    }

    /// Reads the queues again; warns when those not served changed and some are, says so when none
    /// is any more. Nothing when they cannot be read (an interface that is gone fails its loops).
    fn check(&mut self) {
        let Some(unserved) = unserved_rx_queues(&self.interface, &self.served) else { return };
        if unserved == self.unserved {
            return;
        }
        let name = self.interface.as_str();
        if unserved.is_empty() {
            tracing::info!(interface = name, "every receive queue of {name} is served again");
        } else {
            tracing::warn!(
                interface = name,
                queues = ?unserved,
                "receive queues not served: their frames go to the kernel, not the load balancer; serve them, or \
                 leave the NIC only the served ones (ethtool -L {name} combined N) or steer VIP traffic away (ethtool -X / -N)"
            );
        }
        self.unserved = unserved;
    }
}

/// How many ports of `snat` the kernel may also hand out as ephemeral source ports: those in `local`
/// (`net.ipv4.ip_local_port_range`, which IPv6 shares) and not in `reserved`
/// (`net.ipv4.ip_local_reserved_ports`: "40000-40999,50000", empty for none; an unparsable part is
/// read as reserving nothing).
fn ephemeral_overlap(snat: (u16, u16), local: (u16, u16), reserved: &str) -> u32 {
    let reserved: Vec<(u16, u16)> = reserved
        .trim()
        .split(',')
        .filter_map(|r| {
            let (a, b) = r.trim().split_once('-').unwrap_or((r.trim(), r.trim()));
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    let (lo, hi) = (snat.0.max(local.0), snat.1.min(local.1));
    (lo..=hi).filter(|p| !reserved.iter().any(|&(a, b)| (a..=b).contains(p))).count() as u32
}

/// Warns when a SNAT address is one of the node's own and the kernel may pick source ports of
/// `snat_ports` for the node's own connections: the replies to those are steered to the load
/// balancer and dropped as `no_reverse_flow` (README, "The SNAT address").
fn warn_if_snat_ports_are_ephemeral(node: &lb_core::config::NodeConfig) {
    let own = lb_io::interface::local_addresses().unwrap_or_default();
    let Some(addr) =
        [node.snat_v4.map(IpAddr::V4), node.snat_v6.map(IpAddr::V6)].into_iter().flatten().find(|a| own.contains(a))
    else {
        return;
    };
    let read = |f: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{f}")).ok();
    let Some(local) = read("ip_local_port_range").and_then(|r| {
        let mut it = r.split_whitespace().map(|p| p.parse::<u16>().ok());
        Some((it.next()??, it.next()??))
    }) else {
        return;
    };
    let n = ephemeral_overlap(node.snat_ports, local, &read("ip_local_reserved_ports").unwrap_or_default());
    if n > 0 {
        let (first, last) = node.snat_ports;
        tracing::warn!(
            "node.snat_ports {first}-{last} on {addr}, an address of this node, shares {n} ports with the kernel's \
             ephemeral range {}-{}: replies to the node's own connections from those ports would be dropped; \
             reserve them (sysctl net.ipv4.ip_local_reserved_ports={first}-{last}) or move the range",
            local.0,
            local.1
        );
    }
}

/// Refuses connection tables larger than the memory `lb run` may use (`mem_total` bytes, from
/// [`memory_limit`]; `None` when unknown: not checked): each of `loops` poll loops has one of
/// `entries` (as lb-core sizes it, `ConntrackTable::bytes_for`). Checked before anything is set up:
/// an allocation that fails aborts `lb run` on the spot, with the interfaces half set up (their
/// receive VLAN offloads left off), and tables beyond a container's limit get it OOMKilled.
/// Returns the tables' bytes, for the Maglev budget ([`maglev_budget`]).
fn check_conntrack_memory(entries: usize, loops: usize, mem_total: Option<u64>) -> Result<u64, String> {
    if loops == 0 {
        return Ok(0);
    }
    let bytes = lb_core::conntrack::ConntrackTable::bytes_for(entries)
        .and_then(|table| u128::try_from(table).ok())
        .map(|table| table * loops as u128);
    let Some(mem_total) = mem_total else {
        return Ok(bytes.and_then(|b| u64::try_from(b).ok()).unwrap_or(u64::MAX));
    };
    match bytes {
        Some(b) if b <= u128::from(mem_total) => Ok(u64::try_from(b).unwrap_or(u64::MAX)),
        _ => Err(format!(
            "--conntrack-entries {entries}: the connection tables of {loops} poll loop(s) would need more than the {} MiB of memory this process may use (the node's, or its cgroup's limit where lower: a container's memory limit); give fewer entries per core (the default is {}) or raise the limit",
            mem_total >> 20,
            1 << 18
        )),
    }
}

/// The Maglev table entries (up to 6 bytes each, lb-core's `Limits::max_maglev_entries`) the tables
/// may hold in `mem_total` bytes, the memory this process may use ([`memory_limit`]), beside
/// `conntrack_bytes` of connection tables.
///
/// Without `--maglev-entries` (`asked` `None`): lb-core's default, or what half of that memory holds
/// where less (the rest is for the connection tables, UMEM, counters, the Kubernetes objects, and a
/// rebuilt table's old copy), so a cluster's Services cannot have a container's tables grow past its
/// memory limit and get it OOMKilled on every node: those beyond are left out, naming the limit.
///
/// With it: that many, above the default too, if they fit the memory left beside the connection
/// tables; more is refused at start, naming both, as connection tables beyond the memory are
/// ([`check_conntrack_memory`]): an operator who sets the budget says how the memory is shared.
fn maglev_budget(asked: Option<usize>, mem_total: Option<u64>, conntrack_bytes: u64) -> Result<usize, String> {
    let Some(asked) = asked else {
        let default = Limits::default().max_maglev_entries;
        let fits = mem_total.map_or(u64::MAX, |m| m / 2 / MAGLEV_ENTRY_BYTES);
        return Ok(usize::try_from(fits).map_or(default, |fits| fits.min(default)));
    };
    let Some(mem_total) = mem_total else { return Ok(asked) };
    let left = mem_total.saturating_sub(conntrack_bytes);
    match u64::try_from(asked).ok().and_then(|n| n.checked_mul(MAGLEV_ENTRY_BYTES)) {
        Some(bytes) if bytes <= left => Ok(asked),
        _ => Err(format!(
            "--maglev-entries {asked}: {MAGLEV_ENTRY_BYTES} bytes an entry would need more than the {} MiB of memory this process may use (the node's, or its cgroup's limit where lower) beside its {} MiB of connection tables; give at most {}, or raise the limit",
            mem_total >> 20,
            conntrack_bytes >> 20,
            left / MAGLEV_ENTRY_BYTES
        )),
    }
}

/// Bytes a Maglev table entry takes at most: 2 in the table, and under mh 4 more in its ring of
/// backend slots (lb-core's `Limits::max_maglev_entries`).
const MAGLEV_ENTRY_BYTES: u64 = 6;

/// This node's memory (`MemTotal` of /proc/meminfo) in bytes, if it can be read.
fn mem_total() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().strip_suffix("kB")?.trim();
    kib.parse::<u64>().ok()?.checked_mul(1024)
}

/// The memory `lb run` may use: the node's (`node`, [`mem_total`]), or its cgroup's limit
/// (`cgroup`, [`cgroup_memory_limit`]) where lower, as in a container with a memory limit, beyond
/// which the kernel kills it however much the node has.
fn memory_limit(node: Option<u64>, cgroup: Option<u64>) -> Option<u64> {
    match (node, cgroup) {
        (Some(n), Some(c)) => Some(n.min(c)),
        (n, c) => n.or(c),
    }
}

/// The memory limit of the cgroup that `proc_self_cgroup` (the text of /proc/self/cgroup) names,
/// cgroupfs mounted at `root`: v2's `memory.max`, v1's memory controller's `memory.limit_in_bytes`
/// (a huge number for none); `None` for no limit (`max`) or none readable. Each is looked for in the
/// cgroup's directory under the mount, then at the mount's root, where a container that is not in
/// a cgroup namespace of its own has its cgroup mounted.
fn cgroup_memory_limit(proc_self_cgroup: &str, root: &std::path::Path) -> Option<u64> {
    let read = |file: std::path::PathBuf| std::fs::read_to_string(file).ok()?.trim().parse::<u64>().ok();
    proc_self_cgroup.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let (mount, file) = match controllers {
            "" => (root.to_path_buf(), "memory.max"),
            c if c.split(',').any(|c| c == "memory") => (root.join("memory"), "memory.limit_in_bytes"),
            _ => return None,
        };
        let own = mount.join(path.trim_start_matches('/')).join(file);
        if own.exists() { read(own) } else { read(mount.join(file)) }
    })
}

/// The index and MAC of each interface of `interfaces`, in order; an error names the first that
/// does not exist, or has no MAC. The MAC is the source of every frame the interface's loops send
/// and the one ARP / NDP answers carry (`node.local_mac` is one value for every interface, and for
/// every node sharing the file; a switch or a cloud network checking source MACs drops the others).
fn interfaces_found(interfaces: &[lb_examples::config::InterfaceConfig]) -> Result<Vec<(u32, [u8; 6])>, String> {
    interfaces
        .iter()
        .enumerate()
        .map(|(i, iface)| {
            let name = &iface.name;
            let ifindex = lb_io::xsk::ifindex(name)
                .ok_or_else(|| format!("interfaces[{i}]: no interface {name} in this network namespace"))?;
            let mac = lb_io::interface::mac_address(name).map_err(|e| format!("interfaces[{i}]: {name}: {e}"))?;
            Ok((ifindex, mac))
        })
        .collect()
}

/// How a poll loop of `lb run` ended: its counts (up to its failure, for one that failed; none
/// for one that panicked) and, if it failed, why.
struct LoopEnd {
    stats: Option<LoopStats>,
    failure: Option<String>,
}

/// Waits in a thread of its own for the loop `running`, named `name`, to end. One that fails is
/// logged and told to `failed`, which stops `lb run`.
fn watch_loop<D: Send + 'static, P: Send + 'static>(
    running: Running<D, P>,
    name: String,
    failed: Arc<tokio::sync::Notify>,
) -> std::thread::JoinHandle<LoopEnd> {
    std::thread::spawn(move || {
        let (stats, why) = match running.join() {
            Ok(Ok(report)) => return LoopEnd { stats: Some(report.stats), failure: None },
            Ok(Err(e)) => (Some(e.report.stats), e.to_string()),
            Err(_) => (None, "panicked".to_string()),
        };
        tracing::error!(poll_loop = name, "poll loop failed: {why}; stopping");
        failed.notify_one();
        LoopEnd { stats, failure: Some(format!("poll loop {name} failed: {why}")) }
    })
}

/// Waits for the loops' watchers ([`watch_loop`]) and logs the loops' counts, summed over them and
/// over the run; returns why each loop that failed did. The loops stop after the control plane,
/// `/metrics` with it, has gone: what they count as they stop (the frames they send from their
/// inboxes and queues, those handed to a loop that had left, refused and lost) is seen in this
/// line or nowhere. A last scrape is not waited for: it would hold up every restart by a scrape
/// interval.
fn join_loops(watchers: Vec<std::thread::JoinHandle<LoopEnd>>) -> Vec<String> {
    let mut failures = Vec::new();
    let mut total = LoopStats::default();
    let mut loops = 0usize;
    for end in watchers.into_iter().filter_map(|w| w.join().ok()) {
        if let Some(stats) = &end.stats {
            total += stats;
            loops += 1;
        }
        failures.extend(end.failure);
    }
    if loops > 0 {
        tracing::info!(
            loops,
            rx = total.rx,
            tx = total.tx,
            pass = total.pass,
            drop = total.drop,
            handed_off = total.handed_off,
            handed_in = total.handed_in,
            handoff_lost = total.handoff_lost,
            handoff_refused = total.handoff_refused,
            tx_declined = total.tx_declined,
            tx_abandoned = total.tx_abandoned,
            kernel_rx_dropped = total.kernel_rx_dropped,
            "poll loops ended; their counts over the run, summed, with what they counted as they stopped, after \
             /metrics had gone (handoff_refused: frames handed to a loop that had left, in handoff_lost and drop too)"
        );
    }
    failures
}

/// An interface whose queues [`Loops::start`] starts loops on.
struct ServedInterface<'a> {
    name: &'a str,
    queues: &'a [u32],
    /// Its MAC as read at start, which its loops send from.
    own_mac: [u8; 6],
    /// Its MAC as read at each refresh, which its loops follow.
    mac: &'a Arc<InterfaceMac>,
    /// The MAC its loops answer ARP / NDP with (`--neighbour-responder`), if they answer.
    neighbour_mac: Option<[u8; 6]>,
}

/// The poll loops `lb run` has started, and what each next one starts from. Dropped before
/// [`Loops::stop_and_join`] (a step of the setup failing after some loops started: the next
/// queue's socket, the XDP program's attach), it stops and joins them, their counts logged
/// ([`join_loops`]): none runs on while the sockets, programs and offloads set up for it are torn
/// down, and none ends uncounted. Held in `main` after all those, so dropped before them.
struct Loops {
    /// Every loop's: set, they all stop.
    stop: StopFlag,
    /// Told when a loop fails ([`watch_loop`]).
    failed: Arc<tokio::sync::Notify>,
    watchers: Vec<std::thread::JoinHandle<LoopEnd>>,
    /// The tables every loop starts on (see `main`).
    empty: Arc<Tables>,
    /// Each loop's connection-table entries (`--conntrack-entries`).
    conntrack_entries: usize,
    /// How many loops there are to be.
    cores: u16,
    /// Loop i is pinned to core `first_core + i` (`--first-core`).
    first_core: Option<usize>,
    snat_ports: (u16, u16),
    /// The handoff mesh's ends, in loop order (none with one loop).
    handoff: std::vec::IntoIter<lb_io::handoff::Handoff>,
}

impl Loops {
    /// Starts a poll loop on each of `iface`'s queues, on the device `open` gives for it (its
    /// socket, registered with the interface's steering), and hands its update channel to `senders`
    /// and its counters to `counters`. An error leaves the loops started so far running, for
    /// `self`'s drop to stop.
    fn start<D: lb_io::Device + Send + 'static>(
        &mut self,
        iface: &ServedInterface<'_>,
        senders: &mut Vec<UpdateSender<Arc<Tables>>>,
        counters: &mut PublishedCounters,
        mut open: impl FnMut(u32) -> Result<D, Box<dyn std::error::Error + Send + Sync>>,
    ) -> CmdResult {
        for &q in iface.queues {
            let i = self.watchers.len();
            let dev = open(q)?;
            let core_index = u16::try_from(i)?;
            let mut worker = Worker::new(
                self.empty.clone(),
                WorkerConfig { conntrack_capacity: self.conntrack_entries, core_index, core_count: self.cores },
            );
            worker.set_neighbour_mac(iface.neighbour_mac);
            worker.set_source_mac(Some(iface.own_mac));
            if let Some((lo, hi)) = snat_port_share(self.snat_ports, core_index, self.cores) {
                tracing::info!(interface = %iface.name, queue = q, "NAT replies to SNAT ports {lo}-{hi} are translated on this queue's loop (handed over from any other)");
            }
            let (mut processor, published) = LbProcessor::new(worker);
            processor.follow_mac(iface.mac.clone());
            counters.0.push(published);
            let (tx, rx) = update_channel();
            senders.push(tx);
            let core = self.first_core.map(|c| c + i);
            let mut lp = PollLoop::new(dev, processor, rx, self.stop.clone(), LoopConfig::default());
            counters.1.push(lp.counters());
            // The mesh's ends are in loop (core_index) order.
            if let Some(end) = self.handoff.next() {
                lp = lp.with_handoff(end);
            }
            let name = format!("lb-{}-q{q}", iface.name);
            // Pinned before this returns; a core that cannot be had stops the loops already running
            // (as `self` drops).
            let running = lp.spawn(name.clone(), core)?;
            self.watchers.push(watch_loop(running, name, self.failed.clone()));
        }
        Ok(())
    }

    /// Stops the loops and waits for them, their counts logged; returns why each that failed did.
    fn stop_and_join(mut self) -> Vec<String> {
        self.stop.stop();
        join_loops(std::mem::take(&mut self.watchers))
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        if !self.watchers.is_empty() {
            self.stop.stop();
            join_loops(std::mem::take(&mut self.watchers));
        }
    }
}

/// Starts the loops, runs the control plane until SIGINT/SIGTERM, stops the loops.
pub fn main(args: Args) -> CmdResult {
    // Until the control plane listens for SIGHUP (a reload), one must not end the run half set up.
    lb_io::stop::survive_hangup()?;
    // Health probes, watches and clients of the metrics and health check node ports each take a
    // descriptor: run out of them (the soft limit is often 1024) and probes of healthy backends fail.
    match lb_io::limits::raise_open_files_limit() {
        Ok((soft, hard)) if soft < hard => {
            tracing::debug!("soft limit on open files raised from {soft} to the hard limit, {hard}");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot raise the soft limit on open files to the hard limit: {e}"),
    }
    let loaded = lb_examples::config::file::load(&args.config).map_err(|e| e.naming(&args.config))?;
    let settings = &loaded.settings;
    warn_if_snat_ports_are_ephemeral(&settings.node);
    StopFlag::watch_signals()?;
    let queues: Vec<(String, u32)> =
        settings.interfaces.iter().flat_map(|i| i.queues.iter().map(move |q| (i.name.clone(), *q))).collect();
    let cores = u16::try_from(queues.len()).map_err(|_| "too many queues")?;
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| cgroup_memory_limit(&c, std::path::Path::new("/sys/fs/cgroup")));
    let memory = memory_limit(mem_total(), cgroup);
    let conntrack_bytes = check_conntrack_memory(args.conntrack_entries, queues.len(), memory)?;
    let maglev_entries = maglev_budget(args.maglev_entries, memory, conntrack_bytes)?;
    if args.maglev_entries.is_none() && maglev_entries < Limits::default().max_maglev_entries {
        tracing::info!(
            maglev_entries,
            memory_mib = memory.unwrap_or(0) >> 20,
            "Maglev tables bounded to half the memory this process may use (6 bytes an entry): Kubernetes Services beyond are left out, a file beyond is rejected"
        );
    }
    let mode = if args.generic { AttachMode::Generic } else { AttachMode::Auto };
    let steering_config = SteeringConfig::default();
    if args.nat_replies_steered {
        tracing::info!("--nat-replies-steered is no longer needed: loops hand each other the replies RSS misdelivers");
    }
    // With several loops, each hands the NAT replies to another loop's SNAT ports to that loop: the
    // NIC's RSS hash spreads replies over the queues by the backend's address and ports.
    let handoff =
        if cores > 1 { lb_io::handoff::mesh(queues.len(), HandoffConfig::default())? } else { Vec::new() }.into_iter();
    let mut workers = Workers::new(steering_config, args.neighbour_responder, snat_settings(&settings.node));
    workers.limits.max_maglev_entries = maglev_entries;
    // Workers start on empty tables of the file's node settings (no flows can exist before the
    // control plane's first tables arrive, so its own builder's slot numbers are safe to take over),
    // with the run's connection table seed, which the control plane's builder takes from `workers`.
    let empty = TableBuilder::new()
        .with_conntrack_seed(workers.conntrack_seed)
        .build(&Config { node: settings.node.clone(), services: Vec::new() })?;
    let mut counters = PublishedCounters::default();
    let mut links = Vec::new();
    // Held to the end: dropping them turns back on the VLAN offloads they turned off.
    let mut vlan_offloads = Vec::new();
    // After all it runs over, so dropped before them: a step below that fails stops and joins the
    // loops started before it.
    let mut loops = Loops {
        stop: StopFlag::new(),
        // A loop that ends before it is asked to (its device failed: say the interface went away)
        // stops `lb run` with an error, so a supervisor restarts it, instead of serving on with a
        // dead queue.
        failed: Arc::new(tokio::sync::Notify::new()),
        watchers: Vec::new(),
        empty,
        conntrack_entries: args.conntrack_entries,
        cores,
        first_core: args.first_core,
        snat_ports: settings.node.snat_ports,
        handoff,
    };
    // Every interface is looked up before any is set up: one missing (a typo) must not cost the
    // others before it an attach and detach of the XDP program and a toggle of their offloads, each
    // of which resets the rings of many NICs, at every restart of a crash-looping DaemonSet.
    let found = interfaces_found(&settings.interfaces)?;
    for (iface, &(_, own_mac)) in settings.interfaces.iter().zip(&found) {
        vlan_offloads.extend(rx_vlan_offload_off(&iface.name));
        workers.queues.push(UnservedQueues::new(&iface.name, &iface.queues));
        // The queue map needs a slot up to the highest queue served (a NIC may have more than the
        // default's 64 queues); frames of the queues past its end go to the kernel. No interface has
        // more than 4096 (rtnetlink's limit): a queue beyond is left to its socket's bind to refuse,
        // naming it, rather than sizing a map of gigabytes.
        let queues = iface.queues.iter().max().map_or(1, |q| q.saturating_add(1)).min(4096);
        let steering = VipSteering::load(SteeringConfig { queues, ..steering_config })?;
        counters.2.push((iface.name.clone(), steering.counters()?));
        // Held by `workers` from here, so a start failing below drops it after the loops on its
        // sockets (`loops` is declared after `workers`); the attached program keeps its maps anyway.
        let n = workers.steering.len();
        workers.steering.push(steering);
        // Frames its loops send leave from this interface's own MAC (see `interfaces_found`).
        if own_mac != settings.node.local_mac {
            tracing::info!(
                interface = %iface.name,
                "frames leave {} from its own MAC {}, not node.local_mac {}",
                iface.name,
                lb_io::netns::format_mac(own_mac),
                lb_io::netns::format_mac(settings.node.local_mac)
            );
        }
        // Read again at each refresh; the loops follow it.
        let mac = Arc::new(InterfaceMac::new(own_mac));
        workers.macs.push((iface.name.clone(), mac.clone()));
        let neighbour_mac = match args.neighbour_responder {
            NeighbourResponder::Off => None,
            _ => {
                match MulticastGroups::new(&iface.name) {
                    Ok(g) => workers.groups.push(g),
                    Err(e) => tracing::warn!(
                        "{}: cannot join IPv6 groups ({e}); the responder answers IPv4 only unless solicitations arrive anyway",
                        iface.name
                    ),
                }
                match PacketSocket::open(&iface.name) {
                    Ok(s) => workers.announcers.push((iface.name.clone(), s, mac.clone())),
                    Err(e) => tracing::warn!(interface = %iface.name, "no announcements of the VIPs: {e}"),
                }
                Some(own_mac)
            }
        };
        let served = ServedInterface { name: &iface.name, queues: &iface.queues, own_mac, mac: &mac, neighbour_mac };
        let steering = &workers.steering[n];
        loops.start(&served, &mut workers.loops, &mut counters, |q| {
            let dev = XskDevice::open(&XskConfig::new(&iface.name, q))?;
            steering.set_socket(q, dev.fd())?;
            Ok(dev)
        })?;
    }
    // Attached once every interface's sockets are open, so a socket that cannot be (a queue the
    // interface does not have, one another program holds) fails the start with no program attached
    // anywhere: attaching and detaching one resets the rings of many NICs.
    for ((iface, &(ifindex, _)), steering) in settings.interfaces.iter().zip(&found).zip(&workers.steering) {
        links.push(
            steering.attach(ifindex, mode).map_err(|e| format!("{}: attaching the XDP program: {e}", iface.name))?,
        );
    }
    if queues.is_empty() {
        tracing::warn!(
            "no interfaces configured: a dry run of the control plane; its tables are built and shown by \
             `lb list`, but no packet is served"
        );
    } else {
        tracing::info!(loops = queues.len(), "poll loops running");
    }
    // The control plane starts from the same load, so it knows the interfaces and SNAT settings the
    // loops were set up with, and applies an edit made since as a reload.
    let loop_failed = loops.failed.clone();
    let result = run_blocking(&args.config, loaded, workers, Arc::new(counters), async move {
        loop_failed.notified().await;
    });
    let failures = loops.stop_and_join();
    drop(links);
    drop(vlan_offloads);
    match result {
        // A SIGTERM or SIGINT while the control plane starts stops the loops it is publishing to, so
        // its first tables cannot be delivered: that is the stop asked for, not a failure.
        Err(e) if StopFlag::signalled() => tracing::info!("stopped while starting: {e}"),
        // A loop that failed before its first tables reached it (its interface deleted at start)
        // is why they were not delivered: name the loop first, not only the control plane's error.
        Err(e) if !failures.is_empty() => return Err(format!("{}; and so {e}", failures.join("; ")).into()),
        result => result?,
    }
    if !failures.is_empty() {
        return Err(failures.join("; ").into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use lb_core::config::{Config, ForwardMode};
    use lb_core::worker::snat_port_owner;

    use lb_io::bpf::xdp::SteeringConfig;

    use super::{
        InterfaceMac, Limits, Loops, NeighbourResponder, ServedInterface, SteeringMaps, TableBuilder, TablesSink,
        Workers, cgroup_memory_limit, check_conntrack_memory, check_nat_replies, check_steering_capacity,
        ephemeral_overlap, join_loops, maglev_budget, mem_total, memory_limit, snat_settings, steering_for,
        unserved_rx_queues, watch_loop,
    };
    use lb_core::service::Tables;
    use lb_core::{Frame, Instant, Verdict};
    use lb_io::bpf::xdp::SteeringSet;
    use lb_io::testing::NoTraffic;
    use lb_io::{
        BurstProcessor, HandoffConfig, LoopConfig, MemoryConfig, MemoryDevice, PollLoop, Running, StopFlag,
        update_channel,
    };
    use std::collections::BTreeSet;
    use std::net::IpAddr;
    use std::sync::{Arc, Mutex, mpsc};

    /// A reload that gives a node its first SNAT address (one of the node's own, its range inside
    /// the kernel's ephemeral ports) gets the warning `lb run` gives such a file at start: the
    /// node's own connections from those ports would lose their replies. Before, only the file
    /// `lb run` started with was checked, and a SNAT address added by reload went unwarned.
    #[test]
    fn a_snat_address_a_reload_adds_is_checked_against_the_ephemeral_ports() {
        let read = |f: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{f}")).ok();
        let local = read("ip_local_port_range").and_then(|r| {
            let mut it = r.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        });
        let own = lb_io::interface::local_addresses().unwrap_or_default();
        let addr = own.iter().find_map(|a| match a {
            IpAddr::V4(a) if !a.is_loopback() => Some(*a),
            _ => None,
        });
        let (Some(local), Some(addr)) = (local, addr) else {
            println!("SKIPPED: no ephemeral port range to read, or no non-loopback IPv4 address here");
            return;
        };
        if ephemeral_overlap(local, local, &read("ip_local_reserved_ports").unwrap_or_default()) == 0 {
            println!("SKIPPED: the kernel's ephemeral ports are all reserved here");
            return;
        }
        let (log, _guard) = lb_examples::log_capture::Captured::install();

        let started = config().node;
        let mut started = lb_core::config::NodeConfig { snat_v4: None, snat_v6: None, ..started };
        started.snat_ports = local;
        let mut workers: Workers =
            Workers::new(SteeringConfig::default(), NeighbourResponder::Off, snat_settings(&started));
        let reloaded = lb_core::config::NodeConfig { snat_v4: Some(addr), ..started };
        let tables = Arc::new(
            TableBuilder::new()
                .build(&Config { node: reloaded, services: Vec::new() })
                .expect("a node of own SNAT address"),
        );
        workers.publish(&tables).expect("no loops to refuse them");
        let text = log.text();
        let warned = format!("on {addr}, an address of this node, shares");
        assert_eq!(text.matches(&warned).count(), 1, "{text}");
        // The same settings again: nothing new to say.
        workers.publish(&tables).expect("no loops to refuse them");
        let text = log.text();
        assert_eq!(text.matches(&warned).count(), 1, "{text}");
    }

    /// Records every steering set written.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<SteeringSet>>>);

    impl SteeringMaps for Recorder {
        fn steer(&mut self, want: SteeringSet) -> Result<(), String> {
            self.0.lock().map_err(|_| "recorder poisoned")?.push(want);
            Ok(())
        }
    }

    impl Recorder {
        /// The set last written (nothing steered before the first).
        fn last(&self) -> SteeringSet {
            self.0.lock().expect("recorder").last().cloned().unwrap_or_default()
        }
    }

    /// Holds the tables its loop applied, as lb-core's worker does.
    struct Holder(Arc<Tables>);

    impl BurstProcessor for Holder {
        type Update = Arc<Tables>;
        fn process_burst(&mut self, _frames: &mut [Frame<'_>], _now: Instant, verdicts: &mut [Verdict]) {
            verdicts.fill(Verdict::Pass);
        }
        fn apply(&mut self, update: Arc<Tables>) -> Arc<Tables> {
            std::mem::replace(&mut self.0, update)
        }
    }

    /// A poll loop in a thread of its own, whose update channel `Workers` holds, on a device that
    /// receives nothing and stops in each receive until the test lets it go on: while it is stopped
    /// there, its loop applies no update.
    struct GatedLoop {
        at_receive: mpsc::Receiver<()>,
        go: mpsc::Sender<()>,
        stop: StopFlag,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl GatedLoop {
        /// Starts a loop on `tables` and returns once it stands in its first receive.
        fn start<M: SteeringMaps>(workers: &mut Workers<M>, tables: &Arc<Tables>) -> Self {
            let (tx, rx) = update_channel();
            workers.loops.push(tx);
            let (at_tx, at_receive) = mpsc::channel();
            let (go, go_rx) = mpsc::channel();
            let stop = StopFlag::new();
            let device = NoTraffic(move || {
                let _ = at_tx.send(());
                let _ = go_rx.recv();
                Ok(())
            });
            let lp = PollLoop::new(device, Holder(tables.clone()), rx, stop.clone(), LoopConfig::default());
            let thread = std::thread::spawn(move || {
                lp.run().expect("the gated loop runs");
            });
            at_receive.recv().expect("the loop reaches its first receive");
            GatedLoop { at_receive, go, stop, thread: Some(thread) }
        }

        /// Lets the loop run one round (applying the update waiting, if any) to its next receive.
        fn step(&self) {
            self.go.send(()).expect("the loop runs");
            self.at_receive.recv().expect("the loop reaches its next receive");
        }
    }

    impl Drop for GatedLoop {
        fn drop(&mut self) {
            self.stop.stop();
            let _ = self.go.send(());
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// Two loops on empty tables, `Workers` over them and a recorder of the steering.
    fn gated_workers(cfg: &Config, builder: &mut TableBuilder) -> (Workers<Recorder>, Recorder, Vec<GatedLoop>) {
        let recorder = Recorder::default();
        let mut workers = Workers::new(SteeringConfig::default(), NeighbourResponder::Off, snat_settings(&cfg.node));
        workers.steering.push(recorder.clone());
        let empty = builder.build(&Config { node: cfg.node.clone(), services: Vec::new() }).expect("empty tables");
        let loops = vec![GatedLoop::start(&mut workers, &empty), GatedLoop::start(&mut workers, &empty)];
        (workers, recorder, loops)
    }

    /// Each run draws a connection table seed of its own (so a sender cannot work it out from
    /// another node or an earlier run) and builds every table with it: the loops' first tables and
    /// the control plane's, at start and at each reload, which a worker started on the first
    /// therefore takes (a worker refuses tables of another seed).
    #[tokio::test]
    async fn a_run_draws_its_own_conntrack_seed_and_keeps_it_across_reloads() {
        use lb_core::conntrack::ConntrackSeed;
        use lb_examples::control::{Control, ControlInput};
        let new = || {
            Workers::<Recorder>::new(SteeringConfig::default(), NeighbourResponder::Off, snat_settings(&config().node))
        };
        let (workers, other) = (new(), new());
        let seed = workers.conntrack_seed;
        assert_ne!(seed, other.conntrack_seed, "two runs, two seeds");
        assert_ne!(seed, ConntrackSeed::UNSEEDED);
        assert_eq!(TablesSink::conntrack_seed(&workers), seed);
        let file = |backend: &str| {
            let text = format!(
                "node: {{ gateway_mac: \"02:00:00:00:00:fe\", snat_v4: 10.0.0.2, snat_ports: [40000, 50000] }}\nservices:\n  \
                 - {{ name: nat, vip: 10.0.0.11, port: 80, mode: nat, backends: [{{ addr: {backend}, port: 8080 }}] }}\n"
            );
            ControlInput::File(Box::new(lb_examples::config::file::parse(&text).expect("a good file")))
        };
        let mut control = Control::new(workers);
        let first = control.apply(file("10.1.0.2")).expect("the first file");
        let reloaded = control.apply(file("10.1.0.3")).expect("a reload");
        assert_eq!((first.conntrack_seed(), reloaded.conntrack_seed()), (seed, seed));
        let mut worker = lb_core::worker::Worker::new(first, lb_core::worker::WorkerConfig::single_core(1024));
        drop(worker.swap_tables(reloaded.clone()));
        assert!(Arc::ptr_eq(worker.tables(), &reloaded));
        assert_eq!(worker.stats().tables_refused, 0);
    }

    /// A service's frames are steered to the sockets only while every poll loop's tables serve it:
    /// a new service once every loop has swapped in the tables that have it, and a removed one no
    /// longer from the moment the tables without it go out. Before, `publish` steered the new
    /// tables' services at once, while the loops still held the old tables, which pass a new
    /// service's frames (lost on AF_XDP); and a removed service stayed steered while loops that had
    /// swapped passed its frames (lost: no reset from the kernel for a removed NodePort).
    #[test]
    fn steering_follows_the_tables_every_loop_has_swapped_in() {
        let cfg = config();
        let (dsr, nat) = (cfg.services[0].clone(), cfg.services[1].clone());
        let mut old = dsr.clone();
        old.name = "old".into();
        old.key.vip = "10.0.0.12".parse().expect("address");
        let mut builder = TableBuilder::new();
        let (mut workers, recorder, loops) = gated_workers(&cfg, &mut builder);
        let steered = |t: &Arc<Tables>| steering_for(t, NeighbourResponder::Off);
        let key = |s: &lb_core::config::ServiceConfig| (s.key.vip, s.key.port, s.key.proto.number());

        // The first tables: nothing is steered until both loops run them.
        let first = builder.build(&Config { node: cfg.node.clone(), services: vec![dsr.clone(), old.clone()] });
        let first = first.expect("dsr and old");
        workers.publish(&first).expect("published");
        assert_eq!(recorder.last(), SteeringSet::default(), "steered before a loop swapped the tables in");
        assert!(workers.has_pending(), "the steering waits for the loops");
        loops[0].step();
        workers.deliver_pending().expect("nothing to fail");
        assert_eq!(recorder.last(), SteeringSet::default(), "steered before loop 1 swapped the tables in");
        loops[1].step();
        workers.deliver_pending().expect("steered");
        assert_eq!(recorder.last(), steered(&first));
        assert!(!workers.has_pending());

        // A reload: old goes, nat (with its SNAT address) comes. Only dsr, in both, stays steered
        // while a loop may hold either tables.
        let second = builder.build(&Config { node: cfg.node.clone(), services: vec![dsr.clone(), nat.clone()] });
        let second = second.expect("dsr and nat");
        workers.publish(&second).expect("published");
        let during = recorder.last();
        assert_eq!(during.services, BTreeSet::from([key(&dsr)]), "{during:?}");
        assert!(during.snat.is_empty(), "the SNAT address steered before the loops serve NAT: {during:?}");
        loops[1].step();
        workers.deliver_pending().expect("nothing to fail");
        assert_eq!(recorder.last(), during, "steered before loop 0 swapped the tables in");
        loops[0].step();
        workers.deliver_pending().expect("steered");
        assert_eq!(recorder.last(), steered(&second));
        assert!(steered(&second).services.contains(&key(&nat)) && !steered(&second).snat.is_empty());
        assert!(!workers.has_pending());
        drop(loops);
    }

    /// A loop that does not swap the new tables in keeps their new services unsteered (what both
    /// tables serve stays steered), with one warning naming it once the wait is long; when it
    /// catches up, the steering follows.
    #[test]
    fn a_loop_slow_to_swap_the_tables_in_is_warned_of_and_waited_for() {
        let cfg = config();
        let mut builder = TableBuilder::new();
        let (mut workers, recorder, loops) = gated_workers(&cfg, &mut builder);
        workers.slow_swap_warning = std::time::Duration::ZERO;
        let (log, _guard) = lb_examples::log_capture::Captured::install();
        let tables = builder.build(&cfg).expect("dsr and nat");
        workers.publish(&tables).expect("published");
        loops[0].step();
        let warned = "poll loops have not swapped in the new tables";
        for _ in 0..3 {
            workers.deliver_pending().expect("nothing to fail");
            assert_eq!(recorder.last(), SteeringSet::default(), "steered before loop 1 swapped the tables in");
            assert!(workers.has_pending());
        }
        let text = log.text();
        assert_eq!(text.matches(warned).count(), 1, "{text}");
        assert!(text.contains("workers=[1]"), "{text}");
        loops[1].step();
        workers.deliver_pending().expect("steered");
        assert_eq!(recorder.last(), steering_for(&tables, NeighbourResponder::Off));
        assert!(!workers.has_pending());
        let text = log.text();
        assert!(text.contains("every poll loop runs the new tables now: their services are steered"), "{text}");
    }

    /// A publish that fails because a loop has gone (which stops `lb run`) leaves unknown which
    /// tables the other loops run: what both the running and the new tables serve stays steered,
    /// and nothing more. Before, the loops after the gone one, never handed the new tables, counted
    /// as having applied them, and the new tables' services were steered to them.
    #[test]
    fn a_publish_a_gone_loop_fails_steers_no_more_than_both_tables_serve() {
        let cfg = config();
        let (dsr, nat) = (cfg.services[0].clone(), cfg.services[1].clone());
        let mut builder = TableBuilder::new();
        let (mut workers, recorder, mut loops) = gated_workers(&cfg, &mut builder);
        let first = builder.build(&Config { node: cfg.node.clone(), services: vec![dsr.clone()] }).expect("dsr");
        workers.publish(&first).expect("published");
        for l in &loops {
            l.step();
        }
        workers.deliver_pending().expect("steered");
        assert_eq!(recorder.last(), steering_for(&first, NeighbourResponder::Off));
        drop(loops.remove(0));
        let second = builder.build(&Config { node: cfg.node.clone(), services: vec![dsr, nat] }).expect("both");
        let err = workers.publish(&second).expect_err("loop 0 is gone");
        assert!(err.contains("worker 0"), "{err}");
        loops[0].step();
        workers.deliver_pending().expect("nothing to fail");
        workers.refresh().expect("nothing to fail");
        assert_eq!(
            recorder.last(),
            steering_for(&first, NeighbourResponder::Off),
            "loop 1 still runs the first tables"
        );
        assert!(!workers.has_pending());
    }

    /// Tables of `n` DSR services, each on an IPv6 VIP of its own (fd00::1, fd00::2, ...), each
    /// with a solicited-node group of its own.
    fn ipv6_vips(n: u16) -> Arc<Tables> {
        let services: String = (1..=n)
            .map(|i| {
                format!(
                    "  - {{ name: s{i}, vip: \"fd00::{i:x}\", port: 80, mode: dsr, backends: [{{ addr: \"fd01::1\", \
                     port: 80, mac: \"02:aa:bb:cc:dd:ee\" }}] }}\n"
                )
            })
            .collect();
        let text = format!("node: {{ local_mac: \"02:00:00:00:00:01\" }}\nservices:\n{services}");
        let settings = lb_examples::config::file::parse(&text).expect("valid file");
        let cfg = Config { node: settings.node, services: settings.services.into_iter().map(|s| s.config).collect() };
        TableBuilder::new().build(&cfg).expect("IPv6 DSR services")
    }

    /// The solicited-node groups of the IPv6 addresses `tables` answers ARP / NDP for.
    fn groups_of(tables: &Tables) -> Vec<std::net::Ipv6Addr> {
        let want: BTreeSet<_> = steering_for(tables, NeighbourResponder::All)
            .neighbour
            .into_iter()
            .filter_map(|a| match a {
                IpAddr::V6(a) => Some(lb_core::neighbour::solicited_node(a)),
                IpAddr::V4(_) => None,
            })
            .collect();
        want.into_iter().collect()
    }

    /// A namespace of this test's own (`tag` and the process id) with a veth pair v0 / v1 in it, up,
    /// and its name, or `None` (said as a skip) where namespaces cannot be made.
    fn namespace_with_veth(tag: &str) -> Option<(lb_io::netns::Netns, String)> {
        if let Err(reason) = lb_io::netns::can_create_namespaces() {
            println!("SKIPPED: {reason}");
            return None;
        }
        let ns = lb_io::netns::Netns::create(&format!("{tag}{}", std::process::id())).expect("namespace");
        ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]).expect("veth");
        ns.ip(&["link", "set", "v0", "up"]).expect("v0 up");
        ns.ip(&["link", "set", "v1", "up"]).expect("v1 up");
        let name = ns.name().to_string();
        Some((ns, name))
    }

    /// IPv6 groups that did not fit the socket's option memory (`net.core.optmem_max`) are joined by
    /// a later refresh once the limit is raised, and the warning names the setting. Before, the
    /// failure was warned of once and the steering counted as applied: no refresh tried again until
    /// the tables or the node's addresses changed, and solicitations for the VIPs left out did not
    /// arrive (behind a NIC filter or an MLD-snooping switch) however high the limit was set.
    #[test]
    fn ipv6_groups_that_did_not_fit_are_joined_by_a_refresh_once_they_fit() {
        use lb_io::interface::MulticastGroups;
        use lb_io::netns::enter_netns;
        let Some((_ns, name)) = namespace_with_veth("lbgj") else { return };
        // In a thread of its own, so this test's thread stays in its namespace.
        let joined = std::thread::spawn(move || {
            enter_netns(&name).expect("entering the namespace");
            let (log, _guard) = lb_examples::log_capture::Captured::install();
            let optmem = "/proc/sys/net/core/optmem_max";
            let Ok(before) = std::fs::read_to_string(optmem) else { return None };
            // This namespace's own limit (a per-namespace setting on recent kernels).
            if std::fs::write(optmem, "1024").is_err() {
                return None;
            }
            let tables = ipv6_vips(64);
            let mut workers: Workers<Recorder> =
                Workers::new(SteeringConfig::default(), NeighbourResponder::All, snat_settings(tables.node()));
            workers.groups.push(MulticastGroups::new("v0").expect("groups on v0"));
            workers.publish(&tables).expect("no loops to refuse them");
            let held = |w: &Workers<Recorder>| w.groups[0].joined().copied().collect::<Vec<_>>();
            let first = held(&workers);
            std::fs::write(optmem, before).expect("the limit back as it was");
            workers.refresh().expect("nothing to fail");
            Some((first, held(&workers), groups_of(&tables), log.text()))
        })
        .join()
        .expect("the namespace's thread");
        let Some((first, after, want, text)) = joined else {
            return println!("SKIPPED: net.core.optmem_max cannot be set in a namespace of this kernel");
        };
        assert!(first.len() < want.len(), "64 groups fitted in 1024 bytes of option memory");
        assert_eq!(after, want, "the groups left out, joined once they fit");
        assert!(text.contains("net.core.optmem_max"), "{text}");
    }

    /// Tables of one DSR service on `v4` and one on `v6`.
    fn dual_stack(v4: IpAddr, v6: IpAddr) -> Arc<Tables> {
        let backend = |vip: IpAddr| {
            let addr = if vip.is_ipv6() { "fd01::1" } else { "10.1.0.1" };
            format!("backends: [{{ addr: \"{addr}\", port: 80, mac: \"02:aa:bb:cc:dd:ee\" }}]")
        };
        let text = format!(
            "node: {{ local_mac: \"02:00:00:00:00:01\" }}\nservices:\n\
             - {{ name: a, vip: \"{v4}\", port: 80, mode: dsr, {} }}\n\
             - {{ name: b, vip: \"{v6}\", port: 80, mode: dsr, {} }}\n",
            backend(v4),
            backend(v6)
        );
        let settings = lb_examples::config::file::parse(&text).expect("valid file");
        let cfg = Config { node: settings.node, services: settings.services.into_iter().map(|s| s.config).collect() };
        TableBuilder::new().build(&cfg).expect("a service of each family")
    }

    /// What a capture on one end of a veth saw the other end send since the last call: the
    /// announcements of `addrs` from one of `macs`, in order, as (address, MAC). Reads up to a
    /// marker frame `marker` sends (the end's frames arrive in order), so no wait ends a round.
    fn announced(
        capture: &lb_io::interface::PacketSocket,
        marker: &lb_io::interface::PacketSocket,
        addrs: &[IpAddr],
        macs: &[[u8; 6]],
    ) -> Vec<(IpAddr, [u8; 6])> {
        let frame = |mac: [u8; 6], addr: IpAddr| {
            let mut buf = [0u8; 128];
            let n = lb_core::neighbour::announcement(mac, addr, &mut buf).expect("room for an announcement");
            buf[..n].to_vec()
        };
        let end = frame([0x02, 0, 0, 0, 0xee, 0xee], "10.255.255.254".parse().expect("address"));
        marker.send(&end).expect("the marker sent");
        let mut seen = Vec::new();
        loop {
            let got = capture.recv().expect("the marker arrives");
            if got == end {
                return seen;
            }
            for (&addr, &mac) in addrs.iter().flat_map(|a| macs.iter().map(move |m| (a, m))) {
                if got == frame(mac, addr) {
                    seen.push((addr, mac));
                }
            }
        }
    }

    /// An address the responder starts answering for is announced more than once, so that one lost
    /// frame does not leave the segment's neighbours on a previous owner's MAC until their entry
    /// goes stale: an IPv4 one twice (RFC 5227's ANNOUNCE_NUM), an IPv6 one three times (RFC 4861's
    /// MAX_NEIGHBOR_ADVERTISEMENT), each again no sooner than `announce_again_after` after the one
    /// before. Before, each was announced once.
    #[test]
    fn a_new_address_is_announced_again_until_its_count_is_sent() {
        use lb_io::interface::PacketSocket;
        use lb_io::netns::enter_netns;
        let Some((_ns, name)) = namespace_with_veth("lban") else { return };
        let v4: IpAddr = "10.0.0.10".parse().expect("address");
        let v6: IpAddr = "fd00::10".parse().expect("address");
        let hour = std::time::Duration::from_secs(3600);
        let (mac, rounds) = std::thread::spawn(move || {
            enter_netns(&name).expect("entering the namespace");
            let mac = lb_io::interface::mac_address("v0").expect("v0's MAC");
            let capture = PacketSocket::capture("v1", std::time::Duration::from_secs(5)).expect("capture on v1");
            let marker = PacketSocket::open("v0").expect("a socket on v0");
            let tables = dual_stack(v4, v6);
            let mut workers: Workers<Recorder> =
                Workers::new(SteeringConfig::default(), NeighbourResponder::All, snat_settings(tables.node()));
            workers.announce_again_after = hour;
            let shared = Arc::new(InterfaceMac::new(mac));
            workers.announcers.push(("v0".into(), PacketSocket::open("v0").expect("a socket on v0"), shared));
            let sent = || announced(&capture, &marker, &[v4, v6], &[mac]);
            workers.publish(&tables).expect("no loops to refuse them");
            let start = std::time::Instant::now();
            let mut rounds = vec![sent()];
            for later in 0..4 {
                workers.announce_due(start + hour * later);
                rounds.push(sent());
            }
            (mac, rounds)
        })
        .join()
        .expect("the namespace's thread");
        let both = vec![(v4, mac), (v6, mac)];
        assert_eq!(rounds, [both.clone(), vec![], both, vec![(v6, mac)], vec![]]);
    }

    /// Kubernetes cluster IPs (services that do not answer neighbours) are neither announced nor
    /// joined a solicited-node group for, while the Service's load-balancer IPs are. Before, every
    /// VIP was: cluster IPs, routed by the cluster and asked for by no client on the segment, were
    /// claimed there, and each IPv6 one took socket option memory (`net.core.optmem_max`) that the
    /// groups of the addresses clients do ask for then lacked.
    #[test]
    fn cluster_ips_get_no_group_and_no_announcement_while_load_balancer_ips_do() {
        use lb_io::interface::{MulticastGroups, PacketSocket};
        use lb_io::netns::enter_netns;
        let Some((_ns, name)) = namespace_with_veth("lbci") else { return };
        let lb6_addr: std::net::Ipv6Addr = "fd00::10".parse().expect("address");
        let (lb4, lb6): (IpAddr, IpAddr) = ("10.0.0.10".parse().expect("address"), IpAddr::V6(lb6_addr));
        let (cluster4, cluster6): (IpAddr, IpAddr) =
            ("10.96.0.10".parse().expect("address"), "fd00:96::a".parse().expect("address"));
        let (mac, groups, sent) = std::thread::spawn(move || {
            enter_netns(&name).expect("entering the namespace");
            let mac = lb_io::interface::mac_address("v0").expect("v0's MAC");
            let capture = PacketSocket::capture("v1", std::time::Duration::from_secs(5)).expect("capture on v1");
            let marker = PacketSocket::open("v0").expect("a socket on v0");
            let load_balancer = dual_stack(lb4, lb6);
            let mut config = Config { node: load_balancer.node().clone(), services: Vec::new() };
            for (tables, answer) in [(&load_balancer, true), (&dual_stack(cluster4, cluster6), false)] {
                for s in tables.services() {
                    let backends = s
                        .backends
                        .iter()
                        .map(|b| lb_core::config::BackendConfig {
                            addr: b.addr,
                            port: b.port,
                            weight: b.weight,
                            mac: Some(b.mac),
                            state: b.state,
                        })
                        .collect();
                    let service = lb_core::config::ServiceConfig::new(&s.name, s.key, s.mode, backends);
                    config.services.push(lb_core::config::ServiceConfig { answer_neighbours: answer, ..service });
                }
            }
            let tables = TableBuilder::new().build(&config).expect("load-balancer and cluster IPs");
            let mut workers: Workers<Recorder> =
                Workers::new(SteeringConfig::default(), NeighbourResponder::All, snat_settings(tables.node()));
            workers.groups.push(MulticastGroups::new("v0").expect("groups on v0"));
            let shared = Arc::new(InterfaceMac::new(mac));
            workers.announcers.push(("v0".into(), PacketSocket::open("v0").expect("a socket on v0"), shared));
            workers.publish(&tables).expect("no loops to refuse them");
            let sent = announced(&capture, &marker, &[lb4, lb6, cluster4, cluster6], &[mac]);
            (mac, workers.groups[0].joined().copied().collect::<Vec<_>>(), sent)
        })
        .join()
        .expect("the namespace's thread");
        assert_eq!(groups, [lb_core::neighbour::solicited_node(lb6_addr)], "the groups joined on v0");
        assert_eq!(sent, [(lb4, mac), (lb6, mac)], "the addresses announced");
    }

    /// The interface's MAC is read again at each refresh: when it changes (a bond's failover with
    /// `fail_over_mac=active`, `ip link set IF address`), every address answered for is announced
    /// again from the new MAC, and the loops answer with it. Before, the MAC read at start was kept:
    /// the neighbours kept sending to the old MAC, and each answer told them to.
    #[test]
    fn a_changed_interface_mac_is_announced_for_every_address_answered_for() {
        use lb_io::interface::PacketSocket;
        use lb_io::netns::enter_netns;
        let Some((_ns, name)) = namespace_with_veth("lbmc") else { return };
        let v4: IpAddr = "10.0.0.10".parse().expect("address");
        let v6: IpAddr = "fd00::10".parse().expect("address");
        let new = [0x02, 0x00, 0x5e, 0x00, 0xab, 0xcd];
        let (old, rounds) = std::thread::spawn(move || {
            enter_netns(&name).expect("entering the namespace");
            let old = lb_io::interface::mac_address("v0").expect("v0's MAC");
            let capture = PacketSocket::capture("v1", std::time::Duration::from_secs(5)).expect("capture on v1");
            let marker = PacketSocket::open("v0").expect("a socket on v0");
            let tables = dual_stack(v4, v6);
            let mut workers: Workers<Recorder> =
                Workers::new(SteeringConfig::default(), NeighbourResponder::All, snat_settings(tables.node()));
            workers.announce_again_after = std::time::Duration::from_secs(3600);
            let shared = Arc::new(InterfaceMac::new(old));
            workers.macs.push(("v0".into(), shared.clone()));
            workers.announcers.push(("v0".into(), PacketSocket::open("v0").expect("a socket on v0"), shared.clone()));
            let sent = || announced(&capture, &marker, &[v4, v6], &[old, new]);
            workers.publish(&tables).expect("no loops to refuse them");
            let mut rounds = vec![sent()];
            workers.refresh().expect("nothing to fail");
            rounds.push(sent());
            let status = std::process::Command::new("ip")
                .args(["link", "set", "v0", "address", &lb_io::netns::format_mac(new)])
                .status()
                .expect("ip runs");
            assert!(status.success(), "ip link set v0 address");
            workers.refresh().expect("nothing to fail");
            rounds.push(sent());
            assert_eq!(shared.get(), new, "the MAC the loops follow");
            (old, rounds)
        })
        .join()
        .expect("the namespace's thread");
        assert_eq!(rounds, [vec![(v4, old), (v6, old)], vec![], vec![(v4, new), (v6, new)]]);
    }

    /// Connection tables are checked against the node's memory before anything is set up.
    #[test]
    fn conntrack_tables_must_fit_the_nodes_memory() {
        let gib = 1u64 << 30;
        assert!(check_conntrack_memory(1 << 18, 2, Some(gib)).is_ok(), "the default, on a small node");
        let err = check_conntrack_memory(4_000_000_000, 1, Some(23 * gib)).expect_err("2^32 entries in 23 GiB");
        assert!(err.contains("--conntrack-entries 4000000000") && err.contains("23552 MiB"), "{err}");
        assert!(check_conntrack_memory(1 << 24, 4, Some(gib)).is_err(), "4 loops of 16 M entries in 1 GiB");
        assert!(check_conntrack_memory(usize::MAX, 1, Some(u64::MAX)).is_err(), "beyond any table");
        assert!(check_conntrack_memory(usize::MAX, 0, Some(gib)).is_ok(), "no loops, no tables");
        assert!(check_conntrack_memory(1 << 30, 1, None).is_ok(), "memory unknown: not checked");
        assert!(mem_total().is_some_and(|m| m > 0), "/proc/meminfo");
    }

    /// The Maglev budget is lb-core's default where the memory is plenty or unknown, and what half of
    /// it holds where that is less: in the DaemonSet's 1 GiB, about 1 365 tables of the default size
    /// rather than 4 096 (1.5 GiB, which would have the container OOMKilled).
    #[test]
    fn the_maglev_budget_fits_half_the_memory_lb_run_may_use() {
        let default = Limits::default().max_maglev_entries;
        let budget = |mem| maglev_budget(None, mem, 0).expect("a default budget is never refused");
        assert_eq!(budget(None), default, "memory unknown");
        assert_eq!(budget(Some(64 << 30)), default, "a large node");
        let half = 1usize << 29;
        let entries = budget(Some(1 << 30));
        assert!(entries * 6 <= half && (entries + 1) * 6 > half, "{entries} in 1 GiB");
        assert_eq!(entries / 65_537, 1365);
    }

    /// `--maglev-entries` sets the budget, above lb-core's default and above half the memory too,
    /// where it fits the memory beside the connection tables; beyond, `lb run` refuses to start,
    /// naming the most it could give, rather than take a budget the container is OOMKilled at.
    #[test]
    fn an_asked_maglev_budget_is_taken_where_it_fits_beside_the_connection_tables() {
        let gib = 1u64 << 30;
        let conntrack = check_conntrack_memory(1 << 18, 2, Some(gib)).expect("the default fits 1 GiB");
        assert_eq!(
            conntrack,
            2 * lb_core::conntrack::ConntrackTable::bytes_for(1 << 18).expect("a table of 2^18 entries") as u64
        );
        // Three quarters of 1 GiB: more than the default budget's half.
        let asked = (gib * 3 / 4 / 6) as usize;
        assert_eq!(maglev_budget(Some(asked), Some(gib), conntrack), Ok(asked));
        assert_eq!(maglev_budget(Some(1000), Some(gib), conntrack), Ok(1000), "a smaller budget");
        assert_eq!(maglev_budget(Some(0), Some(gib), conntrack), Ok(0), "no Maglev tables at all");
        let most = ((gib - conntrack) / 6) as usize;
        assert_eq!(maglev_budget(Some(most), Some(gib), conntrack), Ok(most), "exactly what is left");
        let err = maglev_budget(Some(most + 1), Some(gib), conntrack).expect_err("one entry past the memory");
        assert!(err.contains("1024 MiB") && err.contains(&format!("at most {most}")), "{err}");
        let err = maglev_budget(Some(usize::MAX), Some(gib), 0).expect_err("beyond any memory");
        assert!(err.contains("--maglev-entries"), "{err}");
        // Above lb-core's default, on a node with the memory for it.
        let big = Limits::default().max_maglev_entries * 2;
        assert_eq!(maglev_budget(Some(big), Some(64 * gib), conntrack), Ok(big));
        assert_eq!(maglev_budget(Some(big), None, conntrack), Ok(big), "memory unknown: taken as asked");
    }

    /// In a container the memory `lb run` may use is its cgroup's limit (the DaemonSet's
    /// `resources.limits.memory`), not the node's: connection tables that fit the node but not the
    /// limit must be refused at start, naming the limit. Before, only MemTotal was checked, and
    /// `--conntrack-entries` too large for the pod's limit started, then was OOMKilled (every
    /// connection through the node lost, and again at each restart).
    #[test]
    fn conntrack_tables_must_fit_the_containers_memory_limit() {
        let root = std::env::temp_dir().join(format!("lb-cgroup-{}", std::process::id()));
        let write = |rel: &str, text: &str| {
            let file = root.join(rel);
            std::fs::create_dir_all(file.parent().expect("a file in a directory"))
                .expect("a directory under the temporary one");
            std::fs::write(file, text).expect("a file under the temporary directory");
        };
        let gib = 1u64 << 30;
        // cgroup v2, in the container's own cgroup namespace: its limit at the mount's root.
        write("memory.max", "1073741824\n");
        assert_eq!(cgroup_memory_limit("0::/\n", &root), Some(gib));
        // No namespace (the host's path), the container's cgroup mounted at the root.
        assert_eq!(cgroup_memory_limit("0::/kubepods/burstable/pod1/c1\n", &root), Some(gib));
        // The host's view: the cgroup's own directory.
        write("kubepods/pod2/c2/memory.max", "536870912\n");
        assert_eq!(cgroup_memory_limit("0::/kubepods/pod2/c2\n", &root), Some(gib / 2));
        // No limit.
        write("kubepods/pod3/c3/memory.max", "max\n");
        assert_eq!(cgroup_memory_limit("0::/kubepods/pod3/c3\n", &root), None);
        // cgroup v1: the memory controller's hierarchy.
        write("memory/kubepods/pod4/c4/memory.limit_in_bytes", "268435456\n");
        assert_eq!(cgroup_memory_limit("4:memory:/kubepods/pod4/c4\n0::/\n", &root), Some(gib / 4));
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(cgroup_memory_limit("0::/\n", &root), None, "nothing to read: no limit known");

        // 16 loops of the default 2^18 entries (~300 MiB) on a 64 GiB node under a 256 MiB limit.
        let limited = memory_limit(Some(64 * gib), Some(gib / 4));
        let err = check_conntrack_memory(1 << 18, 16, limited).expect_err("over the container's limit");
        assert!(err.contains("256 MiB"), "{err}");
        assert_eq!(memory_limit(Some(gib), None), Some(gib));
        assert_eq!(memory_limit(None, Some(gib)), Some(gib));
        assert!(memory_limit(Some(gib), Some(u64::MAX)) == Some(gib), "v1's 'unlimited' is a huge number");
    }

    #[test]
    fn snat_ports_the_kernel_may_also_use_are_counted_less_the_reserved() {
        // The default range on a stock kernel: every port shared.
        assert_eq!(ephemeral_overlap((32768, 60999), (32768, 60999), ""), 28232);
        // Reserved: none shared; partly reserved: the rest.
        assert_eq!(ephemeral_overlap((40000, 50000), (32768, 60999), "40000-50000\n"), 0);
        assert_eq!(ephemeral_overlap((40000, 50000), (32768, 60999), "40000-44999,50000"), 5000);
        // Outside the kernel's range: nothing shared.
        assert_eq!(ephemeral_overlap((61000, 65000), (32768, 60999), ""), 0);
        assert_eq!(ephemeral_overlap((1000, 32768), (32768, 60999), "junk"), 1);
    }

    /// Loopback has one receive queue, rx-0.
    #[test]
    fn the_queues_an_interface_has_and_lb_run_does_not_serve_are_listed() {
        assert_eq!(unserved_rx_queues("lo", &[0]), Some(Vec::new()));
        assert_eq!(unserved_rx_queues("lo", &[]), Some(vec![0]));
        assert_eq!(unserved_rx_queues("no-such-interface", &[]), None);
    }

    /// Two services, DSR and NAT, as a configuration file gives them.
    fn config() -> Config {
        let settings = lb_examples::config::file::parse(
            r#"
node:
  local_mac: "02:00:00:00:00:01"
  gateway_mac: "02:00:00:00:00:fe"
  snat_v4: 10.0.0.2
  snat_ports: [40000, 50000]
services:
  - { name: dsr, vip: 10.0.0.10, port: 80, mode: dsr, backends: [{ addr: 10.1.0.1, port: 80, mac: "02:aa:bb:cc:dd:ee" }] }
  - { name: nat, vip: 10.0.0.11, port: 80, mode: nat, backends: [{ addr: 10.1.0.2, port: 8080 }] }
"#,
        )
        .expect("valid file");
        Config { node: settings.node, services: settings.services.into_iter().map(|s| s.config).collect() }
    }

    #[test]
    fn nat_over_several_queues_needs_a_snat_port_share_for_each_loop() {
        let cfg = config();
        assert_eq!(cfg.services[1].mode, ForwardMode::Nat);
        assert!(check_nat_replies(&cfg, 1).is_ok(), "one loop owns every SNAT port");
        assert!(check_nat_replies(&cfg, 4).is_ok(), "replies RSS misdelivers are handed to their loop");
        let dsr_only = Config { node: cfg.node.clone(), services: cfg.services[..1].to_vec() };
        // Fewer SNAT ports than loops: some loop would have no share.
        let mut narrow = cfg.clone();
        narrow.node.snat_ports = (40000, 40002);
        assert!(check_nat_replies(&narrow, 3).is_ok(), "one port a loop");
        let err = check_nat_replies(&narrow, 4).expect_err("3 ports for 4 loops");
        assert!(err.contains("node.snat_ports 40000-40002 holds 3 ports for 4 poll loops"), "{err}");
        assert!(check_nat_replies(&Config { node: narrow.node, ..dsr_only }, 4).is_ok(), "no NAT service");
        // The shares the log names partition the range: every port has exactly one owner.
        for port in [40000, 42500, 45000, 50000] {
            assert!(snat_port_owner(cfg.node.snat_ports, 4, port).is_some(), "port {port}");
        }
    }

    /// A configuration with more addresses or services than the steering maps hold is refused up
    /// front; the SNAT address counts only when a service uses NAT.
    #[test]
    fn steering_beyond_the_maps_is_refused() {
        let cfg = config();
        let small = SteeringConfig { max_vips: 2, max_services: 2, ..SteeringConfig::default() };
        let err = check_steering_capacity(&cfg, &small).expect_err("2 VIPs + the SNAT address");
        assert!(err.contains("3 addresses to steer") && err.contains("at most 2"), "{err}");
        let dsr_only = Config { node: cfg.node.clone(), services: cfg.services[..1].to_vec() };
        let one = SteeringConfig { max_vips: 1, max_services: 1, ..SteeringConfig::default() };
        assert!(check_steering_capacity(&dsr_only, &one).is_ok(), "no NAT, no SNAT address");
        let three = SteeringConfig { max_vips: 3, max_services: 1, ..SteeringConfig::default() };
        let err = check_steering_capacity(&cfg, &three).expect_err("2 services");
        assert!(err.contains("2 services to steer, the XDP program holds at most 1"), "{err}");
        assert!(check_steering_capacity(&cfg, &SteeringConfig::default()).is_ok());
    }

    /// Hands every frame it receives to loop `.0`, and sends every frame handed to it.
    struct HandsOn(u16);

    impl BurstProcessor for HandsOn {
        type Update = Arc<Tables>;
        fn process_burst(&mut self, _frames: &mut [Frame<'_>], _now: Instant, verdicts: &mut [Verdict]) {
            verdicts.fill(Verdict::Handoff(self.0));
        }
        fn process_handed(&mut self, _frames: &mut [Frame<'_>], _now: Instant, verdicts: &mut [Verdict]) {
            verdicts.fill(Verdict::Tx);
        }
        fn apply(&mut self, update: Arc<Tables>) -> Arc<Tables> {
            update
        }
    }

    /// As its loops end, `lb run` logs their counts summed over the loops and the run, what they
    /// counted as they stopped included (`/metrics` has gone by then): here the frames waiting in a
    /// stopped loop's inbox, sent, and those handed to it after, refused. Before, each loop's counts
    /// were dropped as it joined, and what a loop counted after the last scrape showed nowhere.
    #[test]
    fn the_loops_counts_are_logged_as_they_end_what_they_counted_as_they_stopped_included() {
        let (log, _guard) = lb_examples::log_capture::Captured::install();
        let ends = lb_io::handoff::mesh(2, HandoffConfig { buffers: 4, buffer_size: 512 }).expect("a mesh");
        let frame = [0u8; 60];
        for _ in 0..3 {
            assert!(ends[0].send(1, &frame), "loop 1's inbox has room");
        }
        // Loop 1 is stopped before its first round: it sends the three waiting and closes its inbox.
        let stop = StopFlag::new();
        stop.stop();
        let (_updates, rx) = update_channel();
        let stopped =
            PollLoop::new(MemoryDevice::new(MemoryConfig::default()), HandsOn(0), rx, stop, LoopConfig::default())
                .with_handoff(ends[1].clone())
                .run_keeping_parts();
        let stopped: Running<MemoryDevice, HandsOn> = std::thread::spawn(move || stopped);
        // Loop 0 then hands it two more, refused, and reads five drops of the kernel's.
        let mut device = MemoryDevice::new(MemoryConfig::default());
        device.push_rx(&frame);
        device.push_rx(&frame);
        device.count_kernel_rx_dropped(5);
        let (_updates, rx) = update_channel();
        let other = PollLoop::new(device, HandsOn(1), rx, StopFlag::new(), LoopConfig::default())
            .with_handoff(ends[0].clone())
            .spawn("lb-v0-q0".into(), None)
            .expect("a loop");
        let failed = Arc::new(tokio::sync::Notify::new());
        let failures = join_loops(vec![
            watch_loop(other, "lb-v0-q0".into(), failed.clone()),
            watch_loop(stopped, "lb-v0-q1".into(), failed),
        ]);
        assert!(failures.is_empty(), "{failures:?}");
        let text = log.text();
        let line = text.lines().find(|l| l.contains("poll loops ended")).unwrap_or_else(|| panic!("{text}"));
        assert!(
            line.ends_with(
                "loops=2 rx=2 tx=3 pass=0 drop=2 handed_off=0 handed_in=3 handoff_lost=2 handoff_refused=2 \
                 tx_declined=0 tx_abandoned=0 kernel_rx_dropped=5"
            ),
            "{line}"
        );
    }

    /// A setup step failing after some loops started (here the third queue's socket) stops and
    /// joins those loops as `lb run` returns its error, their counts logged. Before, they ran on
    /// until the process exited, under the sockets and offloads torn down as it returned, and their
    /// counts were never logged.
    #[test]
    fn a_setup_failing_after_some_loops_started_stops_and_joins_them_and_logs_their_counts() {
        let (log, _guard) = lb_examples::log_capture::Captured::install();
        let tables =
            TableBuilder::new().build(&Config { node: config().node, services: Vec::new() }).expect("empty tables");
        let mut loops = Loops {
            stop: StopFlag::new(),
            failed: Arc::new(tokio::sync::Notify::new()),
            watchers: Vec::new(),
            empty: tables.clone(),
            conntrack_entries: 1024,
            cores: 3,
            first_core: None,
            snat_ports: (40000, 50000),
            handoff: lb_io::handoff::mesh(3, HandoffConfig { buffers: 4, buffer_size: 512 })
                .expect("a mesh")
                .into_iter(),
        };
        let own_mac = [2, 0, 0, 0, 0, 1];
        let mac = Arc::new(InterfaceMac::new(own_mac));
        let iface = ServedInterface { name: "v0", queues: &[0, 1, 2], own_mac, mac: &mac, neighbour_mac: None };
        let (mut senders, mut counters) = (Vec::new(), lb_examples::metrics::PublishedCounters::default());
        let result = loops.start(&iface, &mut senders, &mut counters, |q| match q {
            2 => Err("v0: no queue 2".into()),
            _ => Ok(NoTraffic::idle()),
        });
        assert_eq!(result.expect_err("queue 2 fails").to_string(), "v0: no queue 2");
        assert_eq!((senders.len(), counters.1.len()), (2, 2), "two loops started");
        // As `lb run` returns the error.
        drop(loops);
        let text = log.text();
        let line = text.lines().find(|l| l.contains("poll loops ended")).unwrap_or_else(|| panic!("{text}"));
        assert!(line.contains("loops=2 rx=0 tx=0"), "{line}");
        for s in &senders {
            assert!(s.send(tables.clone()).is_err(), "the loops have ended");
        }
    }
}
