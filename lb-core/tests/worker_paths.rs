//! The per-packet path end to end: every mode and family forwards, NAT replies come back, and what is
//! not ours passes.
#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

mod worker_common;

use lb_core::stats::DropReason;
use lb_core::{Verdict, Worker, WorkerConfig};
use worker_common::*;

#[test]
fn nat_v4_tcp_forward_and_reply() {
    let mut w = worker(&all_modes_config());
    let client = v4("198.51.100.7");
    let (v, out) = run(&mut w, &tcp(client, 5555, v4("192.0.2.1"), 80, Tcp::Syn, b""), secs(1));
    assert_eq!(v, Verdict::Tx);
    let s = seen(&out);
    assert_eq!(s.src, v4("10.0.0.100"));
    assert!((40000..=40999).contains(&s.sport), "SNAT port {}", s.sport);
    assert!(s.dst == v4("10.1.0.1") || s.dst == v4("10.1.0.2"));
    assert_eq!(s.dport, 8080);
    assert_eq!(s.ttl, 63);
    assert_eq!((s.src_mac, s.dst_mac), (LOCAL_MAC, backend_mac(s.dst)));

    // The backend answers to SNAT address and port; the reply goes back as VIP -> client.
    let reply = tcp(s.dst, 8080, s.src, s.sport, Tcp::Ack, b"hello");
    let (v, back) = run(&mut w, &reply, secs(2));
    assert_eq!(v, Verdict::Tx);
    let r = seen(&back);
    assert_eq!((r.src, r.sport, r.dst, r.dport), (v4("192.0.2.1"), 80, client, 5555));
    assert_eq!(r.dst_mac, GATEWAY_MAC);
    assert_eq!(w.stats().reverse_nat, 1);
}

#[test]
fn every_mode_and_family_forwards_with_valid_checksums() {
    let mut w = worker(&all_modes_config());
    for vip in ["192.0.2.1", "2001:db8::1"] {
        let vip = v4(vip);
        let client = if vip.is_ipv4() { v4("198.51.100.7") } else { v4("2001:db8:ff::7") };
        for port in 80..=83u16 {
            for is_tcp in [true, false] {
                let frame = if is_tcp {
                    tcp(client, 4000, vip, port, Tcp::Syn, b"x")
                } else {
                    udp(client, 4000, vip, port, b"q")
                };
                let (v, out) = run(&mut w, &frame, secs(1));
                assert_eq!(v, Verdict::Tx, "{vip} port {port} tcp={is_tcp}");
                let s = seen(&out);
                match port {
                    80 => assert_eq!((s.dport, s.outer), (8080, None)),
                    81 => assert_eq!((s.src, s.dst, s.dport, s.outer), (client, vip, 81, None)),
                    82 | 83 => {
                        let (osrc, odst, _) = s.outer.unwrap();
                        assert_eq!((s.src, s.dst, s.dport), (client, vip, port));
                        assert_eq!(osrc, if vip.is_ipv4() { v4("10.0.0.101") } else { v4("fd00::101") });
                        assert_eq!(s.dst_mac, backend_mac(odst));
                        assert_eq!(s.gue_ports.is_some(), port == 83);
                    }
                    _ => unreachable!(),
                }
            }
        }
    }
    assert_eq!(w.stats().dropped_total(), 0);
}

#[test]
fn not_ours_passes_and_vip_without_service_drops() {
    let mut w = worker(&all_modes_config());
    let (v, _) = run(&mut w, &tcp(v4("198.51.100.7"), 1, v4("192.0.2.99"), 80, Tcp::Syn, b""), secs(1));
    assert_eq!(v, Verdict::Pass);
    let (v, _) = run(&mut w, &tcp(v4("198.51.100.7"), 1, v4("192.0.2.1"), 9999, Tcp::Syn, b""), secs(1));
    assert_eq!(v, Verdict::Drop(DropReason::NoService));
    assert_eq!(w.stats().dropped(DropReason::NoService), 1);
}

#[test]
fn established_flow_keeps_its_backend() {
    let mut w = worker(&all_modes_config());
    let client = v4("198.51.100.7");
    let (_, first) = run(&mut w, &tcp(client, 5000, v4("192.0.2.1"), 81, Tcp::Syn, b""), secs(1));
    for t in 2..20 {
        let (v, out) = run(&mut w, &tcp(client, 5000, v4("192.0.2.1"), 81, Tcp::Ack, b"data"), secs(t));
        assert_eq!(v, Verdict::Tx);
        assert_eq!(out[..6], first[..6]);
    }
}

#[test]
fn a_burst_decides_exactly_as_frames_one_by_one() {
    use lb_core::{Frame, Instant};
    let cfg = all_modes_config();
    let mut frames_in = vec![];
    for i in 0..45u16 {
        let (vip, client) = if i % 3 == 0 { ("2001:db8::1", "2001:db8:ff::7") } else { ("192.0.2.1", "198.51.100.7") };
        let port = 80 + i % 5; // 84: no such service
        frames_in.push(match i % 4 {
            0 => tcp(v4(client), 1000 + i % 7, v4(vip), port, Tcp::Syn, b"a"),
            1 => tcp(v4(client), 1000 + i % 7, v4(vip), port, Tcp::Ack, b"b"),
            2 => udp(v4(client), 2000 + i % 3, v4(vip), port, b"c"),
            _ => {
                let mut f = tcp(v4(client), 1, v4(vip), port, Tcp::Syn, b"");
                f.truncate(20 + usize::from(i));
                f
            }
        });
    }
    // One by one. (Both workers run the same tables: their counters name the same generations.)
    let tables = build(&cfg);
    let mut w1 = Worker::new(tables.clone(), WorkerConfig::single_core(4096));
    let one: Vec<_> = frames_in.iter().map(|f| run(&mut w1, f, secs(1))).collect();
    // As one burst of 45 (batches of 16, 16 and 13).
    let mut w2 = Worker::new(tables, WorkerConfig::single_core(4096));
    let mut bufs: Vec<Vec<u8>> =
        frames_in.iter().map(|f| [vec![0; HEADROOM], f.clone(), vec![0; 64]].concat()).collect();
    let mut frames: Vec<Frame<'_>> =
        bufs.iter_mut().zip(&frames_in).map(|(b, f)| Frame::new(b, HEADROOM, f.len())).collect();
    let mut verdicts = vec![Verdict::Pass; frames.len()];
    w2.process_burst(&mut frames, Instant::from_secs(1), &mut verdicts);
    for (i, ((v, out), f)) in one.iter().zip(&frames).enumerate() {
        assert_eq!((*v, out.as_slice()), (verdicts[i], f.data()), "frame {i}");
    }
    assert_eq!(w1.stats(), w2.stats());
}
