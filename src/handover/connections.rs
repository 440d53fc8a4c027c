//! Carrying idle connections between generations, over the channel the
//! upgrade creates (see [`crate::inherit::connections`] for its messages):
//! [`Outgoing`], in the generation that hands over, sends the connections
//! its serve loops give up; [`Incoming`], in the next one, takes them and
//! gives each to the serve loop of its listener.
//!
//! The drain half decides which connection is given up, and when; this
//! side only carries it, and answers whether it arrived.
//!
//! The channel is a `SOCK_SEQPACKET` socket, which Tokio has no type for;
//! it is registered with the runtime as a [`UnixDatagram`] (registration
//! knows only the fd), and read and written with `sys::fdpass`.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::io::Interest;
use tokio::net::UnixDatagram;
use tokio::sync::{mpsc, oneshot};

use crate::inherit::connections::{self as message, Batch, MAX_MESSAGE};
use crate::lock::lock;
use crate::serve::moves::{Carried, GiveUp, Moved};
use crate::sys::{self, Family, fdpass};

/// How many batches may wait for their answers at once: enough to keep the
/// channel busy, few enough that the answers never fill its buffer.
const MAX_WAITING: usize = 8;

/// How long a connection of a listener this generation has taken waits
/// for that listener's serve loop to start, when it arrives first (the
/// application said ready before it called `serve`): then it is refused,
/// and the previous generation drains it.
const SERVE_LOOP_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A connection on its way out, and who waits to hear what became of it.
struct Out {
    name: Arc<str>,
    moved: Moved,
    reply: oneshot::Sender<Carried>,
}

/// The generation that hands over: where its serve loops give their idle
/// connections up, once the next generation has said it takes them.
#[derive(Default)]
pub(crate) struct Outgoing {
    to: Mutex<Option<mpsc::UnboundedSender<Out>>>,
}

impl Outgoing {
    /// Starts sending to the next generation on `channel`.
    pub(crate) fn start(&self, channel: OwnedFd) -> io::Result<()> {
        let channel = register(channel)?;
        let (to, from) = mpsc::unbounded_channel();
        tokio::spawn(send(channel, from));
        *lock(&self.to) = Some(to);
        Ok(())
    }

    /// No more: the channel closes once what was given up has its answer,
    /// and the next generation's serve loops stop waiting for more.
    pub(crate) fn close(&self) {
        lock(&self.to).take();
    }

    /// Where the serve loop of the listener `name` gives a connection up:
    /// resolves once the next generation has it, or it is back.
    pub(crate) fn give_up(self: &Arc<Self>, name: &str) -> GiveUp {
        let outgoing = self.clone();
        let name: Arc<str> = name.into();
        Arc::new(move |moved| {
            let to = lock(&outgoing.to).clone();
            let name = name.clone();
            Box::pin(async move {
                let Some(to) = to else {
                    return Carried::Refused(moved);
                };
                let (reply, answer) = oneshot::channel();
                if let Err(mpsc::error::SendError(out)) = to.send(Out { name, moved, reply }) {
                    return Carried::Refused(out.moved);
                }
                // Dropped unanswered only if the sender is gone with it.
                answer.await.unwrap_or(Carried::Lost)
            })
        })
    }
}

/// Sends what is given up, in batches of whatever is waiting, and hands
/// back each connection's answer. A batch the next generation never
/// answers (it died, or closed the channel) is given back whole: it
/// answers before it serves any of them.
async fn send(channel: UnixDatagram, mut from: mpsc::UnboundedReceiver<Out>) {
    let mut next_id: u64 = 1;
    let mut waiting: VecDeque<(u64, Vec<Out>)> = VecDeque::new();
    let mut held: Option<Out> = None;
    let mut open = true;
    // Once the channel has failed, nothing more is sent.
    let mut broken = false;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        if !open && held.is_none() && waiting.is_empty() {
            break;
        }
        if held.is_none() {
            tokio::select! {
                out = from.recv(), if open && waiting.len() < MAX_WAITING => match out {
                    Some(out) => held = Some(out),
                    None => open = false,
                },
                answered = read_answer(&channel, &mut buf, &mut waiting), if !waiting.is_empty() => {
                    match answered {
                        Ok(()) => {}
                        Err(Broken::Ended) => {
                            broken = true;
                            for (_, outs) in waiting.drain(..) {
                                refuse(outs);
                            }
                        }
                        Err(Broken::Garbled) => {
                            broken = true;
                            for (_, outs) in waiting.drain(..) {
                                lose(outs);
                            }
                        }
                    }
                }
            }
        }
        if broken {
            if let Some(out) = held.take() {
                refuse(vec![out]);
            }
            while let Ok(out) = from.try_recv() {
                refuse(vec![out]);
            }
            if !open {
                break;
            }
            continue;
        }
        let Some(first) = held.take() else {
            continue;
        };
        let (unread, learned) = (&first.moved.unread, &first.moved.learned);
        let id = next_id;
        let mut batch = Batch::new(id);
        // Too big for a message of its own: drained here.
        if !batch.has_room(&first.name, unread, learned) {
            refuse(vec![first]);
            continue;
        }
        next_id += 1;
        batch.push(&first.name, unread, learned);
        let mut outs = vec![first];
        while let Ok(out) = from.try_recv() {
            if !batch.has_room(&out.name, &out.moved.unread, &out.moved.learned) {
                held = Some(out);
                break;
            }
            batch.push(&out.name, &out.moved.unread, &out.moved.learned);
            outs.push(out);
        }
        match send_batch(&channel, &batch, &outs).await {
            Ok(()) => waiting.push_back((id, outs)),
            Err(e) => {
                log!(warn, error = %e, connections = outs.len(), "could not hand connections to the next generation; draining them here");
                refuse(outs);
                broken = true;
            }
        }
    }
}

/// Sends one batch, its fds with it, waiting while the channel is full.
async fn send_batch(channel: &UnixDatagram, batch: &Batch, outs: &[Out]) -> io::Result<()> {
    let fds: Vec<_> = outs.iter().map(|out| out.moved.fd.as_fd()).collect();
    channel
        .async_io(Interest::WRITABLE, || {
            fdpass::send_packet(channel.as_fd(), batch.bytes(), &fds)
        })
        .await
}

/// How the channel failed.
enum Broken {
    /// It ended (the next generation exited, or closed it): every batch
    /// still waiting is unanswered, so none of it was served there, and
    /// it is given back.
    Ended,
    /// It said something it should not: which of the batches still
    /// waiting the next generation serves is not known, and serving one
    /// here too would mix two servers' bytes on it; they are closed.
    Garbled,
}

/// Reads one answer, and tells each connection of its batch (the oldest
/// waiting) what became of it.
async fn read_answer(
    channel: &UnixDatagram,
    buf: &mut [u8],
    waiting: &mut VecDeque<(u64, Vec<Out>)>,
) -> Result<(), Broken> {
    let received = channel
        .async_io(Interest::READABLE, || {
            fdpass::recv_packet(channel.as_fd(), buf)
        })
        .await;
    let (read, fds) = match received {
        Ok(Some(received)) => received,
        Ok(None) => return Err(Broken::Ended),
        Err(e) => {
            log!(warn, error = %e, "reading the next generation's answers failed");
            return Err(Broken::Ended);
        }
    };
    drop(fds);
    let answer = message::parse_answer(&buf[..read]);
    let Some((id, outs)) = waiting.pop_front() else {
        log!(
            error,
            "the next generation answered a batch that was not sent"
        );
        return Err(Broken::Garbled);
    };
    match answer {
        Ok((answered, taken)) if answered == id && taken.len() == outs.len() => {
            for (out, taken) in outs.into_iter().zip(taken) {
                let carried = if taken {
                    // Ours closes here; the next generation's serves.
                    Carried::Taken
                } else {
                    Carried::Refused(out.moved)
                };
                let _ = out.reply.send(carried);
            }
            Ok(())
        }
        wrong => {
            log!(error, answer = ?wrong.map(|(id, _)| id), batch = id, "the next generation's answer does not fit the batch; closing its connections");
            lose(outs);
            Err(Broken::Garbled)
        }
    }
}

/// Closes connections whose fate is not known.
fn lose(outs: Vec<Out>) {
    for out in outs {
        let _ = out.reply.send(Carried::Lost);
    }
}

/// Gives connections back to their serve loops, which drain them.
fn refuse(outs: Vec<Out>) {
    for out in outs {
        let _ = out.reply.send(Carried::Refused(out.moved));
    }
}

/// A serve loop that takes the previous generation's connections.
struct Taker {
    family: Family,
    to: mpsc::UnboundedSender<Moved>,
}

/// The generation that took over: where the previous generation's
/// connections arrive, until it has sent the last.
pub(crate) struct Incoming {
    /// By listener name; `None` once nothing more can come.
    takers: Mutex<Option<HashMap<String, Taker>>>,
    /// Woken when a serve loop registers.
    registered: tokio::sync::Notify,
}

impl Incoming {
    /// `open`: the previous generation passed a channel, and this one
    /// takes connections.
    pub(crate) fn new(open: bool) -> Self {
        Self {
            takers: Mutex::new(open.then(HashMap::new)),
            registered: tokio::sync::Notify::new(),
        }
    }

    /// The previous generation's connections of listener `name` (whose
    /// family is `family`), as they come; `None` if none can.
    pub(crate) fn register(
        &self,
        name: &str,
        family: Family,
    ) -> Option<mpsc::UnboundedReceiver<Moved>> {
        let mut takers = lock(&self.takers);
        let takers = takers.as_mut()?;
        let (to, from) = mpsc::unbounded_channel();
        takers.insert(name.to_owned(), Taker { family, to });
        self.registered.notify_waiters();
        Some(from)
    }

    /// Nothing more comes: every serve loop stops waiting.
    pub(crate) fn close(&self) {
        lock(&self.takers).take();
    }

    /// Starts taking from the previous generation on `channel`; `served`
    /// names the listeners this generation has taken, whose serve loops
    /// may not have started yet.
    pub(crate) fn start(self: &Arc<Self>, channel: OwnedFd, served: Vec<String>) -> io::Result<()> {
        let channel = register(channel)?;
        tokio::spawn(receive(self.clone(), channel, served));
        Ok(())
    }

    /// Waits, at most `SERVE_LOOP_WAIT` from `since`, until a serve loop
    /// for listener `name` has registered.
    async fn wait_registered(&self, name: &str, since: tokio::time::Instant) {
        let deadline = since + SERVE_LOOP_WAIT;
        loop {
            let registered = self.registered.notified();
            let mut registered = std::pin::pin!(registered);
            registered.as_mut().enable();
            match &*lock(&self.takers) {
                Some(takers) if !takers.contains_key(name) => {}
                _ => return,
            }
            if tokio::time::timeout_at(deadline, registered).await.is_err() {
                return;
            }
        }
    }

    /// Where the connection of listener `name` that arrived as `fd` goes;
    /// `None` if no serve loop here takes it.
    fn taker(&self, name: &str, fd: &OwnedFd) -> Option<mpsc::UnboundedSender<Moved>> {
        let takers = lock(&self.takers);
        let taker = takers.as_ref()?.get(name)?;
        if taker.to.is_closed() {
            return None;
        }
        if let Err(e) = sys::connected_stream_socket(fd.as_fd(), taker.family) {
            log!(warn, name, error = %e, "the previous generation handed over an fd that is not a connection of this listener; refused");
            return None;
        }
        Some(taker.to.clone())
    }
}

/// Takes batch after batch: owns the fds, answers which it took, then
/// gives each taken one to its serve loop. At end of file (the previous
/// generation has given up its last, or exited) nothing more comes.
async fn receive(incoming: Arc<Incoming>, channel: UnixDatagram, served: Vec<String>) {
    let started = tokio::time::Instant::now();
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut taken_count = 0usize;
    loop {
        let received = channel
            .async_io(Interest::READABLE, || {
                fdpass::recv_packet(channel.as_fd(), &mut buf)
            })
            .await;
        let (read, fds) = match received {
            Ok(Some(received)) => received,
            Ok(None) => break,
            Err(e) => {
                log!(warn, error = %e, "reading the previous generation's connections failed; taking no more");
                break;
            }
        };
        let (id, entries) = match message::parse_batch(&buf[..read], fds.len()) {
            Ok(batch) => batch,
            Err(e) => {
                // Unanswered, the batch stays the previous generation's.
                log!(warn, error = %e, "the previous generation sent a batch that does not parse; taking no more connections");
                break;
            }
        };
        let mut taken = Vec::with_capacity(entries.len());
        let mut to_serve = Vec::with_capacity(entries.len());
        for (entry, fd) in entries.into_iter().zip(fds) {
            if served.contains(&entry.name) {
                incoming.wait_registered(&entry.name, started).await;
            }
            match incoming.taker(&entry.name, &fd) {
                Some(to) => {
                    taken.push(true);
                    to_serve.push((
                        to,
                        Moved {
                            fd,
                            unread: Bytes::from(entry.unread),
                            learned: entry.learned,
                        },
                    ));
                }
                // Ours closes; the previous generation drains its own.
                None => taken.push(false),
            }
        }
        // Answered before any is served: until the answer, the previous
        // generation may still serve them itself.
        if let Err(e) = answer(&channel, &message::answer(id, &taken)).await {
            // It has gone: nobody else serves them.
            log!(debug, error = %e, "could not answer the previous generation");
        }
        taken_count += to_serve.len();
        for (to, moved) in to_serve {
            let _ = to.send(moved);
        }
    }
    if taken_count > 0 {
        log!(
            debug,
            connections = taken_count,
            "the previous generation has handed over its last connection"
        );
    }
    incoming.close();
}

/// Sends an answer, waiting while the channel is full.
async fn answer(channel: &UnixDatagram, answer: &[u8]) -> io::Result<()> {
    channel
        .async_io(Interest::WRITABLE, || {
            fdpass::send_packet(channel.as_fd(), answer, &[])
        })
        .await
}

/// `channel`, registered with the runtime (see the module's docs).
fn register(channel: OwnedFd) -> io::Result<UnixDatagram> {
    UnixDatagram::from_std(std::os::unix::net::UnixDatagram::from(channel))
}
