//! The offline buffer: a bounded queue of records not yet acknowledged, optionally journaled
//! to a file so that a restart of the device loses nothing either.
//!
//! A record stays in the buffer from [`Device::send`](crate::Device::send) until the server
//! acknowledged the message carrying it (HTTP 202, MQTT PUBACK). The transport *takes* a batch
//! from the front (the records are then "in flight"), and either *settles* it (acknowledged,
//! or refused for good) or *requeues* it at the front in the same order (the connection
//! dropped, the server was busy). Every record keeps the `ts` it got when it was sent, so a
//! batch sent twice — acknowledged the first time but the acknowledgement lost — stores each
//! point once: the server keeps the first point per (device, series, ts).
//!
//! ## The journal
//! One line per change, appended (not fsynced: it survives a crash of the process, not
//! necessarily of the machine): `+SEQ JSON` adds a record, `-FIRST LAST` removes the live
//! records with sequence numbers in FIRST..=LAST (a batch is always a run of consecutive live
//! records, because batches are taken from the front and requeued at the front). Opening
//! replays the file, ignores a torn last line, and rewrites it with the live records only;
//! later the file is truncated whenever the buffer empties and rewritten when dead lines
//! outnumber live ones by far.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Record};

/// What [`Device::send`](crate::Device::send) does when the buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Drop the oldest record that is not in flight (counted in `records_dropped`): a sensor
    /// that was offline too long keeps its most recent history.
    #[default]
    DropOldest,
    /// Refuse the new record with [`Error::BufferFull`].
    Reject,
}

/// A buffered record.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub seq: u64,
    pub json: Box<str>,
    /// How often the server refused a message holding this record as invalid.
    pub refusals: u8,
}

/// The queue (see the module docs).
pub(crate) struct Buffer {
    queue: VecDeque<Entry>,
    in_flight: usize,
    capacity: usize,
    overflow: Overflow,
    next_seq: u64,
    last_ts: i64,
    journal: Option<Journal>,
}

struct Journal {
    path: PathBuf,
    file: File,
    lines: usize,
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::BufferFile {
        path: path.to_path_buf(),
        source,
    }
}

impl Buffer {
    /// An empty buffer, or the live records of `file` when it exists.
    pub fn open(capacity: usize, overflow: Overflow, file: Option<&Path>) -> Result<Buffer, Error> {
        let mut buffer = Buffer {
            queue: VecDeque::new(),
            in_flight: 0,
            capacity: capacity.max(1),
            overflow,
            next_seq: 1,
            last_ts: 0,
            journal: None,
        };
        let Some(path) = file else {
            return Ok(buffer);
        };
        let mut live: BTreeMap<u64, Box<str>> = BTreeMap::new();
        match File::open(path) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    let line = line.map_err(file_error(path))?;
                    replay(&mut live, &line);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_error(path)(e)),
        }
        // Over capacity (the capacity shrank): keep the newest.
        while live.len() > buffer.capacity {
            live.pop_first();
        }
        buffer.next_seq = live.last_key_value().map_or(1, |(s, _)| s + 1);
        for (seq, json) in live {
            buffer.last_ts = buffer.last_ts.max(ts_of(&json));
            buffer.queue.push_back(Entry {
                seq,
                json,
                refusals: 0,
            });
        }
        buffer.journal = Some(Journal::rewrite(path, &buffer.queue)?);
        Ok(buffer)
    }

    /// Records waiting or in flight.
    pub fn len(&self) -> usize {
        self.queue.len() + self.in_flight
    }

    /// Records waiting (not in flight).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Adds a record, stamping it with `now_ms` when it has no time (strictly after the
    /// previous stamped record, so that two records never share a `ts`). Returns how many old
    /// records were dropped to make room.
    pub fn push(&mut self, record: &Record, now_ms: i64) -> Result<usize, Error> {
        record.validate()?;
        let mut dropped = 0;
        if self.len() >= self.capacity {
            match (self.overflow, self.queue.pop_front()) {
                (Overflow::DropOldest, Some(old)) => {
                    self.journal_remove(old.seq, old.seq)?;
                    dropped = 1;
                }
                (Overflow::DropOldest, None) | (Overflow::Reject, _) => {
                    return Err(Error::BufferFull {
                        capacity: self.capacity,
                    })
                }
            }
        }
        let ts = match record.ts() {
            Some(ts) => ts,
            None => {
                let ts = now_ms.max(self.last_ts + 1);
                self.last_ts = ts;
                ts
            }
        };
        let entry = Entry {
            seq: self.next_seq,
            json: record.to_json(ts).into_boxed_str(),
            refusals: 0,
        };
        self.next_seq += 1;
        if let Some(j) = &mut self.journal {
            let line = format!("+{} {}\n", entry.seq, entry.json);
            j.append(&line)?;
        }
        self.queue.push_back(entry);
        Ok(dropped)
    }

    /// Takes up to `max_records` records (and about `max_bytes` of JSON, at least one record)
    /// from the front; they are in flight until settled or requeued.
    pub fn take(&mut self, max_records: usize, max_bytes: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut bytes = 0;
        while out.len() < max_records.max(1) {
            let Some(next) = self.queue.front() else {
                break;
            };
            if !out.is_empty() && bytes + next.json.len() + 1 > max_bytes {
                break;
            }
            bytes += next.json.len() + 1;
            if let Some(e) = self.queue.pop_front() {
                out.push(e);
            }
        }
        self.in_flight += out.len();
        out
    }

    /// Forgets records taken earlier: acknowledged, or refused for good.
    pub fn settle(&mut self, entries: &[Entry]) -> Result<(), Error> {
        self.in_flight = self.in_flight.saturating_sub(entries.len());
        if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
            self.journal_remove(first.seq, last.seq)?;
        }
        Ok(())
    }

    /// Puts records taken earlier back at the front, in sequence order.
    pub fn requeue(&mut self, mut entries: Vec<Entry>) {
        self.in_flight = self.in_flight.saturating_sub(entries.len());
        entries.sort_by_key(|e| e.seq);
        for e in entries.into_iter().rev() {
            self.queue.push_front(e);
        }
    }

    fn journal_remove(&mut self, first: u64, last: u64) -> Result<(), Error> {
        let live = self.len();
        let Some(j) = &mut self.journal else {
            return Ok(());
        };
        if live == 0 {
            return j.truncate();
        }
        j.append(&format!("-{first} {last}\n"))?;
        if j.lines > 4 * live + 4096 {
            let path = j.path.clone();
            let mut all: Vec<&Entry> = self.queue.iter().collect();
            all.sort_by_key(|e| e.seq);
            // In-flight records are not in the queue: keep the file as is until they settle.
            if self.in_flight == 0 {
                self.journal = Some(Journal::rewrite(&path, all)?);
            }
        }
        Ok(())
    }
}

/// Applies one journal line; a malformed one (a torn write) is skipped.
fn replay(live: &mut BTreeMap<u64, Box<str>>, line: &str) {
    if let Some(rest) = line.strip_prefix('+') {
        if let Some((seq, json)) = rest.split_once(' ') {
            if let Ok(seq) = seq.parse::<u64>() {
                if serde_json::from_str::<serde_json::Value>(json).is_ok_and(|v| v.is_object()) {
                    live.insert(seq, json.into());
                }
            }
        }
    } else if let Some(rest) = line.strip_prefix('-') {
        if let Some((a, b)) = rest.split_once(' ') {
            if let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) {
                if a <= b {
                    let doomed: Vec<u64> = live.range(a..=b).map(|(s, _)| *s).collect();
                    for s in doomed {
                        live.remove(&s);
                    }
                }
            }
        }
    }
}

/// The `ts` of a record's JSON (0 when absent).
fn ts_of(json: &str) -> i64 {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.get("ts").and_then(serde_json::Value::as_i64))
        .unwrap_or(0)
}

impl Journal {
    /// Writes the live records to a new file and renames it over `path`.
    fn rewrite<'a>(
        path: &Path,
        entries: impl IntoIterator<Item = &'a Entry>,
    ) -> Result<Journal, Error> {
        let err = file_error(path);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(file_error(path))?;
        }
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let mut text = String::new();
        let mut lines = 0;
        for e in entries {
            text.push_str(&format!("+{} {}\n", e.seq, e.json));
            lines += 1;
        }
        let write = || -> std::io::Result<File> {
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            OpenOptions::new().append(true).open(path)
        };
        let file = write().map_err(err)?;
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            lines,
        })
    }

    fn append(&mut self, line: &str) -> Result<(), Error> {
        self.file
            .write_all(line.as_bytes())
            .map_err(file_error(&self.path))?;
        self.lines += 1;
        Ok(())
    }

    fn truncate(&mut self) -> Result<(), Error> {
        if self.lines > 0 {
            self.file.set_len(0).map_err(file_error(&self.path))?;
            self.lines = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(v: i64) -> Record {
        Record::new().with("v", v)
    }

    fn values(entries: &[Entry]) -> Vec<i64> {
        entries
            .iter()
            .map(|e| {
                serde_json::from_str::<serde_json::Value>(&e.json).unwrap()["v"]
                    .as_i64()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn timestamps_are_unique_and_kept_across_requeues() {
        let mut b = Buffer::open(10, Overflow::DropOldest, None).unwrap();
        for v in 0..3 {
            b.push(&rec(v), 1000).unwrap();
        }
        let batch = b.take(2, usize::MAX);
        let ts: Vec<i64> = batch.iter().map(|e| ts_of(&e.json)).collect();
        assert_eq!(ts, vec![1000, 1001]);
        b.requeue(batch);
        let again = b.take(10, usize::MAX);
        assert_eq!(values(&again), vec![0, 1, 2]);
        assert_eq!(ts_of(&again[2].json), 1002);
        b.settle(&again).unwrap();
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn overflow_drops_the_oldest_queued_or_rejects() {
        let mut b = Buffer::open(2, Overflow::DropOldest, None).unwrap();
        assert_eq!(b.push(&rec(1), 1).unwrap(), 0);
        assert_eq!(b.push(&rec(2), 1).unwrap(), 0);
        assert_eq!(b.push(&rec(3), 1).unwrap(), 1);
        assert_eq!(values(&b.take(10, usize::MAX)), vec![2, 3]);
        // Everything in flight: nothing may be dropped.
        assert!(matches!(
            b.push(&rec(4), 1),
            Err(Error::BufferFull { capacity: 2 })
        ));

        let mut r = Buffer::open(1, Overflow::Reject, None).unwrap();
        r.push(&rec(1), 1).unwrap();
        assert!(matches!(r.push(&rec(2), 1), Err(Error::BufferFull { .. })));
    }

    #[test]
    fn batches_respect_the_byte_budget_but_take_at_least_one() {
        let mut b = Buffer::open(10, Overflow::DropOldest, None).unwrap();
        for v in 0..5 {
            b.push(&rec(v), 1).unwrap();
        }
        assert_eq!(b.take(10, 1).len(), 1);
        let one = b.queue.front().unwrap().json.len() + 1;
        assert_eq!(b.take(10, 2 * one).len(), 2);
    }

    #[test]
    fn the_journal_survives_a_restart_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buf.jsonl");
        {
            let mut b = Buffer::open(100, Overflow::DropOldest, Some(&path)).unwrap();
            for v in 0..6 {
                b.push(&rec(v), 5).unwrap();
            }
            let batch = b.take(2, usize::MAX);
            b.settle(&batch).unwrap();
            let in_flight = b.take(2, usize::MAX);
            assert_eq!(values(&in_flight), vec![2, 3]);
            // dropped without settling: a crash mid-send; they must come back
        }
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"+99 {\"v\":").unwrap();
        drop(f);
        let mut b = Buffer::open(100, Overflow::DropOldest, Some(&path)).unwrap();
        assert_eq!(b.len(), 4);
        let all = b.take(100, usize::MAX);
        assert_eq!(values(&all), vec![2, 3, 4, 5]);
        // New records get later sequence numbers and later stamps.
        b.push(&rec(6), 0).unwrap();
        let last = b.take(1, usize::MAX);
        assert!(last[0].seq > all[3].seq);
        assert!(ts_of(&last[0].json) > ts_of(&all[3].json));
        b.settle(&all).unwrap();
        b.settle(&last).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        let b = Buffer::open(100, Overflow::DropOldest, Some(&path)).unwrap();
        assert_eq!(b.len(), 0);
    }
}
