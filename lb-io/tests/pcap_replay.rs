//! The same poll loop replays a capture: frames in from one pcap file, rewritten frames out to another,
//! with the capture's timestamps as the loop's clock.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use lb_core::{Frame, Instant, Verdict};
use lb_io::{BurstProcessor, LoopConfig, PcapDevice, PollLoop, StopFlag, update_channel};
use pcap_file::pcap::{PcapPacket, PcapReader, PcapWriter};

/// Transmits even-numbered frames with byte 14 set to the second of `now`, drops the rest by Pass.
struct EvenOnly;

impl BurstProcessor for EvenOnly {
    type Update = ();
    fn process_burst(&mut self, frames: &mut [Frame<'_>], now: Instant, verdicts: &mut [Verdict]) {
        for (f, v) in frames.iter_mut().zip(verdicts.iter_mut()) {
            let d = f.data_mut();
            *v = if d[15] % 2 == 0 {
                d[14] = now.as_secs() as u8;
                Verdict::Tx
            } else {
                Verdict::Pass
            };
        }
    }
    fn apply(&mut self, update: ()) {
        update
    }
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("lb-io-{}-{name}", std::process::id()))
}

#[test]
fn replays_a_capture_with_its_own_clock() {
    let input = scratch("in.pcap");
    let output = scratch("out.pcap");
    {
        let mut w = PcapWriter::new(std::fs::File::create(&input).unwrap()).unwrap();
        for i in 0u8..100 {
            let mut f = vec![0u8; 64];
            f[15] = i;
            w.write_packet(&PcapPacket::new(Duration::from_secs(u64::from(i)), 64, &f)).unwrap();
        }
        // A frame larger than a buffer is skipped and counted, not truncated.
        w.write_packet(&PcapPacket::new(Duration::from_secs(200), 4000, &[0u8; 4000])).unwrap();
    }
    let dev = PcapDevice::open(&input, &output).unwrap();
    let (_tx, rx) = update_channel();
    let report = PollLoop::new(dev, EvenOnly, rx, StopFlag::new(), LoopConfig::default()).run().unwrap();
    assert_eq!((report.stats.rx, report.stats.tx, report.stats.pass), (100, 50, 50));
    assert_eq!(report.device.oversize_dropped(), 1);
    report.device.finish().unwrap();

    let mut r = PcapReader::new(std::fs::File::open(&output).unwrap()).unwrap();
    let mut seen = Vec::new();
    while let Some(p) = r.next_packet() {
        let p = p.unwrap();
        // The clock the worker saw is the timestamp of the burst's last frame: never earlier than
        // the frame's own, and never from the future of the capture.
        assert!(u64::from(p.data[14]) >= u64::from(p.data[15]) && p.data[14] < 100);
        seen.push(p.data[15]);
    }
    assert_eq!(seen, (0..100).step_by(2).collect::<Vec<u8>>());
    let _ = std::fs::remove_file(input);
    let _ = std::fs::remove_file(output);
}

#[test]
fn a_missing_capture_names_the_file() {
    let err = PcapDevice::open(&scratch("does-not-exist.pcap"), &scratch("x.pcap")).unwrap_err();
    assert!(err.to_string().contains("does-not-exist.pcap"), "{err}");
}

/// A capture taken with a snap length (`tcpdump -s 128`) holds long frames cut short: their records
/// say `orig_len` > snaplen. Such a capture replays: the frames that were captured whole are all
/// read, and the replay does not stop with a read error at the first cut one.
#[test]
fn a_capture_with_a_snap_length_replays() {
    use pcap_file::pcap::PcapHeader;
    let input = scratch("snaplen-in.pcap");
    let output = scratch("snaplen-out.pcap");
    {
        let header = PcapHeader { snaplen: 128, ..PcapHeader::default() };
        let mut w = PcapWriter::with_header(std::fs::File::create(&input).unwrap(), header).unwrap();
        let mut f = vec![0u8; 64];
        w.write_packet(&PcapPacket::new(Duration::from_secs(1), 64, &f)).unwrap();
        // A 1514-byte frame of which the first 128 bytes were captured.
        f.resize(128, 0);
        f[15] = 1;
        w.write_packet(&PcapPacket::new(Duration::from_secs(2), 1514, &f)).unwrap();
        f.truncate(64);
        f[15] = 2;
        w.write_packet(&PcapPacket::new(Duration::from_secs(3), 64, &f)).unwrap();
    }
    let dev = PcapDevice::open(&input, &output).unwrap();
    let (_tx, rx) = update_channel();
    let result = PollLoop::new(dev, EvenOnly, rx, StopFlag::new(), LoopConfig::default()).run();
    let _ = std::fs::remove_file(&input);
    let _ = std::fs::remove_file(&output);
    let report = result.expect("a snaplen-truncated capture is a valid capture");
    assert!(report.stats.rx >= 2, "the two whole frames are read: {:?}", report.stats);
    // The cut frame is skipped and counted: replayed, it would be a Truncated drop that never was.
    assert_eq!(report.stats.rx, 2, "{:?}", report.stats);
    assert_eq!(report.device.truncated_records(), 1);
    assert_eq!(report.device.oversize_dropped(), 0);
}

/// `lb replay` reads Ethernet captures only (its `--in` says so): a capture of another link type
/// (Linux cooked capture, `tcpdump -i any`) is refused when opened, naming the link type, rather than
/// having its frames parsed as Ethernet and the output written as an Ethernet capture.
#[test]
fn a_capture_of_another_link_type_is_refused() {
    use pcap_file::DataLink;
    use pcap_file::pcap::PcapHeader;
    let input = scratch("sll-in.pcap");
    let output = scratch("sll-out.pcap");
    {
        let header = PcapHeader { datalink: DataLink::LINUX_SLL, ..PcapHeader::default() };
        let mut w = PcapWriter::with_header(std::fs::File::create(&input).unwrap(), header).unwrap();
        w.write_packet(&PcapPacket::new(Duration::from_secs(1), 64, &[0u8; 64])).unwrap();
    }
    let opened = PcapDevice::open(&input, &output);
    let output_created = output.exists();
    let _ = std::fs::remove_file(&input);
    let _ = std::fs::remove_file(&output);
    let err = opened.expect_err("a Linux cooked capture is not Ethernet");
    assert!(err.to_string().to_lowercase().contains("link"), "{err}");
    assert!(err.to_string().contains("LINUX_SLL (113)"), "names the link type: {err}");
    assert!(!output_created, "the output is not created for a refused input");
}

/// A capture whose header marks an Ethernet FCS at the end of each frame (the link type field's
/// FCS-present bit and FCS length, here 2 16-bit words: link type 0x24000001, as a capture taken
/// with `rx-fcs` on marks it) replays with each frame's FCS stripped, and the output holds the
/// frames without one, an Ethernet capture. Such captures were refused as an unknown link type. A
/// record shorter than the FCS fails the replay naming its offset.
#[test]
fn a_capture_with_an_fcs_replays_without_it() {
    use pcap_file::DataLink;
    use pcap_file::pcap::PcapHeader;
    let input = scratch("fcs-in.pcap");
    let output = scratch("fcs-out.pcap");
    let header = PcapHeader { datalink: DataLink::Unknown(0x2400_0001), ..PcapHeader::default() };
    let fcs = [0xde, 0xad, 0xbe, 0xef];
    {
        let mut w = PcapWriter::with_header(std::fs::File::create(&input).unwrap(), header).unwrap();
        for i in 0u8..4 {
            let mut f = vec![i; 64];
            f[15] = i;
            f.extend_from_slice(&fcs);
            w.write_packet(&PcapPacket::new(Duration::from_secs(u64::from(i)), 68, &f)).unwrap();
        }
    }
    let dev = PcapDevice::open(&input, &output).unwrap();
    let (_tx, rx) = update_channel();
    let result = PollLoop::new(dev, EvenOnly, rx, StopFlag::new(), LoopConfig::default()).run();
    let report = result.expect("a capture with an FCS replays");
    assert_eq!((report.stats.rx, report.stats.tx), (4, 2), "{:?}", report.stats);
    report.device.finish().unwrap();
    let mut r = PcapReader::new(std::fs::File::open(&output).unwrap()).unwrap();
    assert_eq!(r.header().datalink, DataLink::ETHERNET);
    let mut seen = Vec::new();
    while let Some(p) = r.next_packet() {
        let p = p.unwrap();
        assert_eq!((p.data.len(), p.orig_len), (64, 64), "the frame without its FCS");
        assert!(p.data[16..].iter().all(|&b| b == p.data[15]), "its own bytes, no FCS: {:?}", p.data);
        seen.push(p.data[15]);
    }
    assert_eq!(seen, vec![0, 2]);

    // A record of 3 bytes cannot end with a 4-byte FCS.
    {
        let mut w = PcapWriter::with_header(std::fs::File::create(&input).unwrap(), header).unwrap();
        w.write_packet(&PcapPacket::new(Duration::from_secs(1), 68, &[0; 68])).unwrap();
        w.write_packet(&PcapPacket::new(Duration::from_secs(2), 3, &[0; 3])).unwrap();
    }
    let dev = PcapDevice::open(&input, &output).unwrap();
    let (_tx, rx) = update_channel();
    let result = PollLoop::new(dev, EvenOnly, rx, StopFlag::new(), LoopConfig::default()).run();
    let _ = std::fs::remove_file(&input);
    let _ = std::fs::remove_file(&output);
    let text = result.map(|r| r.stats).expect_err("a record shorter than its FCS").to_string();
    let at = 24 + 16 + 68;
    assert!(text.contains(&format!("the record at byte {at} holds 3 bytes, fewer than the 4-byte FCS")), "{text}");
}

/// A nanosecond capture (magic 0xa1b23c4d) is written out as one: its timestamps keep their
/// nanoseconds rather than being cut to microseconds.
#[test]
fn a_nanosecond_capture_replays_into_a_nanosecond_capture() {
    use pcap_file::TsResolution;
    use pcap_file::pcap::PcapHeader;
    let input = scratch("nanos-in.pcap");
    let output = scratch("nanos-out.pcap");
    let ts = Duration::new(1, 123_456_789);
    {
        let header = PcapHeader { ts_resolution: TsResolution::NanoSecond, ..PcapHeader::default() };
        let mut w = PcapWriter::with_header(std::fs::File::create(&input).unwrap(), header).unwrap();
        w.write_packet(&PcapPacket::new(ts, 64, &[0u8; 64])).unwrap();
    }
    let dev = PcapDevice::open(&input, &output).unwrap();
    let (_tx, rx) = update_channel();
    let report = PollLoop::new(dev, EvenOnly, rx, StopFlag::new(), LoopConfig::default()).run().unwrap();
    assert_eq!(report.stats.tx, 1);
    report.device.finish().unwrap();
    let mut r = PcapReader::new(std::fs::File::open(&output).unwrap()).unwrap();
    let resolution = r.header().ts_resolution;
    let written = r.next_packet().unwrap().unwrap().timestamp;
    let _ = std::fs::remove_file(input);
    let _ = std::fs::remove_file(output);
    assert_eq!(resolution, TsResolution::NanoSecond);
    assert_eq!(written, ts);
}

/// Each written frame carries the timestamp of the frame it was read as, whatever the loop's
/// flushing: frames queued across several bursts (a TX batch bigger than one burst's transmits, a
/// flush deadline never reached) are not all stamped with the time of the burst that flushed them,
/// so the output does not depend on how fast the replay ran.
#[test]
fn each_written_frame_keeps_its_own_timestamp() {
    let input = scratch("stamps-in.pcap");
    let output = scratch("stamps-out.pcap");
    {
        let mut w = PcapWriter::new(std::fs::File::create(&input).unwrap()).unwrap();
        for i in 0u8..200 {
            let mut f = vec![0u8; 64];
            f[15] = i;
            w.write_packet(&PcapPacket::new(Duration::from_millis(u64::from(i) * 10), 64, &f)).unwrap();
        }
    }
    let dev = PcapDevice::open(&input, &output).unwrap();
    let (_tx, rx) = update_channel();
    let config = LoopConfig { tx_batch: 64, flush_interval: Duration::from_secs(3600), ..LoopConfig::default() };
    let report = PollLoop::new(dev, EvenOnly, rx, StopFlag::new(), config).run().unwrap();
    assert_eq!(report.stats.tx, 100);
    report.device.finish().unwrap();
    let mut r = PcapReader::new(std::fs::File::open(&output).unwrap()).unwrap();
    let mut stamps = Vec::new();
    while let Some(p) = r.next_packet() {
        let p = p.unwrap();
        stamps.push((p.data[15], p.timestamp));
    }
    let _ = std::fs::remove_file(input);
    let _ = std::fs::remove_file(output);
    let want: Vec<(u8, Duration)> =
        (0u8..200).step_by(2).map(|i| (i, Duration::from_millis(u64::from(i) * 10))).collect();
    assert_eq!(stamps, want);
}

/// A pcapng capture (what Wireshark and `dumpcap` write by default) is refused when opened with a
/// message that says so and how to convert it, not pcap-file's "wrong magic number".
#[test]
fn a_pcapng_capture_is_refused_naming_the_format() {
    let input = scratch("ng-in.cap");
    let output = scratch("ng-out.pcap");
    // A pcapng section header block: type 0x0a0d0d0a, length 28, byte-order magic, version 1.0,
    // section length unknown (-1), length again.
    let mut shb = Vec::new();
    shb.extend_from_slice(&0x0a0d_0d0a_u32.to_le_bytes());
    shb.extend_from_slice(&28u32.to_le_bytes());
    shb.extend_from_slice(&0x1a2b_3c4d_u32.to_le_bytes());
    shb.extend_from_slice(&1u16.to_le_bytes());
    shb.extend_from_slice(&0u16.to_le_bytes());
    shb.extend_from_slice(&(-1i64).to_le_bytes());
    shb.extend_from_slice(&28u32.to_le_bytes());
    std::fs::write(&input, &shb).unwrap();
    let opened = PcapDevice::open(&input, &output);
    let output_created = output.exists();
    let _ = std::fs::remove_file(&input);
    let _ = std::fs::remove_file(&output);
    let err = opened.expect_err("pcapng is not read");
    assert!(err.to_string().contains("pcapng"), "names the format: {err}");
    assert!(err.to_string().contains("editcap"), "says how to convert it: {err}");
    assert!(!output_created, "the output is not created for a refused input");
}

/// A capture cut off inside its last record (tcpdump killed, a copy of a capture still being
/// written) replays every whole record before the cut, and the device says a record was cut off,
/// instead of the replay failing with pcap-file's bare "Error reading bytes" and no counts.
#[test]
fn a_capture_cut_inside_its_last_record_replays_the_whole_ones() {
    let input = scratch("cut-in.pcap");
    let output = scratch("cut-out.pcap");
    {
        let mut w = PcapWriter::new(std::fs::File::create(&input).unwrap()).unwrap();
        for i in 0u8..10 {
            let mut f = vec![0u8; 64];
            f[15] = i;
            w.write_packet(&PcapPacket::new(Duration::from_secs(u64::from(i)), 64, &f)).unwrap();
        }
    }
    let len = std::fs::metadata(&input).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&input).unwrap().set_len(len - 20).unwrap();
    let dev = PcapDevice::open(&input, &output).unwrap();
    let (_tx, rx) = update_channel();
    let result = PollLoop::new(dev, EvenOnly, rx, StopFlag::new(), LoopConfig::default()).run();
    let _ = std::fs::remove_file(&input);
    let report = result.expect("the whole records replay");
    assert_eq!((report.stats.rx, report.stats.tx), (9, 5), "{:?}", report.stats);
    assert!(report.device.ends_inside_a_record());
    report.device.finish().unwrap();
    let mut r = PcapReader::new(std::fs::File::open(&output).unwrap()).unwrap();
    let mut seen = Vec::new();
    while let Some(p) = r.next_packet() {
        seen.push(p.unwrap().data[15]);
    }
    let _ = std::fs::remove_file(&output);
    assert_eq!(seen, vec![0, 2, 4, 6, 8]);
}

/// A record whose length field is corrupt (more bytes than any frame, here in the middle of a capture
/// larger than pcap-file's 8 MB read buffer, and at the end of a small one) fails the replay naming
/// the record's offset and length: it is no cut-off capture, which would end the replay with exit 0
/// and the rest of the file silently not replayed.
#[test]
fn a_corrupt_record_length_fails_the_replay_naming_it() {
    for (name, frames_after) in [("corrupt-big", 140_000u32), ("corrupt-small", 3)] {
        let input = scratch(&format!("{name}-in.pcap"));
        let output = scratch(&format!("{name}-out.pcap"));
        let corrupt_at = {
            let mut w = PcapWriter::new(std::fs::File::create(&input).unwrap()).unwrap();
            for i in 0u8..4 {
                w.write_packet(&PcapPacket::new(Duration::from_secs(u64::from(i)), 64, &[i; 64])).unwrap();
            }
            let at = 24 + 4 * (16 + 64);
            for i in 0..=frames_after {
                w.write_packet(&PcapPacket::new(Duration::from_secs(10 + u64::from(i)), 64, &[0; 64])).unwrap();
            }
            at
        };
        // The fifth record's incl_len (native byte order, as PcapWriter writes) becomes 2 GiB.
        let mut bytes = std::fs::read(&input).unwrap();
        bytes[corrupt_at + 8..corrupt_at + 12].copy_from_slice(&0x7fff_ffffu32.to_ne_bytes());
        std::fs::write(&input, &bytes).unwrap();
        let dev = PcapDevice::open(&input, &output).unwrap();
        let (_tx, rx) = update_channel();
        let result = PollLoop::new(dev, EvenOnly, rx, StopFlag::new(), LoopConfig::default()).run();
        let _ = std::fs::remove_file(&input);
        let _ = std::fs::remove_file(&output);
        let err = result.map(|r| r.stats).expect_err("a corrupt record is no end of the capture");
        let text = err.to_string();
        assert!(
            text.contains(&format!("record at byte {corrupt_at}")) && text.contains("2147483647"),
            "{name}: {text}"
        );
    }
}

/// A record whose timestamp fraction is a second or more (1 000 000 in a microsecond capture,
/// 10^9 in a nanosecond one), or that holds more bytes than were on the wire, fails the replay
/// naming the record's offset, as a corrupt length does. pcap-file's "Invalid field value:
/// PacketHeader ts_nanosecond >= 1_000_000_000" named neither the record nor, for a microsecond
/// capture, the unit.
#[test]
fn a_record_with_a_bad_timestamp_or_length_fails_the_replay_naming_its_offset() {
    use pcap_file::TsResolution;
    use pcap_file::pcap::PcapHeader;
    let micro = TsResolution::MicroSecond;
    let nano = TsResolution::NanoSecond;
    // (the capture's resolution, the record header's field to corrupt (byte offset in it), its value,
    // what the error says)
    for (name, resolution, field, value, says) in [
        ("frac-us", micro, 4, 1_000_000u32, "has a timestamp fraction of 1000000 microseconds"),
        ("frac-us-overflow", micro, 4, 0xffff_ffff, "has a timestamp fraction of 4294967295 microseconds"),
        ("frac-ns", nano, 4, 1_000_000_000, "has a timestamp fraction of 1000000000 nanoseconds"),
        ("orig-len", micro, 12, 60, "holds 64 bytes, more than the 60 it says were on the wire"),
    ] {
        let input = scratch(&format!("{name}-in.pcap"));
        let output = scratch(&format!("{name}-out.pcap"));
        {
            let endianness = pcap_file::Endianness::native();
            let header = PcapHeader { ts_resolution: resolution, endianness, ..PcapHeader::default() };
            let mut w = PcapWriter::with_header(std::fs::File::create(&input).unwrap(), header).unwrap();
            for i in 0u8..4 {
                w.write_packet(&PcapPacket::new(Duration::from_secs(u64::from(i)), 64, &[i; 64])).unwrap();
            }
        }
        // The third record's field (native byte order, as PcapWriter writes).
        let at = 24 + 2 * (16 + 64);
        let mut bytes = std::fs::read(&input).unwrap();
        bytes[at + field..at + field + 4].copy_from_slice(&value.to_ne_bytes());
        std::fs::write(&input, &bytes).unwrap();
        let dev = PcapDevice::open(&input, &output).unwrap();
        let (_tx, rx) = update_channel();
        let result = PollLoop::new(dev, EvenOnly, rx, StopFlag::new(), LoopConfig::default()).run();
        let _ = std::fs::remove_file(&input);
        let _ = std::fs::remove_file(&output);
        let text = result.map(|r| r.stats).expect_err("a corrupt record fails the replay").to_string();
        assert!(text.contains(&format!("the record at byte {at} {says}")), "{name}: {text}");
    }
}

/// A file too short to hold a pcap header is refused saying so, not "Error reading bytes".
#[test]
fn a_file_shorter_than_a_pcap_header_is_refused_saying_so() {
    let input = scratch("short-in.pcap");
    let output = scratch("short-out.pcap");
    std::fs::write(&input, [0xd4, 0xc3, 0xb2, 0xa1, 2, 0]).unwrap();
    let opened = PcapDevice::open(&input, &output);
    let _ = std::fs::remove_file(&input);
    let _ = std::fs::remove_file(&output);
    let err = opened.expect_err("6 bytes are no capture");
    assert!(err.to_string().contains("24-byte pcap header"), "{err}");
}

/// `--out` naming the capture being read (the same path, or another path to the same file) is
/// refused before anything is written: creating the output would truncate the input, losing the
/// capture and replaying only what the reader had buffered of it.
#[test]
fn an_output_that_is_the_input_is_refused_and_the_capture_kept() {
    let input = scratch("same.pcap");
    {
        let mut w = PcapWriter::new(std::fs::File::create(&input).unwrap()).unwrap();
        w.write_packet(&PcapPacket::new(Duration::from_secs(1), 64, &[0u8; 64])).unwrap();
    }
    let before = std::fs::read(&input).unwrap();
    let link = scratch("same-link.pcap");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&input, &link).unwrap();
    let same = PcapDevice::open(&input, &input).map(|_| ());
    let linked = PcapDevice::open(&input, &link).map(|_| ());
    let after = std::fs::read(&input).unwrap();
    let _ = std::fs::remove_file(&input);
    let _ = std::fs::remove_file(&link);
    assert_eq!(after, before, "the capture is untouched");
    for (how, opened) in [("same path", same), ("symlink", linked)] {
        let err = opened.expect_err(how);
        assert!(err.to_string().contains("is the capture being read"), "{how}: {err}");
    }
}

/// An output that cannot be written (here a full disk, `/dev/full`) stops the replay with the
/// system's reason, not pcap-file's "Error reading bytes" for every I/O error.
#[test]
fn a_write_error_says_what_failed() {
    let input = scratch("full-in.pcap");
    {
        let mut w = PcapWriter::new(std::fs::File::create(&input).unwrap()).unwrap();
        // More than the output's write buffer, so frames are written before the end.
        for i in 0u8..200 {
            let mut f = vec![0u8; 64];
            f[15] = i & !1;
            w.write_packet(&PcapPacket::new(Duration::from_secs(1), 64, &f)).unwrap();
        }
    }
    let dev = PcapDevice::open(&input, std::path::Path::new("/dev/full")).unwrap();
    let (_tx, rx) = update_channel();
    let result = PollLoop::new(dev, EvenOnly, rx, StopFlag::new(), LoopConfig::default()).run();
    let _ = std::fs::remove_file(&input);
    let err = result.map(|_| ()).expect_err("/dev/full takes nothing");
    let msg = err.to_string();
    assert!(msg.contains("/dev/full") && msg.contains("No space left on device"), "{msg}");
    assert!(!msg.contains("reading"), "{msg}");
}
