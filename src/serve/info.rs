//! What each request learns of its connection
//! ([`Serve::connect_info`](super::Serve::connect_info),
//! [`Serve::handshake_info`](super::Serve::handshake_info)).

use std::sync::Arc;

use super::Accept;

/// Adds one connection's values to the extensions of a request on it.
pub(super) type Extend = Arc<dyn Fn(&mut http::Extensions) + Send + Sync>;
/// Makes a connection's [`Extend`] from its IO and peer address.
pub(super) type MakeExtend<L> =
    Arc<dyn Fn(&<L as Accept>::Io, &<L as Accept>::Addr) -> Extend + Send + Sync>;
/// Makes a connection's [`Extend`] from the stream its handshake returned.
pub(super) type MakeHandshakeExtend<Io> = Arc<dyn Fn(&Io) -> Extend + Send + Sync>;

/// Inserts a clone of `value`.
fn insert<T: Clone + Send + Sync + 'static>(value: T) -> Extend {
    Arc::new(move |extensions: &mut http::Extensions| {
        extensions.insert(value.clone());
    })
}

/// Both, in this order.
fn pair(first: Extend, then: Extend) -> Extend {
    Arc::new(move |extensions: &mut http::Extensions| {
        first(extensions);
        then(extensions);
    })
}

/// Both, in this order; one if the other is `None`.
pub(super) fn both(first: Option<Extend>, then: Option<Extend>) -> Option<Extend> {
    match (first, then) {
        (Some(first), Some(then)) => Some(pair(first, then)),
        (first, then) => first.or(then),
    }
}

/// `previous`, then what `make` makes of the accepted IO and peer.
pub(super) fn chain<L, T, F>(previous: Option<MakeExtend<L>>, make: F) -> MakeExtend<L>
where
    L: Accept,
    F: Fn(&L::Io, &L::Addr) -> T + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    Arc::new(move |io: &L::Io, addr: &L::Addr| {
        let info = insert(make(io, addr));
        match &previous {
            Some(previous) => pair(previous(io, addr), info),
            None => info,
        }
    })
}

/// `previous`, then what `make` makes of the handshake's stream.
pub(super) fn chain_handshake<Io, T, F>(
    previous: Option<MakeHandshakeExtend<Io>>,
    make: F,
) -> MakeHandshakeExtend<Io>
where
    Io: 'static,
    F: Fn(&Io) -> T + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    Arc::new(move |io: &Io| {
        let info = insert(make(io));
        match &previous {
            Some(previous) => pair(previous(io), info),
            None => info,
        }
    })
}
