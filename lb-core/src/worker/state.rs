//! A conntrack entry's life: its state after each packet (IPVS-like TCP states, UDP assured after a
//! second packet) and the idle timeout each state gives it.

use crate::config::Timeouts;
use crate::conntrack::{ConnState, Entry, GONE_CLOSED};
use crate::packet::TcpFlags;

/// IP protocol number of UDP.
const UDP: u8 = 17;

/// Idle timeout in whole seconds per [`ConnState`] (indexed by its `repr(u8)` value), converted once
/// when tables are installed: converting the `Duration`s per packet was about a quarter of [`advance`]
/// (callgrind, established packets).
#[derive(Debug, Clone, Copy)]
pub(super) struct StateTimeouts([u32; 8]);

impl StateTimeouts {
    pub(super) fn new(t: &Timeouts) -> Self {
        let secs = |state| {
            let d = match state {
                ConnState::SynSeen => t.tcp_syn,
                ConnState::Established => t.tcp_established,
                ConnState::Closing => t.tcp_fin,
                ConnState::TimeWait => t.tcp_time_wait,
                ConnState::UdpNew | ConnState::UdpAssured | ConnState::Affinity => t.udp,
                // The flow's own idle timeout; `advance` shortens it once the client closes.
                ConnState::BackendGone => t.tcp_established,
            };
            u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
        };
        StateTimeouts(ConnState::ALL.map(secs))
    }
}

fn timeout_of(state: ConnState, t: &StateTimeouts) -> u32 {
    // `& 7`: eight states, so the index is in bounds by construction (no check, no panic path).
    t.0[state as usize & 7]
}

/// The state of a new entry from its first packet's TCP flags.
pub(super) fn advance_new(e: &mut Entry, flags: TcpFlags, t: &StateTimeouts, now: u32) {
    if e.state == ConnState::SynSeen {
        if flags.contains(TcpFlags::RST) {
            e.state = ConnState::TimeWait;
        } else if flags.contains(TcpFlags::FIN) {
            e.state = ConnState::Closing;
            e.fins = 1;
        }
    }
    e.expires = now.saturating_add(timeout_of(e.state, t));
}

/// True when the client has ended the flow: time-wait (both FINs, or an RST), or closing after its
/// own FIN. A flow whose backend left is buried closed then, and the client's SYN on its 5-tuple is
/// a new connection, as on a time-wait flow.
pub(super) fn client_closed(e: &Entry) -> bool {
    e.state == ConnState::TimeWait || (e.state == ConnState::Closing && e.fins & 1 != 0)
}

/// Turns a forward entry whose backend left into a [`ConnState::BackendGone`] tombstone, with the
/// packet that found it (`flags`, from the client) applied. A flow the client had closed
/// ([`client_closed`]) is buried closed: it keeps at most the time-wait timeout from now, which no
/// later packet extends (losing its FIN here gave it the idle timeout, renewed by each straggler).
/// A UDP flow's tombstone lasts the UDP timeout from now, which no later packet extends either: a
/// UDP client never gives up on its flow, and one sending from a fixed port more often than the
/// timeout (NTP, a resolver, a log shipper) would otherwise be cut off for as long as it sends.
pub(super) fn entomb(e: &mut Entry, flags: TcpFlags, t: &StateTimeouts, now: u32) {
    let closed = client_closed(e);
    e.state = ConnState::BackendGone;
    if closed {
        e.fins = GONE_CLOSED;
        e.expires = e.expires.min(now.saturating_add(timeout_of(ConnState::TimeWait, t)));
    } else if e.key.proto == UDP {
        e.fins = 0;
        e.expires = now.saturating_add(timeout_of(ConnState::UdpAssured, t));
    } else {
        e.fins = 0;
        advance(e, flags, true, t, now);
    }
}

/// The state after a packet of a known flow, from the client (`from_client`) or the backend (NAT
/// replies). IPVS-like: the client's ACK after SYN establishes, a FIN closes, both FINs or an RST
/// reach time-wait, which a later FIN leaves as it is. Each packet refreshes the idle timeout of
/// the state it leaves the flow in.
///
/// The client's SYN on a closing flow restarts it half-open on the same backend (IPVS's FIN_WAIT,
/// CLOSE_WAIT, LAST_ACK + SYN -> SYN_RECV, its default `conn_reuse_mode`): in DSR and tunnel modes
/// the backend's FIN is never seen, so a finished flow stays closing for `tcp_fin`, and a client
/// reusing its port within that time opens a new connection that must reach established (its count,
/// its idle timeout). A SYN on a time-wait flow is no packet of it: the worker starts a new flow (as
/// it does for a SYN on a half-open, established or closing flow whose backend takes no new flows).
///
/// A [`ConnState::BackendGone`] tombstone stays one: any packet refreshes a TCP flow's idle
/// timeout, until the client's FIN or RST starts a fixed time-wait timeout that later packets do
/// not extend; a UDP flow's keeps the fixed timeout it was buried with ([`entomb`]).
///
/// Returns 1 when the flow became established, -1 when it left that state, 0 otherwise.
#[inline]
pub(super) fn advance(e: &mut Entry, flags: TcpFlags, from_client: bool, t: &StateTimeouts, now: u32) -> i8 {
    // Most packets: an established TCP flow's segment without SYN, FIN or RST only renews its
    // expiry (`advance_any` would do the same; a test holds them equal), so it skips the state
    // match: -27 instructions a packet on the established path (callgrind, 586 -> 559).
    if is_renewal(e, flags) {
        return renew(e, t, now);
    }
    advance_any(e, flags, from_client, t, now)
}

/// [`advance`] of a renewal ([`is_renewal`]): the expiry renewed, the state kept (returns 0).
#[inline(always)]
pub(super) fn renew(e: &mut Entry, t: &StateTimeouts, now: u32) -> i8 {
    e.expires = now.saturating_add(timeout_of(ConnState::Established, t));
    0
}

/// True for a packet [`advance`] takes as a plain renewal of an established flow.
#[inline(always)]
pub(super) fn is_renewal(e: &Entry, flags: TcpFlags) -> bool {
    e.state == ConnState::Established && flags.0 & (TcpFlags::SYN | TcpFlags::FIN | TcpFlags::RST) == 0
}

/// [`advance`] for any entry and packet.
pub(super) fn advance_any(e: &mut Entry, flags: TcpFlags, from_client: bool, t: &StateTimeouts, now: u32) -> i8 {
    let was_established = e.state == ConnState::Established;
    if e.state == ConnState::BackendGone {
        if e.fins & GONE_CLOSED == 0 && e.key.proto != UDP {
            let timeout = if from_client && (flags.contains(TcpFlags::FIN) || flags.contains(TcpFlags::RST)) {
                e.fins |= GONE_CLOSED;
                timeout_of(ConnState::TimeWait, t)
            } else {
                timeout_of(ConnState::BackendGone, t)
            };
            e.expires = now.saturating_add(timeout);
        }
        return 0;
    }
    e.state = match e.state {
        ConnState::UdpNew | ConnState::UdpAssured => ConnState::UdpAssured,
        ConnState::Affinity => ConnState::Affinity,
        s if flags.contains(TcpFlags::RST) => {
            let _ = s;
            ConnState::TimeWait
        }
        // (Time-wait stays: a FIN that crossed an RST does not reopen the flow, as in IPVS.)
        s if flags.contains(TcpFlags::FIN) => {
            e.fins |= if from_client { 1 } else { 2 };
            if e.fins == 3 || s == ConnState::TimeWait { ConnState::TimeWait } else { ConnState::Closing }
        }
        ConnState::SynSeen if from_client && flags.contains(TcpFlags::ACK) && !flags.contains(TcpFlags::SYN) => {
            ConnState::Established
        }
        ConnState::Closing if from_client && flags.is_syn_only() => {
            e.fins = 0;
            ConnState::SynSeen
        }
        s => s,
    };
    e.expires = now.saturating_add(timeout_of(e.state, t));
    i8::from(e.state == ConnState::Established) - i8::from(was_established)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::EntryKind;

    /// The renewal shortcut in `advance` decides every packet it takes exactly as the full state
    /// machine would: every state, every flag byte, both directions, every `fins` value. (It fails
    /// if the shortcut also took, say, FIN segments, which move an established flow to closing.)
    #[test]
    fn advance_renewal_shortcut_matches_the_state_machine() {
        let t = StateTimeouts::new(&Timeouts::default());
        let mut taken = 0;
        for state in ConnState::ALL {
            for fins in [0, 1, 2, 3, GONE_CLOSED] {
                for flags in 0..=u8::MAX {
                    for from_client in [true, false] {
                        let e = Entry { state, fins, kind: EntryKind::Forward, expires: 5, ..Entry::default() };
                        let (mut fast, mut full) = (e, e);
                        let flags = TcpFlags(flags);
                        let a = advance(&mut fast, flags, from_client, &t, 100);
                        let b = advance_any(&mut full, flags, from_client, &t, 100);
                        assert_eq!((a, fast), (b, full), "{state:?} fins {fins} flags {:#04x}", flags.0);
                        taken += usize::from(is_renewal(&e, flags));
                    }
                }
            }
        }
        // Established, any fins, the 32 flag bytes without SYN, FIN and RST, both ways.
        assert_eq!(taken, 5 * 32 * 2);
    }

    /// The established path takes a renewal as usable without its own two tests (not a tombstone,
    /// not a lone SYN): every state and flag byte a renewal is, passes them.
    #[test]
    fn a_renewal_passes_the_established_paths_tests() {
        for state in ConnState::ALL {
            for flags in 0..=u8::MAX {
                let e = Entry { state, kind: EntryKind::Forward, ..Entry::default() };
                let flags = TcpFlags(flags);
                let usable = e.state != ConnState::BackendGone && !flags.is_syn_only();
                assert!(!is_renewal(&e, flags) || usable, "{state:?} flags {:#04x}", flags.0);
            }
        }
    }
}
