//! The fast path never allocates: 100 000 frames of mixed traffic through a warmed-up worker, counted
//! by a global allocator that tallies every allocation made on this test's thread.
//!
//! The mix: new and established TCP and UDP flows, IPv4 and IPv6, every forwarding mode (NAT with its
//! replies, DSR, IP-in-IP, GUE), ClientIP affinity, traffic that passes (not a VIP), ARP requests and
//! IPv6 neighbour solicitations for the VIPs (answered), full-NAT packets whose TTL expires (answered
//! with ICMP time exceeded), every cheap drop (malformed, truncated, no
//! service, source not allowed, fragment), and a table swap in the middle.
#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

mod worker_common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use lb_core::config::Config;
use lb_core::{Frame, Verdict};
use worker_common::*;

struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: during thread teardown the slot may be gone; those allocations are not ours.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY (test crate only; lb-core itself forbids unsafe): every method forwards to `System` with the
// caller's arguments unchanged, so `System`'s guarantees are the caller's.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count();
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

const BURST: usize = 64;
const FRAMES: usize = 100_000;

fn config() -> Config {
    let mut cfg = all_modes_config();
    // Affinity and a source range on two of the services.
    cfg.services[0].affinity_timeout = Some(dur(10_800));
    cfg.services[2].source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
    cfg
}

/// Runs `templates` through the worker in bursts, copying each into a preallocated buffer first.
/// Returns the verdicts' counts and keeps the transmitted bytes of the first pass in `outputs`.
fn drive(
    w: &mut lb_core::Worker,
    templates: &[Vec<u8>],
    bufs: &mut [Vec<u8>],
    outputs: Option<&mut Vec<Vec<u8>>>,
    t0: u64,
) -> [u64; 3] {
    let mut tally = [0u64; 3];
    let mut outputs = outputs;
    for (chunk_no, chunk) in templates.chunks(BURST).enumerate() {
        for (buf, t) in bufs.iter_mut().zip(chunk) {
            buf[HEADROOM..HEADROOM + t.len()].copy_from_slice(t);
        }
        let mut bi = bufs.iter_mut();
        let mut ti = chunk.iter();
        let mut frames: [Frame<'_>; BURST] = std::array::from_fn(|_| {
            let buf = bi.next().unwrap();
            let len = ti.next().map_or(0, Vec::len);
            Frame::new(buf, HEADROOM, len)
        });
        let mut verdicts = [Verdict::Pass; BURST];
        let n = chunk.len();
        w.process_burst(&mut frames[..n], secs(t0 + chunk_no as u64 / 16), &mut verdicts[..n]);
        for (f, v) in frames[..n].iter().zip(&verdicts[..n]) {
            match v {
                Verdict::Tx => tally[0] += 1,
                Verdict::Pass => tally[1] += 1,
                Verdict::Drop(_) => tally[2] += 1,
                // One core of one: every SNAT port is its own.
                Verdict::Handoff(_) | Verdict::HandoffAll => unreachable!("a single core hands nothing off"),
            }
            if let Some(out) = outputs.as_deref_mut() {
                out.push(f.data().to_vec());
            }
        }
    }
    tally
}

#[test]
fn hundred_thousand_mixed_frames_allocate_nothing() {
    let cfg = config();
    let mut builder = worker_common::table_builder();
    let tables = builder.build(&cfg).unwrap();
    let mut changed = cfg.clone();
    changed.services[0].backends.push(backend("10.1.0.3", 8080));
    let tables2 = builder.build(&changed).unwrap();
    let mut w = lb_core::Worker::new(tables, lb_core::WorkerConfig::single_core(1 << 16));
    w.set_neighbour_mac(Some([2, 0, 0, 0, 0, 1]));

    let vip4 = v4("192.0.2.1");
    let vip6 = v4("2001:db8::1");
    let client = |i: usize, v6: bool| {
        if v6 { v4(&format!("2001:db8:ff::{:x}", i % 200 + 1)) } else { v4(&format!("198.51.100.{}", i % 200 + 1)) }
    };

    // Warm-up flows: 32 per service (TCP SYN or UDP), every mode and family.
    let mut warm = Vec::new();
    for i in 0..32 {
        for (vip, v6) in [(vip4, false), (vip6, true)] {
            for port in 80..=83u16 {
                warm.push(tcp(client(i, v6), 10_000 + i as u16, vip, port, Tcp::Syn, b""));
                warm.push(udp(client(i, v6), 10_000 + i as u16, vip, port, b"dns?"));
            }
        }
    }
    let mut bufs: Vec<Vec<u8>> = (0..BURST).map(|_| vec![0u8; HEADROOM + 1600]).collect();
    let mut warm_out = Vec::with_capacity(warm.len());
    let tally = drive(&mut w, &warm, &mut bufs, Some(&mut warm_out), 1);
    assert_eq!(tally[0], warm.len() as u64, "every warm-up frame is forwarded: {tally:?}");

    // Replies of the NAT flows, from what the worker sent to the backends.
    let mut replies = Vec::new();
    for (sent, out) in warm.iter().zip(&warm_out) {
        let s = seen(out);
        if s.outer.is_none() && s.dport == 8080 {
            let is_tcp = sent[if s.src.is_ipv4() { 23 } else { 20 }] == 6;
            replies.push(if is_tcp {
                tcp(s.dst, 8080, s.src, s.sport, Tcp::Ack, b"reply")
            } else {
                udp(s.dst, 8080, s.src, s.sport, b"answer")
            });
        }
    }
    assert!(!replies.is_empty());

    // The measured mix.
    let mut mix = Vec::with_capacity(FRAMES);
    let mut i = 0usize;
    while mix.len() < FRAMES {
        let v6 = i % 2 == 1;
        let vip = if v6 { vip6 } else { vip4 };
        let port = 80 + (i % 4) as u16;
        match i % 10 {
            // Established TCP and UDP of the warm-up flows.
            0 | 1 => mix.push(tcp(client(i % 32, v6), 10_000 + (i % 32) as u16, vip, port, Tcp::Ack, b"data")),
            2 => mix.push(udp(client(i % 32, v6), 10_000 + (i % 32) as u16, vip, port, b"more")),
            // New TCP and UDP flows.
            3 => mix.push(tcp(client(i, v6), 20_000 + (i / 10 % 40_000) as u16, vip, port, Tcp::Syn, b"")),
            4 => mix.push(udp(client(i, v6), 20_000 + (i / 10 % 40_000) as u16, vip, port, b"new")),
            // NAT replies.
            5 => mix.push(replies[i % replies.len()].clone()),
            // Who has the VIP? Answered in place.
            6 if i / 10 % 2 == 1 => mix.push(neighbour_request(if i / 10 % 4 == 1 { vip4 } else { vip6 })),
            // Not ours: passes.
            6 => mix.push(tcp(
                client(i, v6),
                1234,
                if v6 { v4("2001:db8::99") } else { v4("192.0.2.99") },
                80,
                Tcp::Syn,
                b"",
            )),
            // Malformed and truncated.
            7 => {
                let mut f = tcp(client(i, v6), 1, vip, port, Tcp::Syn, b"");
                if v6 {
                    f.truncate(30);
                } else {
                    f[14] = 0x43; // IHL 3
                }
                mix.push(f);
            }
            // VIP without that port, and a source outside the allowed range.
            8 => mix.push(tcp(client(i, v6), 1, vip, 9999, Tcp::Syn, b"")),
            // A full-NAT packet whose TTL expires: answered with ICMP time exceeded in place.
            9 if i / 10 % 4 == 1 => {
                // (Frames 9, 19, ... are all odd: the family alternates by tens instead.)
                let v6 = i / 10 % 8 == 1;
                let vip = if v6 { vip6 } else { vip4 };
                let mut f = tcp(client(i, v6), 30_000, vip, 80, Tcp::Syn, b"probe");
                if v6 {
                    f[14 + 7] = 1;
                } else {
                    f[14 + 8] = 1;
                }
                mix.push(f);
            }
            _ => mix.push(udp(v4("203.0.113.9"), 1, vip4, 81, b"not allowed")),
        }
        i += 1;
    }
    let mut old = Vec::with_capacity(1);

    // The counter does count on this thread.
    let probe = allocations();
    drop(std::hint::black_box(vec![1u8; 10]));
    assert!(allocations() > probe, "the counting allocator is not counting");

    let before = allocations();
    let (a, b) = mix.split_at(FRAMES / 2);
    let t1 = drive(&mut w, a, &mut bufs, None, 100);
    old.push(w.swap_tables(tables2.clone()));
    let t2 = drive(&mut w, b, &mut bufs, None, 200);
    let after = allocations();

    assert_eq!(after - before, 0, "the worker allocated {} times", after - before);
    let total: u64 = t1.iter().chain(&t2).sum();
    assert_eq!(total, FRAMES as u64);
    let tx = t1[0] + t2[0];
    let drops = t1[2] + t2[2];
    assert!(tx > FRAMES as u64 / 2, "most frames forward: {t1:?} {t2:?}");
    assert!(drops >= FRAMES as u64 / 10 * 2, "the malformed and unserved frames drop: {t1:?} {t2:?}");
    assert_eq!(w.stats().rx, (warm.len() + FRAMES) as u64);
    assert_eq!(w.stats().arp_replies + w.stats().ndp_adverts, (FRAMES / 20) as u64, "every request answered");
    assert!(w.stats().arp_replies > 0 && w.stats().ndp_adverts > 0);
    assert!(w.stats().icmp_time_exceeded > 0, "expired packets answered");
}

/// An ARP request (IPv4) or a neighbour solicitation with a source link-layer option (IPv6) for `vip`,
/// built with smoltcp's emitters.
fn neighbour_request(vip: std::net::IpAddr) -> Vec<u8> {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::*;
    let asker = EthernetAddress([2, 0, 0, 0, 0, 0xc1]);
    let mut f = vec![0u8; 14];
    f[6..12].copy_from_slice(&asker.0);
    match vip {
        std::net::IpAddr::V4(target) => {
            f[..6].copy_from_slice(&[0xff; 6]);
            f[12..14].copy_from_slice(&[0x08, 0x06]);
            let repr = ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Request,
                source_hardware_addr: asker,
                source_protocol_addr: std::net::Ipv4Addr::new(198, 51, 100, 1),
                target_hardware_addr: EthernetAddress([0; 6]),
                target_protocol_addr: target,
            };
            f.resize(14 + repr.buffer_len(), 0);
            repr.emit(&mut ArpPacket::new_unchecked(&mut f[14..]));
        }
        std::net::IpAddr::V6(target) => {
            let o = target.octets();
            f[..6].copy_from_slice(&[0x33, 0x33, 0xff, o[13], o[14], o[15]]);
            f[12..14].copy_from_slice(&[0x86, 0xdd]);
            let src = "2001:db8:ff::1".parse().unwrap();
            let o = target.octets();
            let dst = std::net::Ipv6Addr::from([0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15]]);
            let ns = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
                target_addr: target,
                lladdr: Some(RawHardwareAddress::from_bytes(&asker.0)),
            });
            let ip = Ipv6Repr {
                src_addr: src,
                dst_addr: dst,
                next_header: IpProtocol::Icmpv6,
                payload_len: ns.buffer_len(),
                hop_limit: 255,
            };
            f.resize(14 + 40 + ns.buffer_len(), 0);
            let mut p = Ipv6Packet::new_unchecked(&mut f[14..]);
            ip.emit(&mut p);
            ns.emit(&src, &dst, &mut Icmpv6Packet::new_unchecked(p.payload_mut()), &ChecksumCapabilities::default());
        }
    }
    f
}
