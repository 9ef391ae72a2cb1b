//! `lb replay` end to end, without root: a capture with frames for a service, for a VIP port with no
//! service and for an address that is not a VIP goes through the worker; the output capture holds
//! the NAT-rewritten frames and the counts name each verdict.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use pcap_file::pcap::{PcapPacket, PcapReader, PcapWriter};

fn checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv4/UDP frame (UDP checksum 0, IPv4 header checksum right).
fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x99, 0x08, 0x00];
    let mut ip = vec![0x45, 0, 0, 32, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0, 12, 0, 0, b'p', b'i', b'n', b'g']);
    f
}

/// Runs `lb replay --in input --out output [--config config]`.
fn replay(input: &Path, output: &Path, config: Option<&Path>) -> Output {
    let mut lb = Command::new(env!("CARGO_BIN_EXE_lb"));
    lb.args(["--log", "warn", "replay", "--in"]).arg(input).arg("--out").arg(output);
    if let Some(config) = config {
        lb.arg("--config").arg(config);
    }
    lb.output().unwrap()
}

#[test]
fn replay_counts_verdicts_and_writes_rewritten_frames() {
    let dir = std::env::temp_dir().join(format!("lb-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (input, output, config) = (dir.join("in.pcap"), dir.join("out.pcap"), dir.join("lb.yaml"));
    std::fs::write(
        &config,
        r#"
node:
  local_mac: "02:00:00:00:00:01"
  gateway_mac: "02:00:00:00:00:99"
  snat_v4: 10.0.0.2
services:
  - name: dns
    vip: 10.0.0.10
    port: 53
    protocol: udp
    scheduler: mh
    mode: nat
    backends:
      - { addr: 10.1.0.1, port: 5353, weight: 1, mac: "02:00:00:00:01:01" }
"#,
    )
    .unwrap();
    {
        let mut w = PcapWriter::new(std::fs::File::create(&input).unwrap()).unwrap();
        let frames = [
            udp4([192, 0, 2, 1], [10, 0, 0, 10], 40000, 53), // the service
            udp4([192, 0, 2, 2], [10, 0, 0, 10], 40001, 53), // the service, another flow
            udp4([192, 0, 2, 1], [10, 0, 0, 10], 40000, 54), // a VIP port without a service
            udp4([192, 0, 2, 1], [10, 9, 9, 9], 40000, 53),  // not a VIP
        ];
        for (i, f) in frames.iter().enumerate() {
            w.write_packet(&PcapPacket::new(Duration::from_secs(i as u64), f.len() as u32, f)).unwrap();
        }
    }
    let out = replay(&input, &output, Some(&config));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let count = |label: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label:?} in\n{text}"));
        line.split_whitespace().last().unwrap().parse().unwrap()
    };
    assert_eq!(count("frames read"), 4, "{text}");
    assert_eq!(count("tx (written)"), 2, "{text}");
    assert_eq!(count("pass"), 1, "{text}");
    assert_eq!(count("drop no_service"), 1, "{text}");

    let mut r = PcapReader::new(std::fs::File::open(&output).unwrap()).unwrap();
    let mut n = 0;
    while let Some(p) = r.next_packet() {
        let d = p.unwrap().data.into_owned();
        assert_eq!(&d[..6], &[0x02, 0, 0, 0, 1, 1], "to the backend's MAC");
        assert_eq!(&d[26..30], &[10, 0, 0, 2], "from the SNAT address");
        assert_eq!(&d[30..34], &[10, 1, 0, 1], "to the backend");
        assert_eq!(u16::from_be_bytes([d[36], d[37]]), 5353, "to the backend's port");
        assert_eq!(checksum(&d[14..34]), 0, "IPv4 header checksum still right");
        n += 1;
    }
    assert_eq!(n, 2);
    let _ = std::fs::remove_dir_all(dir);
}

/// A `tcpdump -s 128` capture replays: the frame captured whole goes through, the one cut short is
/// skipped and reported (replayed, it would be a Truncated drop that never happened on the wire).
#[test]
fn replay_skips_and_reports_frames_cut_short_by_the_snap_length() {
    use pcap_file::pcap::PcapHeader;
    let dir = std::env::temp_dir().join(format!("lb-replay-snaplen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (input, output) = (dir.join("in.pcap"), dir.join("out.pcap"));
    {
        let header = PcapHeader { snaplen: 128, ..PcapHeader::default() };
        let mut w = PcapWriter::with_header(std::fs::File::create(&input).unwrap(), header).unwrap();
        let whole = udp4([192, 0, 2, 1], [10, 0, 0, 10], 40000, 53);
        w.write_packet(&PcapPacket::new(Duration::from_secs(1), whole.len() as u32, &whole)).unwrap();
        w.write_packet(&PcapPacket::new(Duration::from_secs(2), 1514, &[0u8; 128])).unwrap();
    }
    let out = replay(&input, &output, None);
    let text = String::from_utf8_lossy(&out.stdout);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let count = |label: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no {label:?} in\n{text}"));
        line.split_whitespace().last().unwrap().parse().unwrap()
    };
    assert_eq!(count("frames read"), 1, "{text}");
    assert_eq!(count("skipped, cut short by the snap length"), 1, "{text}");
}

/// A configuration that is refused leaves `--out` as it was: the file is checked before the output
/// is created (which truncates it), so a rejected replay does not wipe the last replay's output.
#[test]
fn a_refused_configuration_leaves_the_output_alone() {
    let dir = std::env::temp_dir().join(format!("lb-replay-refused-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (input, output, config) = (dir.join("in.pcap"), dir.join("out.pcap"), dir.join("lb.yaml"));
    {
        let mut w = PcapWriter::new(std::fs::File::create(&input).unwrap()).unwrap();
        let f = udp4([192, 0, 2, 1], [10, 0, 0, 10], 40000, 53);
        w.write_packet(&PcapPacket::new(Duration::from_secs(1), f.len() as u32, &f)).unwrap();
    }
    std::fs::write(&output, b"the last replay's output").unwrap();
    std::fs::write(&config, "services: [{ vip: 10.0.0.10, port: 0 }]\n").unwrap();
    let out = replay(&input, &output, Some(&config));
    let kept = std::fs::read(&output).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("services[0].port: 0"), "{stderr}");
    assert_eq!(kept, b"the last replay's output", "the output is untouched");
}

/// The log filter comes from `--log`, else from RUST_LOG (which the shipped DaemonSet sets; it was
/// ignored), and one that does not parse is an error naming it, checked before anything runs (it
/// fell back to `info` without a word, hiding the lines a typo had asked for).
#[test]
fn rust_log_sets_the_log_filter_and_a_bad_one_is_an_error() {
    let run = |rust_log: &str, log: Option<&str>| {
        let mut lb = Command::new(env!("CARGO_BIN_EXE_lb"));
        lb.env("RUST_LOG", rust_log);
        if let Some(log) = log {
            lb.args(["--log", log]);
        }
        let out =
            lb.args(["replay", "--in", "/nonexistent/in.pcap", "--out", "/nonexistent/out.pcap"]).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = run("lb_io=bogus", None);
    assert!(!ok && err.contains("RUST_LOG") && err.contains("\"lb_io=bogus\" is not a log filter"), "{err}");
    assert!(!err.contains("open failed"), "the filter is checked first: {err}");
    // `--log` wins over RUST_LOG: the run gets as far as the missing capture.
    let (ok, err) = run("lb_io=bogus", Some("warn"));
    assert!(!ok && err.contains("open failed") && !err.contains("not a log filter"), "{err}");
    let (ok, err) = run("warn", None);
    assert!(!ok && err.contains("open failed"), "{err}");
}

/// A file whose SNAT address is the node's own (`node.snat_v4: node`, as deploy/'s ConfigMap
/// writes it) replays as `lb run` serves it: NAT from the node's first IPv4 address of the
/// Kubernetes settings. Replay read the file without filling it in and refused every NAT service
/// ("node.snat_v4 is not set").
#[test]
fn a_snat_address_left_to_the_node_is_the_node_address_in_a_replay() {
    let dir = std::env::temp_dir().join(format!("lb-replay-snat-node-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (input, output, config) = (dir.join("in.pcap"), dir.join("out.pcap"), dir.join("lb.yaml"));
    std::fs::write(
        &config,
        r#"
node: { snat_v4: node, gateway_mac: "02:00:00:00:00:99" }
kubernetes: { node_name: node-a, node_addresses: [10.0.0.2] }
services:
  - { vip: 10.0.0.10, port: 53, protocol: udp, backends: [{ addr: 10.1.0.1, mac: "02:00:00:00:01:01" }] }
"#,
    )
    .unwrap();
    {
        let mut w = PcapWriter::new(std::fs::File::create(&input).unwrap()).unwrap();
        let f = udp4([192, 0, 2, 1], [10, 0, 0, 10], 40000, 53);
        w.write_packet(&PcapPacket::new(Duration::from_secs(1), f.len() as u32, &f)).unwrap();
    }
    let out = replay(&input, &output, Some(&config));
    let written = std::fs::read(&output).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut r = PcapReader::new(written.as_slice()).unwrap();
    let d = r.next_packet().expect("the frame is forwarded").unwrap().data.into_owned();
    assert_eq!(&d[26..30], &[10, 0, 0, 2], "from the node's address");
    assert_eq!(&d[30..34], &[10, 1, 0, 1], "to the backend");
    assert!(r.next_packet().is_none());
}

/// `--out /dev/stdout` pipes the replay to `tcpdump -r -` or Wireshark: standard output then holds
/// the capture alone, and the counts go to standard error. They went to standard output too, before
/// the capture's first byte, and tcpdump said "unknown file format".
#[test]
fn a_replay_written_to_standard_output_is_a_capture_alone() {
    let dir = std::env::temp_dir().join(format!("lb-replay-stdout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.pcap");
    {
        let mut w = PcapWriter::new(std::fs::File::create(&input).unwrap()).unwrap();
        for i in 0..3u16 {
            let f = udp4([192, 0, 2, 1], [10, 0, 0, 10], 40000 + i, 53);
            w.write_packet(&PcapPacket::new(Duration::from_secs(u64::from(i)), f.len() as u32, &f)).unwrap();
        }
    }
    let out = replay(&input, Path::new("/dev/stdout"), None);
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let mut r = PcapReader::new(out.stdout.as_slice()).expect("standard output is a capture");
    let mut n = 0;
    while let Some(p) = r.next_packet() {
        p.unwrap();
        n += 1;
    }
    assert_eq!(n, 3, "every frame written");
    assert!(stderr.lines().any(|l| l.starts_with("frames read") && l.ends_with(" 3")), "counts on stderr: {stderr}");
}

/// A frame too long for a buffer is skipped, and the count names the longest frame replayed: 1792
/// bytes (a 2 KiB buffer less the headroom kept for encapsulation). It said "longer than a 2 KiB
/// buffer", which an 1800-byte frame (a link with an MTU of 1786) is not.
#[test]
fn a_frame_too_long_is_skipped_naming_the_longest_replayed() {
    let dir = std::env::temp_dir().join(format!("lb-replay-long-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (input, output) = (dir.join("in.pcap"), dir.join("out.pcap"));
    {
        let mut w = PcapWriter::new(std::fs::File::create(&input).unwrap()).unwrap();
        for len in [1792usize, 1800] {
            let mut f = udp4([192, 0, 2, 1], [10, 0, 0, 10], 40000, 53);
            f.resize(len, 0);
            w.write_packet(&PcapPacket::new(Duration::from_secs(1), len as u32, &f)).unwrap();
        }
    }
    let out = replay(&input, &output, None);
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let count = |label: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no {label:?} in\n{text}"));
        line.split_whitespace().last().unwrap().parse().unwrap()
    };
    assert_eq!(count("frames read"), 1, "{text}");
    assert_eq!(count("skipped, longer than 1792 bytes"), 1, "{text}");
}
