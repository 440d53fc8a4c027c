//! The connections channel's messages: how a generation hands its idle
//! connections to the next one over the `SOCK_SEQPACKET` socket passed as
//! `HANDOVER_CONNECTIONS_FD`, and how the next one answers.
//!
//! The previous generation sends batches: each message carries up to
//! [`MAX_PER_BATCH`] connections as fds, and for each the name of the
//! listener it was accepted on, the bytes read from it and not parsed yet,
//! and what its handshake learned. The next generation answers each batch,
//! once it owns the fds and before it serves any of them, with which it
//! took. Until then the previous generation keeps its copy of every fd: a
//! connection not taken, or in a batch never answered (the next generation
//! died), is still whole there, and drained as any other.
//!
//! ```text
//! batch:  "HOC1" id:u64 count:u32 { name_len:u16 name unread_len:u32 unread learned_len:u32 learned }*count
//! answer: "HOA1" id:u64 count:u32 { taken:u8 }*count
//! ```
//!
//! Integers are big-endian. Both sides check every length against what
//! arrived; a message that does not parse is a protocol error, which ends
//! the channel.

use crate::sys::fdpass::MAX_FDS_PER_MESSAGE;

const BATCH: &[u8; 4] = b"HOC1";
const ANSWER: &[u8; 4] = b"HOA1";
/// Magic, id and count.
const HEADER: usize = 4 + 8 + 4;

/// The longest message either side sends or reads.
pub(crate) const MAX_MESSAGE: usize = 64 * 1024;
/// The most connections in one batch: as many fds as one message carries.
pub(crate) const MAX_PER_BATCH: usize = MAX_FDS_PER_MESSAGE;

/// One connection of a batch, as it arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The listener it was accepted on.
    pub(crate) name: String,
    /// Read from it and not parsed yet.
    pub(crate) unread: Vec<u8>,
    /// What its handshake learned.
    pub(crate) learned: Vec<u8>,
}

/// How many bytes of a batch one connection takes.
fn entry_size(name: &str, unread: &[u8], learned: &[u8]) -> usize {
    2 + name.len() + 4 + unread.len() + 4 + learned.len()
}

/// A batch's message, and how full it is.
#[derive(Debug)]
pub(crate) struct Batch {
    bytes: Vec<u8>,
    count: u32,
}

impl Batch {
    /// An empty batch with the id `id`.
    pub(crate) fn new(id: u64) -> Self {
        let mut bytes = Vec::with_capacity(1024);
        bytes.extend_from_slice(BATCH);
        bytes.extend_from_slice(&id.to_be_bytes());
        bytes.extend_from_slice(&0u32.to_be_bytes());
        Self { bytes, count: 0 }
    }

    /// Whether one more connection fits.
    pub(crate) fn has_room(&self, name: &str, unread: &[u8], learned: &[u8]) -> bool {
        (self.count as usize) < MAX_PER_BATCH
            && name.len() <= usize::from(u16::MAX)
            && self.bytes.len() + entry_size(name, unread, learned) <= MAX_MESSAGE
    }

    /// Adds a connection (see [`has_room`](Self::has_room)); its fd goes
    /// with the message, in the same order.
    pub(crate) fn push(&mut self, name: &str, unread: &[u8], learned: &[u8]) {
        debug_assert!(self.has_room(name, unread, learned));
        self.bytes
            .extend_from_slice(&(name.len() as u16).to_be_bytes());
        self.bytes.extend_from_slice(name.as_bytes());
        for part in [unread, learned] {
            self.bytes
                .extend_from_slice(&(part.len() as u32).to_be_bytes());
            self.bytes.extend_from_slice(part);
        }
        self.count += 1;
        self.bytes[12..16].copy_from_slice(&self.count.to_be_bytes());
    }

    /// The message.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Reads what `message` says: a batch of `fds` connections.
pub(crate) fn parse_batch(message: &[u8], fds: usize) -> Result<(u64, Vec<Entry>), String> {
    let (id, count, mut rest) = header(message, BATCH)?;
    if count != fds {
        return Err(format!(
            "a batch of {count} connections came with {fds} fds"
        ));
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let name = take(&mut rest, 2)?;
        let name = std::str::from_utf8(name).map_err(|_| "a listener name that is not UTF-8")?;
        if !super::env::is_valid_name(name) {
            return Err(format!("{name:?} is not a listener name"));
        }
        let unread = take(&mut rest, 4)?.to_vec();
        let learned = take(&mut rest, 4)?.to_vec();
        entries.push(Entry {
            name: name.to_owned(),
            unread,
            learned,
        });
    }
    if !rest.is_empty() {
        return Err("bytes after the last connection".into());
    }
    Ok((id, entries))
}

/// The answer to batch `id`: which of its connections were taken.
pub(crate) fn answer(id: u64, taken: &[bool]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER + taken.len());
    bytes.extend_from_slice(ANSWER);
    bytes.extend_from_slice(&id.to_be_bytes());
    bytes.extend_from_slice(&(taken.len() as u32).to_be_bytes());
    bytes.extend(taken.iter().map(|&taken| u8::from(taken)));
    bytes
}

/// Reads an answer: the batch's id, and which of its connections were
/// taken.
pub(crate) fn parse_answer(message: &[u8]) -> Result<(u64, Vec<bool>), String> {
    let (id, count, rest) = header(message, ANSWER)?;
    if rest.len() != count {
        return Err(format!(
            "an answer for {count} connections with {} bytes",
            rest.len()
        ));
    }
    rest.iter()
        .map(|&byte| match byte {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("{other} is neither taken (1) nor not (0)")),
        })
        .collect::<Result<_, _>>()
        .map(|taken| (id, taken))
}

/// The magic, id and count of a message; and what follows.
fn header<'a>(message: &'a [u8], magic: &[u8; 4]) -> Result<(u64, usize, &'a [u8]), String> {
    if message.len() > MAX_MESSAGE {
        return Err(format!("a message of {} bytes", message.len()));
    }
    let rest = message
        .strip_prefix(magic)
        .ok_or("not a message of this channel (another version of handover?)")?;
    if rest.len() < HEADER - 4 {
        return Err("a message cut short".into());
    }
    let id = u64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
    let count = u32::from_be_bytes(rest[8..12].try_into().expect("4 bytes")) as usize;
    if count > MAX_PER_BATCH {
        return Err(format!("{count} connections in one message"));
    }
    Ok((id, count, &rest[12..]))
}

/// The `width`-byte big-endian length at the start of `rest` and that many
/// bytes after it; `rest` moves past them.
fn take<'a>(rest: &mut &'a [u8], width: usize) -> Result<&'a [u8], String> {
    let cut = || "a message cut short".to_owned();
    let (length, after) = rest.split_at_checked(width).ok_or_else(cut)?;
    let length = length
        .iter()
        .fold(0usize, |n, &byte| (n << 8) | usize::from(byte));
    let (part, after) = after.split_at_checked(length).ok_or_else(cut)?;
    *rest = after;
    Ok(part)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_reads_back_as_it_was_written() {
        let mut batch = Batch::new(7);
        batch.push("http", b"GET / HT", b"");
        batch.push("admin", b"", b"\x01proxy");
        let (id, entries) = parse_batch(batch.bytes(), 2).unwrap();
        assert_eq!(id, 7);
        assert_eq!(
            entries,
            vec![
                Entry {
                    name: "http".into(),
                    unread: b"GET / HT".to_vec(),
                    learned: Vec::new(),
                },
                Entry {
                    name: "admin".into(),
                    unread: Vec::new(),
                    learned: b"\x01proxy".to_vec(),
                },
            ]
        );
        // The count must match the fds that came with it.
        assert!(parse_batch(batch.bytes(), 1).is_err());
        assert!(parse_batch(batch.bytes(), 3).is_err());
    }

    #[test]
    fn an_answer_reads_back_and_a_bad_one_is_refused() {
        let message = answer(9, &[true, false, true]);
        assert_eq!(
            parse_answer(&message).unwrap(),
            (9, vec![true, false, true])
        );
        assert!(parse_answer(&message[..message.len() - 1]).is_err());
        let mut two = message.clone();
        two[HEADER] = 2;
        assert!(parse_answer(&two).is_err());
        // A batch is not an answer, nor an answer a batch.
        assert!(parse_answer(Batch::new(1).bytes()).is_err());
        assert!(parse_batch(&message, 3).is_err());
    }

    #[test]
    fn a_batch_is_full_at_the_fd_limit_or_the_size_limit() {
        let mut batch = Batch::new(1);
        for _ in 0..MAX_PER_BATCH {
            assert!(batch.has_room("http", b"", b""));
            batch.push("http", b"", b"");
        }
        assert!(!batch.has_room("http", b"", b""));
        assert_eq!(
            parse_batch(batch.bytes(), MAX_PER_BATCH).unwrap().1.len(),
            MAX_PER_BATCH
        );

        let big = vec![b'x'; MAX_MESSAGE / 2];
        let mut batch = Batch::new(2);
        assert!(batch.has_room("http", &big, b""));
        batch.push("http", &big, b"");
        assert!(!batch.has_room("http", &big, b""));
        assert!(batch.has_room("http", b"", b""));
        // Alone in a batch of its own, or not at all.
        assert!(Batch::new(3).has_room("http", &big, b""));
        assert!(!Batch::new(3).has_room("http", &vec![0; MAX_MESSAGE], b""));
    }

    proptest::proptest! {
        /// Whatever arrives: no panic, and a batch accepted has as many
        /// connections as fds, each with a valid listener name.
        #[test]
        fn parse_batch_never_panics(
            message in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            fds in 0usize..4,
        ) {
            let mut with_magic = BATCH.to_vec();
            with_magic.extend(&message);
            for message in [&message, &with_magic] {
                if let Ok((_, entries)) = parse_batch(message, fds) {
                    proptest::prop_assert_eq!(entries.len(), fds);
                    for entry in entries {
                        proptest::prop_assert!(super::super::env::is_valid_name(&entry.name));
                    }
                }
                let _ = parse_answer(message);
            }
        }
    }
}
