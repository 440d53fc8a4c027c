//! TLS session-ticket keys that outlive a restart.
//!
//! rustls's own ticketer makes its keys at random inside the process, so
//! every new generation starts with keys no client's ticket was made with,
//! and every client that reconnects after a restart pays a full handshake.
//! `TicketKeys` encrypts tickets with keys it can write down: the current
//! key and the one before it (rotated every `rotate_every`), which each
//! generation hands to the next (`Handover::hand_over_state`). A client
//! that reconnects to the new generation resumes its session.
//!
//! A ticket is the key's id (4 bytes), a random nonce (12 bytes), and the
//! session state sealed with ChaCha20-Poly1305 (the id as associated data).
//! A ticket made with a key older than the previous one no longer opens:
//! a ticket lives at most two rotations.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use tokio_rustls::rustls::server::ProducesTickets;

/// The handed-over format's version (its first byte): a generation that
/// finds another makes new keys, and its clients do full handshakes once.
const VERSION: u8 = 1;
const ID_LEN: usize = 4;
const SECRET_LEN: usize = 32;
/// One key written down: id, secret, creation time (seconds since the
/// epoch, 8 bytes).
const KEY_LEN: usize = ID_LEN + SECRET_LEN + 8;

struct Key {
    id: [u8; ID_LEN],
    secret: [u8; SECRET_LEN],
    created: u64,
    aead: LessSafeKey,
}

impl Key {
    fn new(id: [u8; ID_LEN], secret: [u8; SECRET_LEN], created: u64) -> Option<Key> {
        let aead = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &secret).ok()?);
        Some(Key {
            id,
            secret,
            created,
            aead,
        })
    }

    fn random(rng: &SystemRandom, created: u64) -> Option<Key> {
        let mut id = [0; ID_LEN];
        let mut secret = [0; SECRET_LEN];
        rng.fill(&mut id).ok()?;
        rng.fill(&mut secret).ok()?;
        Key::new(id, secret, created)
    }
}

struct Keys {
    current: Key,
    previous: Option<Key>,
}

/// Session-ticket keys, rotated every `rotate_every`, that a generation
/// can hand to the next one.
pub struct TicketKeys {
    keys: Mutex<Keys>,
    rotate_every: Duration,
    rng: SystemRandom,
}

impl fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketKeys")
            .field("rotate_every", &self.rotate_every)
            .finish_non_exhaustive()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TicketKeys {
    /// New keys, or the keys a previous generation wrote down (`handed`),
    /// if they are of this format and not too old. Also says which.
    pub fn new(
        rotate_every: Duration,
        handed: Option<&[u8]>,
    ) -> Result<(TicketKeys, bool), String> {
        let rng = SystemRandom::new();
        let (keys, kept) = match handed.and_then(|bytes| Self::read(bytes, rotate_every)) {
            Some(keys) => (keys, true),
            None => {
                let current = Key::random(&rng, now()).ok_or("no random key")?;
                (
                    Keys {
                        current,
                        previous: None,
                    },
                    false,
                )
            }
        };
        let keys = TicketKeys {
            keys: Mutex::new(keys),
            rotate_every,
            rng,
        };
        Ok((keys, kept))
    }

    /// The keys written down, for the next generation.
    pub fn write_down(&self) -> Vec<u8> {
        let mut keys = self.lock();
        self.rotate(&mut keys);
        let mut bytes = vec![VERSION];
        for key in [Some(&keys.current), keys.previous.as_ref()]
            .into_iter()
            .flatten()
        {
            bytes.extend(key.id);
            bytes.extend(key.secret);
            bytes.extend(key.created.to_be_bytes());
        }
        bytes
    }

    /// The keys in `bytes`, current first, dropping one too old to open
    /// any ticket still alive; `None` unless they are whole and of this
    /// format.
    fn read(bytes: &[u8], rotate_every: Duration) -> Option<Keys> {
        let rest = bytes.strip_prefix(&[VERSION])?;
        if rest.is_empty() || rest.len() % KEY_LEN != 0 || rest.len() / KEY_LEN > 2 {
            return None;
        }
        let oldest = now().saturating_sub(2 * rotate_every.as_secs().max(1));
        let mut keys = rest.chunks_exact(KEY_LEN).filter_map(|chunk| {
            let (id, rest) = chunk.split_at(ID_LEN);
            let (secret, created) = rest.split_at(SECRET_LEN);
            let created = u64::from_be_bytes(created.try_into().ok()?);
            (created >= oldest).then_some(())?;
            Key::new(id.try_into().ok()?, secret.try_into().ok()?, created)
        });
        let current = keys.next()?;
        Some(Keys {
            current,
            previous: keys.next(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Keys> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new current key once the current one is `rotate_every` old.
    fn rotate(&self, keys: &mut Keys) {
        let now = now();
        if now.saturating_sub(keys.current.created) < self.rotate_every.as_secs() {
            return;
        }
        if let Some(new) = Key::random(&self.rng, now) {
            keys.previous = Some(std::mem::replace(&mut keys.current, new));
        }
    }
}

impl ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(self.rotate_every.as_secs()).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let mut keys = self.lock();
        self.rotate(&mut keys);
        let key = &keys.current;
        let mut nonce = [0; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut sealed = plain.to_vec();
        key.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key.id),
                &mut sealed,
            )
            .ok()?;
        let mut ticket = Vec::with_capacity(ID_LEN + NONCE_LEN + sealed.len());
        ticket.extend(key.id);
        ticket.extend(nonce);
        ticket.extend(sealed);
        Some(ticket)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < ID_LEN + NONCE_LEN {
            return None;
        }
        let (id, rest) = cipher.split_at(ID_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let keys = self.lock();
        let key = [Some(&keys.current), keys.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|key| key.id == id)?;
        let mut opened = sealed.to_vec();
        let plain = key
            .aead
            .open_in_place(
                Nonce::try_assume_unique_for_key(nonce).ok()?,
                Aad::from(key.id),
                &mut opened,
            )
            .ok()?;
        Some(plain.to_vec())
    }
}
