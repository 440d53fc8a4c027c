//! [`Presized`]: an extension map to start each request's from, with room
//! for the entries a router and the signal put in.

use http::Request;

use crate::drain::DrainSignal;

/// An extension map to start each request's from: with room for seven
/// entries, and the serve loop's [`DrainSignal`] in it if it puts one in
/// every request.
///
/// A request's extensions start without a map. The first insert allocates
/// one with room for three entries, and the fourth makes it grow (a second
/// allocation, every entry moved). An axum `Router` puts three in every
/// request (the matched path, the path parameters, the original URI), so
/// a signal put in by the serve loop, or by a layer on the routes, is the
/// fourth. A clone of this map keeps its room (a `HashMap`'s clone has the
/// same capacity), so moving one into an empty request costs what the
/// first insert would have cost, and the growth never happens (the
/// benchmarks' README has what that saves). Were a clone ever to lose the
/// room, nothing would break: the map would grow as before.
pub(super) struct Presized {
    extensions: http::Extensions,
    /// For HTTP/2 requests too: only with the loop's own signal. An HTTP/2
    /// request is served in a task of its own, often on the other thread:
    /// room made on the connection's task would be allocated on one thread
    /// and freed on the other, which costs more than the growth it saves
    /// (measured). The loop's signal goes in there all the same, as it did
    /// before there was room to make.
    http2: bool,
}

impl Presized {
    /// Room for seven, holding `signal` (the loop's own, for every
    /// request) if given, or empty, for a layer's signal.
    pub(super) fn new(signal: Option<DrainSignal>) -> Self {
        #[derive(Clone)]
        struct Room<const N: usize>;
        let mut extensions = http::Extensions::new();
        // Four entries make the map grow to eight buckets, room for seven;
        // removing them leaves it that size.
        extensions.insert(Room::<0>);
        extensions.insert(Room::<1>);
        extensions.insert(Room::<2>);
        extensions.insert(Room::<3>);
        extensions.remove::<Room<0>>();
        extensions.remove::<Room<1>>();
        extensions.remove::<Room<2>>();
        extensions.remove::<Room<3>>();
        let http2 = signal.is_some();
        if let Some(signal) = signal {
            extensions.insert(signal);
        }
        Self { extensions, http2 }
    }

    /// Puts a copy in `req`'s extensions (over HTTP/2 only with the loop's
    /// signal): moved in whole when they have no map yet (as when hyper
    /// hands a request over, unless it asks to upgrade), entry by entry
    /// otherwise.
    #[inline]
    pub(super) fn put_in<B>(&self, req: &mut Request<B>) {
        if self.http2 || req.version() < http::Version::HTTP_2 {
            req.extensions_mut().extend(self.extensions.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain::Graceful;

    /// What a request's extensions start from: the signal (or nothing) in
    /// a map of their own, whatever was there before kept, and the next
    /// request's copy untouched by what this one does with its own; over
    /// HTTP/2, only the loop's own signal.
    #[test]
    fn presized_extensions_give_each_request_its_own_copy() {
        let graceful = Graceful::new();
        let presized = Presized::new(Some(graceful.signal_with(true)));
        let http2 = || {
            Request::builder()
                .version(http::Version::HTTP_2)
                .body(())
                .unwrap()
        };

        let mut first = Request::new(());
        presized.put_in(&mut first);
        let first = first.extensions_mut();
        assert_eq!(first.len(), 1);
        assert!(first.get::<DrainSignal>().unwrap().is_from(&graceful));
        first.insert(7u32);
        first.remove::<DrainSignal>();

        // Into extensions that have a map already (hyper's upgrade, say).
        let mut second = Request::new(());
        second.extensions_mut().insert("upgrade");
        presized.put_in(&mut second);
        let second = second.extensions();
        assert_eq!(second.len(), 2);
        assert_eq!(second.get::<&str>(), Some(&"upgrade"));
        assert!(second.get::<DrainSignal>().unwrap().is_from(&graceful));
        assert_eq!(second.get::<u32>(), None);

        let mut over_http2 = http2();
        presized.put_in(&mut over_http2);
        assert!(over_http2.extensions().get::<DrainSignal>().is_some());

        let room = Presized::new(None);
        let mut none = Request::new(());
        room.put_in(&mut none);
        assert!(none.extensions().is_empty());
        assert!(none.extensions().get::<DrainSignal>().is_none());
        let mut untouched = http2();
        room.put_in(&mut untouched);
        assert!(untouched.extensions().is_empty());
    }
}
