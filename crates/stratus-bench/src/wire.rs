//! Bytes on the wire: payload stamps, pre-encoded packets patched in place, and a frame scanner.
//!
//! Everything is encoded once by `stratus_mqtt`'s codec; the hot paths only copy templates
//! and patch a few bytes (sequence number, send time, packet identifier). The receive side
//! splits frames by their fixed header and looks at a PUBLISH's topic length, packet
//! identifier and payload stamp only.

use std::fmt;

use bytes::{Bytes, BytesMut};
use stratus_mqtt::{encode, MqttStr, Packet, PacketId, ProtocolVersion, Publish, QoS};

/// Payload size of every benchmark message.
pub const PAYLOAD_LEN: usize = 64;

/// Bytes of the [`Stamp`] at the start of each payload.
pub const STAMP_LEN: usize = 20;

const SEQ_AT: usize = 8;
const SENT_AT: usize = 12;

/// What each payload starts with: which run and publisher sent it, its sequence number in
/// that publisher's stream, and when (ns on the generator's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Run tag: messages of other runs (or other programs) are counted as strays.
    pub run: u32,
    /// Publisher (stream) number.
    pub stream: u32,
    /// Sequence number within the stream.
    pub seq: u32,
    /// Send time in ns since the run's clock origin (0 when not measured).
    pub sent_ns: u64,
}

impl Stamp {
    /// Writes the stamp to the first [`STAMP_LEN`] bytes of `out`.
    pub fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.run.to_be_bytes());
        out[4..8].copy_from_slice(&self.stream.to_be_bytes());
        out[SEQ_AT..SEQ_AT + 4].copy_from_slice(&self.seq.to_be_bytes());
        out[SENT_AT..SENT_AT + 8].copy_from_slice(&self.sent_ns.to_be_bytes());
    }

    /// Reads a stamp, `None` when the payload is too short to hold one.
    pub fn read(payload: &[u8]) -> Option<Stamp> {
        let b = payload.get(..STAMP_LEN)?;
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Some(Stamp {
            run: u32_at(0),
            stream: u32_at(4),
            seq: u32_at(SEQ_AT),
            sent_ns: u64::from_be_bytes(b[SENT_AT..SENT_AT + 8].try_into().ok()?),
        })
    }

    /// A [`PAYLOAD_LEN`]-byte payload that starts with this stamp.
    pub fn payload(&self) -> [u8; PAYLOAD_LEN] {
        let mut p = [0u8; PAYLOAD_LEN];
        self.write(&mut p);
        p
    }
}

/// A PUBLISH encoded once; copies get their packet id, sequence number and send time patched.
#[derive(Debug, Clone)]
pub struct Template {
    bytes: Vec<u8>,
    id_at: Option<usize>,
    payload_at: usize,
}

impl Template {
    /// Encodes a PUBLISH of `topic` whose payload is `stamp`'s [`PAYLOAD_LEN`]-byte payload.
    pub fn publish(topic: &str, qos: QoS, retain: bool, stamp: Stamp) -> anyhow::Result<Template> {
        Template::publish_payload(topic, qos, retain, &stamp.payload())
    }

    /// Encodes a PUBLISH with an arbitrary payload (at least [`STAMP_LEN`] bytes long when
    /// the seq/time patches are used).
    pub fn publish_payload(
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: &[u8],
    ) -> anyhow::Result<Template> {
        let mut out = BytesMut::new();
        let packet_id = (qos != QoS::AtMostOnce).then_some(1);
        encode(
            &Packet::Publish(Publish {
                dup: false,
                qos,
                retain,
                topic: MqttStr::try_from(topic)?,
                packet_id,
                payload: Bytes::copy_from_slice(payload),
                properties: Default::default(),
            }),
            ProtocolVersion::V311,
            &mut out,
        )?;
        let payload_at = out.len() - payload.len();
        Ok(Template {
            bytes: out.to_vec(),
            id_at: packet_id.map(|_| payload_at - 2),
            payload_at,
        })
    }

    /// Encoded length of one packet.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true: a PUBLISH has at least a fixed header.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Appends one copy with its packet id (ignored at QoS 0), sequence number and send time.
    pub fn append(&self, out: &mut Vec<u8>, id: PacketId, seq: u32, sent_ns: u64) {
        let start = out.len();
        out.extend_from_slice(&self.bytes);
        self.patch(&mut out[start..], id, seq, sent_ns);
    }

    /// Appends one copy with only its packet id patched (templates of any payload).
    pub fn append_with_id(&self, out: &mut Vec<u8>, id: PacketId) {
        let start = out.len();
        out.extend_from_slice(&self.bytes);
        if let Some(at) = self.id_at {
            out[start + at..start + at + 2].copy_from_slice(&id.to_be_bytes());
        }
    }

    /// Patches one packet-sized slice that holds a copy of this template.
    pub fn patch(&self, packet: &mut [u8], id: PacketId, seq: u32, sent_ns: u64) {
        if let Some(at) = self.id_at {
            packet[at..at + 2].copy_from_slice(&id.to_be_bytes());
        }
        let p = self.payload_at;
        packet[p + SEQ_AT..p + SEQ_AT + 4].copy_from_slice(&seq.to_be_bytes());
        packet[p + SENT_AT..p + SENT_AT + 8].copy_from_slice(&sent_ns.to_be_bytes());
    }

    /// Patches only the sequence number (the QoS 0 burst path).
    fn patch_seq(&self, packet: &mut [u8], seq: u32) {
        let at = self.payload_at + SEQ_AT;
        packet[at..at + 4].copy_from_slice(&seq.to_be_bytes());
    }
}

/// Many copies of a QoS 0 [`Template`] back to back, written with one syscall per batch.
#[derive(Debug)]
pub struct Batch {
    template: Template,
    buf: Vec<u8>,
    per_batch: usize,
}

impl Batch {
    /// A batch of as many copies as fit in `bytes` (at least one).
    pub fn new(template: Template, bytes: usize) -> Batch {
        let per_batch = (bytes / template.len()).max(1);
        let buf = template.bytes.repeat(per_batch);
        Batch {
            template,
            buf,
            per_batch,
        }
    }

    /// Packets per full batch.
    pub fn per_batch(&self) -> usize {
        self.per_batch
    }

    /// Numbers `count` (≤ [`per_batch`](Self::per_batch)) packets from `first_seq` on and
    /// returns their bytes.
    pub fn fill(&mut self, first_seq: u32, count: usize) -> &[u8] {
        let len = self.template.len();
        let count = count.min(self.per_batch);
        for (i, packet) in self.buf[..count * len].chunks_exact_mut(len).enumerate() {
            self.template.patch_seq(packet, first_seq + i as u32);
        }
        &self.buf[..count * len]
    }
}

/// Packet type numbers (fixed header bits 7–4).
pub mod kind {
    /// CONNACK.
    pub const CONNACK: u8 = 2;
    /// PUBLISH.
    pub const PUBLISH: u8 = 3;
    /// PUBACK.
    pub const PUBACK: u8 = 4;
    /// PUBREC.
    pub const PUBREC: u8 = 5;
    /// PUBREL.
    pub const PUBREL: u8 = 6;
    /// PUBCOMP.
    pub const PUBCOMP: u8 = 7;
    /// SUBACK.
    pub const SUBACK: u8 = 9;
    /// PINGRESP.
    pub const PINGRESP: u8 = 13;
}

/// Appends an acknowledgement (`PUBACK`, `PUBREC`, `PUBREL` or `PUBCOMP`) for `id`.
pub fn append_ack(out: &mut Vec<u8>, ack: Ack, id: PacketId) {
    let [hi, lo] = id.to_be_bytes();
    out.extend_from_slice(&[ack.first_byte(), 2, hi, lo]);
}

/// The four two-byte-identifier acknowledgements of the QoS 1/2 flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// QoS 1 acknowledgement.
    PubAck,
    /// QoS 2, step 1.
    PubRec,
    /// QoS 2, step 2.
    PubRel,
    /// QoS 2, step 3.
    PubComp,
}

impl Ack {
    /// The fixed header's first byte, as the codec encodes it (checked by a test).
    pub fn first_byte(self) -> u8 {
        match self {
            Ack::PubAck => 0x40,
            Ack::PubRec => 0x50,
            Ack::PubRel => 0x62,
            Ack::PubComp => 0x70,
        }
    }
}

/// A frame the scanner could not split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed packet from the broker: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

/// One whole packet at the front of a buffer.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// First byte of the fixed header (type and flags).
    pub first: u8,
    /// The packet after its fixed header.
    pub body: &'a [u8],
    /// The whole packet.
    pub raw: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Packet type (see [`kind`]).
    pub fn kind(&self) -> u8 {
        self.first >> 4
    }

    /// The packet identifier of a PUBACK/PUBREC/PUBREL/PUBCOMP.
    pub fn ack_id(&self) -> Result<PacketId, Malformed> {
        match self.body {
            [hi, lo] => Ok(u16::from_be_bytes([*hi, *lo])),
            _ => Err(Malformed("acknowledgement of the wrong length")),
        }
    }

    /// The QoS, packet identifier and payload of a PUBLISH.
    pub fn publish(&self) -> Result<PublishView<'a>, Malformed> {
        let qos = (self.first >> 1) & 0x03;
        let b = self.body;
        if b.len() < 2 {
            return Err(Malformed("PUBLISH without a topic"));
        }
        let topic_len = u16::from_be_bytes([b[0], b[1]]) as usize;
        let mut at = 2 + topic_len;
        let packet_id = if qos > 0 {
            let id = b
                .get(at..at + 2)
                .ok_or(Malformed("PUBLISH without a packet identifier"))?;
            at += 2;
            u16::from_be_bytes([id[0], id[1]])
        } else {
            0
        };
        let payload = b.get(at..).ok_or(Malformed("PUBLISH topic overruns"))?;
        Ok(PublishView {
            qos,
            packet_id,
            topic: &b[2..2 + topic_len],
            payload,
        })
    }
}

/// The fields of a PUBLISH the generator looks at.
#[derive(Debug, Clone, Copy)]
pub struct PublishView<'a> {
    /// QoS (0–3 as on the wire).
    pub qos: u8,
    /// Packet identifier (0 at QoS 0).
    pub packet_id: PacketId,
    /// Topic name bytes.
    pub topic: &'a [u8],
    /// Application payload.
    pub payload: &'a [u8],
}

/// Splits the next whole packet off the front of `buf`: `None` when it is not all there yet.
pub fn next_frame(buf: &[u8]) -> Result<Option<Frame<'_>>, Malformed> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= ((byte & 0x7F) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            let header = 2 + i;
            let total = header + remaining;
            if buf.len() < total {
                return Ok(None);
            }
            return Ok(Some(Frame {
                first: buf[0],
                body: &buf[header..total],
                raw: &buf[..total],
            }));
        }
    }
    Err(Malformed("remaining length longer than four bytes"))
}

/// Length of the whole packet at the front of `buf` once its fixed header is there (so a
/// reader can grow its buffer for a packet larger than it).
pub fn announced_len(buf: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let byte = *buf.get(1 + i)?;
        remaining |= ((byte & 0x7F) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(2 + i + remaining);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratus_mqtt::{decode, PubAck};

    fn stamp(seq: u32) -> Stamp {
        Stamp {
            run: 0xDEAD_BEEF,
            stream: 7,
            seq,
            sent_ns: 123_456_789,
        }
    }

    #[test]
    fn stamp_round_trips() {
        let s = stamp(42);
        assert_eq!(Stamp::read(&s.payload()), Some(s));
        assert_eq!(Stamp::read(&[0u8; STAMP_LEN - 1]), None);
    }

    #[test]
    fn patched_templates_decode_with_the_codec() {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let t = Template::publish("t/15", qos, qos == QoS::AtLeastOnce, stamp(0)).unwrap();
            let mut out = Vec::new();
            t.append(&mut out, 513, 99, 1_000);
            t.append(&mut out, 7, 100, 2_000);
            let mut buf = BytesMut::from(&out[..]);
            for (id, seq, sent) in [(513, 99, 1_000), (7, 100, 2_000)] {
                let Some(Packet::Publish(p)) =
                    decode(&mut buf, usize::MAX, ProtocolVersion::V311).unwrap()
                else {
                    panic!("not a publish");
                };
                assert_eq!(p.qos, qos);
                assert_eq!(&*p.topic, "t/15");
                assert_eq!(p.payload.len(), PAYLOAD_LEN);
                let expect_id = (qos != QoS::AtMostOnce).then_some(id);
                assert_eq!(p.packet_id, expect_id);
                let s = Stamp::read(&p.payload).unwrap();
                assert_eq!(
                    (s.run, s.stream, s.seq, s.sent_ns),
                    (0xDEAD_BEEF, 7, seq, sent)
                );
            }
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn batches_number_their_packets() {
        let t = Template::publish("t/1", QoS::AtMostOnce, false, stamp(0)).unwrap();
        let mut batch = Batch::new(t.clone(), 1000);
        assert_eq!(batch.per_batch(), 1000 / t.len());
        let bytes = batch.fill(500, 3).to_vec();
        assert_eq!(bytes.len(), 3 * t.len());
        let mut at = 0;
        let mut seqs = Vec::new();
        while let Some(f) = next_frame(&bytes[at..]).unwrap() {
            at += f.raw.len();
            seqs.push(Stamp::read(f.publish().unwrap().payload).unwrap().seq);
        }
        assert_eq!(seqs, [500, 501, 502]);
    }

    #[test]
    fn acks_match_the_codec() {
        for (ack, packet) in [
            (Ack::PubAck, Packet::PubAck(PubAck::new(0x1234))),
            (Ack::PubRec, Packet::PubRec(PubAck::new(0x1234))),
            (Ack::PubRel, Packet::PubRel(PubAck::new(0x1234))),
            (Ack::PubComp, Packet::PubComp(PubAck::new(0x1234))),
        ] {
            let mut want = BytesMut::new();
            encode(&packet, ProtocolVersion::V311, &mut want).unwrap();
            let mut got = Vec::new();
            append_ack(&mut got, ack, 0x1234);
            assert_eq!(got, want.to_vec(), "{ack:?}");
        }
    }

    #[test]
    fn scanner_waits_for_whole_frames_at_every_split() {
        let t = Template::publish("sensors/a", QoS::ExactlyOnce, false, stamp(0)).unwrap();
        let mut big = BytesMut::new();
        encode(
            &Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: MqttStr::try_from("big").unwrap(),
                packet_id: Some(9),
                payload: Bytes::from(vec![1u8; 20_000]),
                properties: Default::default(),
            }),
            ProtocolVersion::V311,
            &mut big,
        )
        .unwrap();
        let mut stream = Vec::new();
        t.append(&mut stream, 3, 1, 0);
        stream.extend_from_slice(&big);
        append_ack(&mut stream, Ack::PubRel, 3);
        let total = stream.len();
        for cut in 0..total {
            let head = &stream[..cut];
            let mut at = 0;
            let mut kinds = Vec::new();
            while let Some(f) = next_frame(&head[at..]).unwrap() {
                at += f.raw.len();
                kinds.push(f.kind());
            }
            assert!(at <= cut);
            assert!(kinds.len() <= 3);
            if let Some(len) = announced_len(&head[at..]) {
                assert!(at + len > cut, "a whole frame was left unsplit");
            }
        }
        let mut at = 0;
        let mut seen = Vec::new();
        while let Some(f) = next_frame(&stream[at..]).unwrap() {
            at += f.raw.len();
            match f.kind() {
                kind::PUBLISH => {
                    let p = f.publish().unwrap();
                    seen.push((p.qos, p.packet_id, p.payload.len()));
                }
                kind::PUBREL => assert_eq!(f.ack_id().unwrap(), 3),
                k => panic!("unexpected kind {k}"),
            }
        }
        assert_eq!(at, total);
        assert_eq!(seen, [(2, 3, PAYLOAD_LEN), (1, 9, 20_000)]);
    }

    #[test]
    fn scanner_rejects_five_byte_lengths() {
        assert!(next_frame(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]).is_err());
        assert!(next_frame(&[0x30, 0xFF]).unwrap().is_none());
    }
}
