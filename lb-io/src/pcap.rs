//! A capture-file device: reads frames from a pcap file, writes transmitted frames to another, and
//! gives the loop the capture's timestamps as its clock so a replay is deterministic. Each written
//! frame carries the timestamp of the frame it was read as, however the loop batched its flushes.
//!
//! Records are read raw and checked here, not by pcap-file's `next_packet`: that one refuses any
//! record whose `orig_len` exceeds the header's snaplen, which is every cut-short frame of a
//! `tcpdump -s N` capture. A cut-short frame (fewer bytes captured than were on the wire) is skipped
//! and counted, not replayed: lb-core would count its captured part as a Truncated drop, a drop that
//! never happened on the wire. A capture that ends inside a record (tcpdump killed mid-write, a
//! copy of a capture still being written) replays its whole records and then ends, saying so
//! ([`PcapDevice::ends_inside_a_record`]), as Wireshark and `tcpdump -r` read such a file. A record
//! whose length field is corrupt (more than any frame, as Wireshark judges it) is a read error naming
//! its offset: pcap-file reports it as the end of the file, as it does a record longer than its 8 MB
//! read buffer, so the record's header is read again here to tell the two apart. A record whose
//! timestamp fraction is a second or more, or that holds more bytes than were on the wire, is a read
//! error naming its offset too.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter};
use std::path::Path;
use std::time::Duration;

use lb_core::{Frame, Instant};
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapReader, PcapWriter, RawPcapPacket};
use pcap_file::{DataLink, Endianness, PcapError, TsResolution};

use crate::chunk::ChunkPool;
use crate::device::{Device, DeviceError, FlushProgress, MAX_BURST, Received, Span};

/// Buffer size: a full Ethernet frame with a VLAN tag, plus headroom.
const BUFFER_SIZE: usize = 2048;
/// Headroom before each packet, as an AF_XDP UMEM gives (XDP_PACKET_HEADROOM).
const HEADROOM: usize = 256;
/// Buffers in the pool: two bursts.
const BUFFERS: usize = MAX_BURST * 2;

/// Reads one capture, writes another.
pub struct PcapDevice {
    pool: ChunkPool,
    reader: PcapReader<BufReader<File>>,
    /// The input's timestamp resolution, needed to read its records raw.
    ts_resolution: TsResolution,
    /// Bytes of FCS at the end of each input frame (its header's link type field says), stripped.
    fcs_len: usize,
    writer: PcapWriter<BufWriter<File>>,
    in_path: String,
    out_path: String,
    at_end: bool,
    /// Timestamp of the last frame received, used as the loop's clock.
    last_ts: Duration,
    /// Input timestamp of the frame in each buffer, by buffer index: the frame's output timestamp.
    stamps: Vec<Duration>,
    /// Frames skipped because they were longer than a buffer (jumbo frames).
    oversize: u64,
    /// Records skipped because the capture holds only the start of the frame (snap length).
    truncated: u64,
    /// The file ended inside a record: the whole ones before it were read.
    cut_off: bool,
    /// Where the next record starts: the pcap header and every record read so far.
    offset: u64,
    /// The input, read again at `offset` when pcap-file reports the end of the file in a record.
    input: Records,
    read_error: Option<String>,
}

impl std::fmt::Debug for PcapDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcapDevice").field("in", &self.in_path).field("out", &self.out_path).finish()
    }
}

impl PcapDevice {
    /// Opens `input` for reading and creates `output` (truncating it). Only an Ethernet capture is
    /// accepted: another link type (Linux cooked, raw IP) is refused, naming it. A capture whose
    /// header says its frames end with an FCS has it stripped from each frame; the output holds
    /// frames without one, as sent.
    pub fn open(input: &Path, output: &Path) -> Result<Self, DeviceError> {
        let in_path = input.display().to_string();
        let out_path = output.display().to_string();
        let file = File::open(input).map_err(|e| DeviceError::Io { op: "open", device: in_path.clone(), source: e })?;
        let again = file.try_clone().map_err(|e| DeviceError::Io { op: "open", device: in_path.clone(), source: e })?;
        let mut buffered = BufReader::new(file);
        // The first bytes, looked at (not consumed) to name what pcap-file may refuse.
        let pcapng = buffered.fill_buf().is_ok_and(|b| b.starts_with(&PCAPNG_MAGIC));
        let reader = PcapReader::new(buffered).map_err(|e| DeviceError::Pcap {
            op: "read",
            path: in_path.clone(),
            message: header_problem(pcapng, &e),
        })?;
        let header = reader.header();
        let (link_type, fcs_len) = link_type_and_fcs(u32::from(header.datalink));
        if link_type != DataLink::ETHERNET {
            // Refused before the output is created: a replay parses every frame as Ethernet.
            let number = u32::from(link_type);
            let name = match link_type {
                DataLink::Unknown(_) => "unknown".to_string(),
                known => format!("{known:?}"),
            };
            return Err(DeviceError::Pcap {
                op: "read",
                path: in_path,
                message: format!(
                    "link type {name} ({number}) is not Ethernet, the only one replayed; capture on an \
                     interface (tcpdump -i eth0), not on `any` (which writes Linux cooked frames)"
                ),
            });
        }
        // Creating the output truncates it: if it is the input, the capture would be lost.
        if same_file(input, output) {
            return Err(DeviceError::Pcap {
                op: "write",
                path: out_path,
                message: format!("is the capture being read ({in_path}); write the replay to another file"),
            });
        }
        let ts_resolution = header.ts_resolution;
        let input = Records { file: again, endianness: header.endianness, snaplen: header.snaplen };
        let file =
            File::create(output).map_err(|e| DeviceError::Io { op: "create", device: out_path.clone(), source: e })?;
        // The output keeps the input's timestamp resolution (a nanosecond capture stays one); the
        // rest is PcapWriter::new's header: Ethernet, snaplen 65535, native byte order.
        let out_header = PcapHeader { ts_resolution, endianness: Endianness::native(), ..PcapHeader::default() };
        let writer = PcapWriter::with_header(BufWriter::new(file), out_header).map_err(|e| DeviceError::Pcap {
            op: "write",
            path: out_path.clone(),
            message: reason(&e),
        })?;
        Ok(PcapDevice {
            pool: ChunkPool::new(BUFFERS, BUFFER_SIZE, HEADROOM),
            reader,
            ts_resolution,
            fcs_len,
            writer,
            in_path,
            out_path,
            at_end: false,
            last_ts: Duration::ZERO,
            stamps: vec![Duration::ZERO; BUFFERS],
            oversize: 0,
            truncated: 0,
            cut_off: false,
            offset: PCAP_HEADER_LEN,
            input,
            read_error: None,
        })
    }

    /// Frames skipped because they did not fit a buffer (longer than [`PcapDevice::longest_frame`]).
    pub fn oversize_dropped(&self) -> u64 {
        self.oversize
    }

    /// The longest frame replayed: a buffer less the headroom kept for the headers a tunnel adds,
    /// as an AF_XDP chunk leaves it.
    pub fn longest_frame(&self) -> usize {
        self.pool.packet_room()
    }

    /// Records skipped because the capture cut the frame short (`tcpdump -s N`): replaying the part
    /// that was captured would feed the worker a frame shorter than its IP header says.
    pub fn truncated_records(&self) -> u64 {
        self.truncated
    }

    /// Whether the capture ended inside a record (the file cut off while being written): every
    /// whole record before it was read, the cut one was not.
    pub fn ends_inside_a_record(&self) -> bool {
        self.cut_off
    }

    /// Flushes the output file; call once the loop has stopped.
    pub fn finish(mut self) -> Result<(), DeviceError> {
        use std::io::Write;
        let path = self.out_path.clone();
        self.flush()?;
        self.writer.into_writer().flush().map_err(|e| DeviceError::Io { op: "write", device: path, source: e })
    }
}

/// Whether `a` and `b` name one file (the same path, a link, another spelling of it).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// pcapng's first four bytes (its section header block type), the same in either byte order.
const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];

/// What is wrong with the start of a capture that pcap-file refused with `e`: pcapng (`pcapng`: its
/// first bytes say so), too short to be a capture, or pcap-file's own reason.
fn header_problem(pcapng: bool, e: &PcapError) -> String {
    if pcapng {
        return "the file is pcapng, and only pcap is read: convert it with `editcap -F pcap IN OUT` (or capture \
                with `tcpdump -w`, which writes pcap)"
            .to_string();
    }
    match e {
        PcapError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the file is shorter than a 24-byte pcap header".to_string()
        }
        _ => reason(e),
    }
}

/// The link type in a pcap header's link type field, and the bytes of FCS at the end of each frame:
/// the field's upper bits may say how long the FCS is (bit 26 set, the length in 16-bit words in
/// bits 28 to 31: draft-ietf-opsawg-pcap, "LinkType and additional information"; libpcap's
/// `LT_FCS_LENGTH_PRESENT`), as captures taken with the FCS (`ethtool -K IF rx-fcs on`, capture
/// cards) mark it; 0 when they do not. The reserved bits stay in the link type, so one that sets
/// them is refused as an unknown type.
fn link_type_and_fcs(field: u32) -> (DataLink, usize) {
    const FCS_LENGTH_PRESENT: u32 = 0x0400_0000;
    const FCS_LENGTH: u32 = 0xf000_0000;
    let fcs_words = if field & FCS_LENGTH_PRESENT != 0 { field >> 28 } else { 0 };
    (DataLink::from(field & !(FCS_LENGTH_PRESENT | FCS_LENGTH)), 2 * fcs_words as usize)
}

/// The pcap header's length, before the first record.
const PCAP_HEADER_LEN: u64 = 24;
/// A record header's length: timestamp, captured length, length on the wire.
const RECORD_HEADER_LEN: u64 = 16;
/// The longest frame a record may hold whatever its header's snap length says: Wireshark's limit
/// for Ethernet (`WTAP_MAX_PACKET_SIZE_STANDARD`), past which it calls a capture corrupt.
const MAX_RECORD_LEN: u32 = 262_144;

/// The capture file again, to read a record's header where pcap-file reported the end of the file.
struct Records {
    file: File,
    endianness: Endianness,
    snaplen: u32,
}

impl Records {
    /// Why the record at `offset` cannot be read, if it is not cut off by the end of the file: a
    /// length past any frame's (a corrupt length field), or one that would fit in the file but
    /// not in pcap-file's 8 MB read buffer. `None` when the file ends inside the record.
    fn unreadable(&self, offset: u64) -> Option<String> {
        use std::os::unix::fs::FileExt;
        let mut header = [0u8; RECORD_HEADER_LEN as usize];
        // Fewer than 16 bytes left (or none readable): the file ends inside the record's header.
        self.file.read_exact_at(&mut header, offset).ok()?;
        let field = [header[8], header[9], header[10], header[11]];
        let len = match self.endianness {
            Endianness::Big => u32::from_be_bytes(field),
            Endianness::Little => u32::from_le_bytes(field),
        };
        let most = MAX_RECORD_LEN.max(self.snaplen);
        if len > most {
            return Some(format!(
                "the record at byte {offset} says it holds {len} bytes, more than any frame ({most}): \
                 the capture is corrupt from there"
            ));
        }
        let file_len = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        (offset + RECORD_HEADER_LEN + u64::from(len) <= file_len)
            .then(|| format!("the record at byte {offset} holds {len} bytes, more than the 8 MB the reader can take"))
    }
}

/// The record `raw`, checked as pcap-file checks it but for the snap length (see the module
/// comment): a timestamp fraction under a second, and no more bytes captured than were on the wire.
/// The error says what is wrong, for a message that names the record's offset (pcap-file's does
/// not, and calls a microsecond fraction nanoseconds).
fn checked(raw: RawPcapPacket<'_>, ts_resolution: TsResolution) -> Result<PcapPacket<'_>, String> {
    let (nanos, unit, second) = match ts_resolution {
        TsResolution::MicroSecond => (raw.ts_frac.checked_mul(1000), "microseconds", "1000000"),
        TsResolution::NanoSecond => (Some(raw.ts_frac), "nanoseconds", "1000000000"),
    };
    let Some(nanos) = nanos.filter(|&n| n < 1_000_000_000) else {
        return Err(format!(
            "has a timestamp fraction of {} {unit}, which is a fraction of a second, below {second}",
            raw.ts_frac
        ));
    };
    if raw.incl_len > raw.orig_len {
        return Err(format!("holds {} bytes, more than the {} it says were on the wire", raw.incl_len, raw.orig_len));
    }
    Ok(PcapPacket { timestamp: Duration::new(u64::from(raw.ts_sec), nanos), orig_len: raw.orig_len, data: raw.data })
}

/// What went wrong in `e`: for an I/O error the system's own message, since pcap-file's is only
/// "Error reading bytes" (for a failed write too).
fn reason(e: &PcapError) -> String {
    match e {
        PcapError::IoError(io) => io.to_string(),
        _ => e.to_string(),
    }
}

impl Device for PcapDevice {
    fn receive<'a>(&'a mut self, frames: &mut [Frame<'a>]) -> Result<Received, DeviceError> {
        if let Some(message) = self.read_error.take() {
            return Err(DeviceError::Pcap { op: "read", path: self.in_path.clone(), message });
        }
        let room = self.pool.packet_room();
        let reader = &mut self.reader;
        let ts_resolution = self.ts_resolution;
        let fcs_len = self.fcs_len;
        let at_end = &mut self.at_end;
        let last_ts = &mut self.last_ts;
        let stamps = &mut self.stamps;
        let oversize = &mut self.oversize;
        let truncated = &mut self.truncated;
        let cut_off = &mut self.cut_off;
        let offset = &mut self.offset;
        let input = &self.input;
        let read_error = &mut self.read_error;
        let count = self.pool.lend(frames, |buffer, buf| {
            loop {
                let record = reader.next_raw_packet();
                // Where this record starts, for its errors; then past it.
                let at = *offset;
                if let Some(Ok(raw)) = &record {
                    *offset += RECORD_HEADER_LEN + raw.data.len() as u64;
                }
                match record {
                    None => {
                        *at_end = true;
                        return None;
                    }
                    // pcap-file's word for a record that goes past the end of the file.
                    Some(Err(PcapError::IoError(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        *at_end = true;
                        match input.unreadable(at) {
                            None => *cut_off = true,
                            Some(problem) => *read_error = Some(problem),
                        }
                        return None;
                    }
                    Some(Err(e)) => {
                        *at_end = true;
                        *read_error = Some(reason(&e));
                        return None;
                    }
                    Some(Ok(raw)) => match checked(raw, ts_resolution) {
                        Err(problem) => {
                            *at_end = true;
                            *read_error =
                                Some(format!("the record at byte {at} {problem}: the capture is corrupt there"));
                            return None;
                        }
                        Ok(pkt) if pkt.data.len() < pkt.orig_len as usize => *truncated += 1,
                        // The frame without its FCS, if the capture holds one.
                        Ok(pkt) => match pkt.data.len().checked_sub(fcs_len).and_then(|n| pkt.data.get(..n)) {
                            None => {
                                *at_end = true;
                                *read_error = Some(format!(
                                    "the record at byte {at} holds {} bytes, fewer than the {fcs_len}-byte FCS the \
                                     file header says each frame ends with: the capture is corrupt there",
                                    pkt.data.len()
                                ));
                                return None;
                            }
                            Some(frame) if frame.len() > room => *oversize += 1,
                            Some(frame) => {
                                *last_ts = pkt.timestamp;
                                if let Some(stamp) = stamps.get_mut(buffer) {
                                    *stamp = pkt.timestamp;
                                }
                                buf.get_mut(..frame.len())?.copy_from_slice(frame);
                                return Some(frame.len());
                            }
                        },
                    },
                }
            }
        });
        let clock = Instant::from_nanos(u64::try_from(self.last_ts.as_nanos()).unwrap_or(u64::MAX));
        Ok(Received { count, clock: Some(clock) })
    }

    fn settle(&mut self, spans: &[Option<Span>]) -> Result<usize, DeviceError> {
        Ok(self.pool.settle(spans))
    }

    fn flush(&mut self) -> Result<FlushProgress, DeviceError> {
        let writer = &mut self.writer;
        let stamps = &self.stamps;
        let last_ts = self.last_ts;
        let path = &self.out_path;
        self.pool.flush(usize::MAX, |buffer, bytes| {
            let ts = stamps.get(buffer).copied().unwrap_or(last_ts);
            let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
            writer.write_packet(&PcapPacket::new(ts, len, bytes)).map(|_| ()).map_err(|e| DeviceError::Pcap {
                op: "write",
                path: path.clone(),
                message: reason(&e),
            })
        })
    }

    fn pending_tx(&self) -> usize {
        self.pool.pending()
    }

    fn discard_pending(&mut self) -> usize {
        self.pool.discard()
    }

    fn at_end(&self) -> bool {
        self.at_end && self.read_error.is_none()
    }
}
