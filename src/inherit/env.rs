//! The environment variables of the inheritance protocol: what a process
//! is handed when it starts, by a previous generation or by systemd.
//!
//! systemd-compatible, so that one code path serves socket activation, a
//! previous generation, and tools such as `systemfd`:
//!
//! | variable | meaning |
//! |---|---|
//! | [`LISTEN_FDS`] | how many listeners, at fds 3, 4, … |
//! | [`LISTEN_FDNAMES`] | their names, `:`-separated (default: `unknown`) |
//! | [`LISTEN_PID`] | when set, must be this process's pid |
//! | [`HANDOVER_READY_FD`] | the readiness channel of a previous generation |
//! | [`HANDOVER_BOUND_FDNAMES`] | which of the listeners a previous generation bound itself |
//! | [`HANDOVER_GENERATION`] | this generation's number, from 2 on (absent: 1) |
//! | [`HANDOVER_STATE_FD`] | a sealed snapshot of the previous generation's state |
//! | [`HANDOVER_CONNECTIONS_FD`] | the channel on which the previous generation hands over its idle connections |
//! | [`HANDOVER_STANDBY_FD`] | in a standby: the socket that all of the above will come on |
//!
//! [`Listeners::from_env`](crate::Listeners::from_env) reads them once and
//! removes them from the environment, so that the application's own
//! children do not see them. [`NOTIFY_SOCKET`] is systemd's, and stays
//! (the application may notify systemd itself); a stable parent's is
//! removed too, so that no child of the application can speak for a
//! generation, and handed to each next generation.

use std::ffi::OsString;
use std::os::fd::RawFd;

use crate::error::Error;
use crate::sys;

/// Number of inherited listeners (systemd's socket-activation protocol).
pub const LISTEN_FDS: &str = "LISTEN_FDS";
/// `:`-separated names of the inherited listeners.
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// The pid the inherited listeners are meant for, when set.
pub const LISTEN_PID: &str = "LISTEN_PID";
/// The readiness channel, set by a previous generation: the new generation
/// writes `READY=<pid>` on it; the previous one, once drained, says how
/// its drain went.
pub const HANDOVER_READY_FD: &str = "HANDOVER_READY_FD";
/// `:`-separated names of the inherited listeners that a previous
/// generation bound itself (not systemd's): those follow a changed address.
pub const HANDOVER_BOUND_FDNAMES: &str = "HANDOVER_BOUND_FDNAMES";
/// Set in a standby (see [`Builder::standby`](crate::Builder::standby)):
/// the Unix socket on which the previous generation will send the
/// listeners and the readiness channel.
pub const HANDOVER_STANDBY_FD: &str = "HANDOVER_STANDBY_FD";
/// This generation's number, set by the previous generation to its own
/// plus one (absent: 1).
pub const HANDOVER_GENERATION: &str = "HANDOVER_GENERATION";
/// The state the previous generation handed over: an fd holding a sealed
/// snapshot (see [`Handover::hand_over_state`](crate::Handover::hand_over_state)).
pub const HANDOVER_STATE_FD: &str = "HANDOVER_STATE_FD";
/// The channel on which the previous generation hands over its idle
/// HTTP/1 connections: one end of a `SOCK_SEQPACKET` Unix socket pair (see
/// [`Handover::serve`](crate::Handover::serve)).
pub const HANDOVER_CONNECTIONS_FD: &str = "HANDOVER_CONNECTIONS_FD";
/// systemd's notification socket (or a stable parent's): where `READY=1`
/// and the other states go.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// What a stable parent's notify socket is called: `@` (an abstract
/// address), then this, its pid and a number.
pub(crate) const STABLE_PARENT_SOCKET: &str = "handover-stable-parent-";

/// The notify socket this process was given, systemd's or a stable
/// parent's: as the environment had it when first asked, which [`take`]
/// does before it removes a stable parent's.
pub(crate) fn notify_socket() -> Option<&'static std::ffi::OsStr> {
    static SOCKET: std::sync::OnceLock<Option<OsString>> = std::sync::OnceLock::new();
    SOCKET
        .get_or_init(|| std::env::var_os(NOTIFY_SOCKET))
        .as_deref()
}

/// Whether `socket` is a stable parent's notify socket.
fn is_stable_parents(socket: &std::ffi::OsStr) -> bool {
    socket
        .as_encoded_bytes()
        .strip_prefix(b"@")
        .is_some_and(|name| name.starts_with(STABLE_PARENT_SOCKET.as_bytes()))
}

/// Every variable of the inheritance protocol: removed from the environment
/// once read, and never passed on as they were to the next generation.
pub(crate) const INHERITANCE_VARS: [&str; 9] = [
    LISTEN_FDS,
    LISTEN_FDNAMES,
    LISTEN_PID,
    HANDOVER_READY_FD,
    HANDOVER_BOUND_FDNAMES,
    HANDOVER_STANDBY_FD,
    HANDOVER_GENERATION,
    HANDOVER_STATE_FD,
    HANDOVER_CONNECTIONS_FD,
];

/// The first inherited fd.
pub(crate) const LISTEN_FDS_START: RawFd = 3;
/// More inherited listeners than this is taken as a malformed environment:
/// room is left for the readiness channel, the state and the connections
/// channel.
pub(crate) const MAX_LISTEN_FDS: usize = sys::MAX_PASSED_FDS - 3;

/// The inheritance variables as this process found them, before they were
/// removed from its environment.
#[derive(Debug, Default)]
pub(crate) struct Found {
    values: Vec<(&'static str, String)>,
}

impl Found {
    /// The value of `var`, if it was set.
    pub(crate) fn get(&self, var: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(key, _)| *key == var)
            .map(|(_, value)| value.as_str())
    }

    /// What `lines` (`KEY=VALUE`, one per line) say, for the keys in
    /// `allowed` only: a standby's message.
    pub(crate) fn from_lines(text: &str, allowed: &[&'static str]) -> Result<Self, String> {
        let mut found = Found::default();
        for line in text.lines() {
            let (key, value) = line.split_once('=').ok_or("a line without '='")?;
            let Some(&key) = allowed.iter().find(|allowed| **allowed == key) else {
                return Err(format!("unknown key {key:?}"));
            };
            if found.get(key).is_some() {
                return Err(format!("{key} twice"));
            }
            found.values.push((key, value.to_owned()));
        }
        Ok(found)
    }
}

/// Reads every inheritance variable, then removes them all from the
/// environment (see [`sys::remove_env`] for when that is sound).
pub(crate) fn take() -> Found {
    let values = INHERITANCE_VARS
        .iter()
        .filter_map(|&var| Some((var, std::env::var(var).ok()?)))
        .collect();
    for var in INHERITANCE_VARS {
        sys::remove_env(var);
    }
    if notify_socket().is_some_and(is_stable_parents) {
        sys::remove_env(NOTIFY_SOCKET);
    }
    Found { values }
}

/// What the inheritance variables say, checked against each other, before
/// any fd is touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Inheritance {
    /// (fd, name) of each inherited listener.
    pub(crate) fds: Vec<(RawFd, String)>,
    /// The names of those a previous generation bound itself.
    pub(crate) bound: Vec<String>,
    /// The readiness channel's fd.
    pub(crate) ready_fd: Option<RawFd>,
    /// This generation's number (see [`HANDOVER_GENERATION`]).
    pub(crate) generation: u64,
    /// The state snapshot's fd (see [`HANDOVER_STATE_FD`]).
    pub(crate) state_fd: Option<RawFd>,
    /// The connections channel's fd (see [`HANDOVER_CONNECTIONS_FD`]).
    pub(crate) connections_fd: Option<RawFd>,
}

impl Inheritance {
    /// Parses what `found` holds. Pure: it touches no fd and reads no
    /// environment, so it can be tested (and fuzzed) on any input.
    pub(crate) fn parse(found: &Found, our_pid: u32) -> Result<Self, Error> {
        let var = |name| found.get(name);
        let mut inheritance = parse_listeners(
            var(LISTEN_FDS),
            var(LISTEN_FDNAMES),
            var(LISTEN_PID),
            var(HANDOVER_READY_FD),
            our_pid,
        )?;
        inheritance.generation = parse_generation(var(HANDOVER_GENERATION))?;
        inheritance.state_fd =
            parse_own_fd(HANDOVER_STATE_FD, var(HANDOVER_STATE_FD), &inheritance)?;
        inheritance.connections_fd = parse_own_fd(
            HANDOVER_CONNECTIONS_FD,
            var(HANDOVER_CONNECTIONS_FD),
            &inheritance,
        )?;
        inheritance.bound = parse_bound(var(HANDOVER_BOUND_FDNAMES), &inheritance)?;
        Ok(inheritance)
    }
}

/// A listener name: 1 to 255 characters, no `:` (the separator of
/// `LISTEN_FDNAMES`) and no control characters.
pub(crate) fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.contains(':')
        && !name.chars().any(char::is_control)
}

fn env_error(var: &'static str, value: &str, reason: impl Into<String>) -> Error {
    Error::Env {
        var,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Parses the listeners' variables and the readiness channel's.
fn parse_listeners(
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
    listen_pid: Option<&str>,
    ready_fd: Option<&str>,
    our_pid: u32,
) -> Result<Inheritance, Error> {
    if let Some(pid) = listen_pid {
        let parsed: u32 = pid
            .trim()
            .parse()
            .map_err(|_| env_error(LISTEN_PID, pid, "not a process id"))?;
        if parsed != our_pid {
            return Err(env_error(
                LISTEN_PID,
                pid,
                format!("the listeners are meant for pid {parsed}, and this is pid {our_pid}"),
            ));
        }
    }
    let count = match listen_fds {
        None => {
            if let Some(names) = listen_fdnames {
                return Err(env_error(LISTEN_FDNAMES, names, "set without LISTEN_FDS"));
            }
            0
        }
        Some(value) => {
            let n: usize = value
                .trim()
                .parse()
                .map_err(|_| env_error(LISTEN_FDS, value, "not a number of fds"))?;
            if n > MAX_LISTEN_FDS {
                return Err(env_error(
                    LISTEN_FDS,
                    value,
                    format!("more than {MAX_LISTEN_FDS} listeners"),
                ));
            }
            n
        }
    };
    let names: Vec<String> = match listen_fdnames {
        None => vec!["unknown".to_owned(); count],
        Some(value) => {
            let names: Vec<&str> = if value.is_empty() && count == 0 {
                Vec::new()
            } else {
                value.split(':').collect()
            };
            if names.len() != count {
                return Err(env_error(
                    LISTEN_FDNAMES,
                    value,
                    format!("{} names for {count} fds", names.len()),
                ));
            }
            for name in &names {
                if !is_valid_name(name) {
                    return Err(env_error(
                        LISTEN_FDNAMES,
                        value,
                        format!("{name:?} is not a valid fd name"),
                    ));
                }
            }
            names.into_iter().map(str::to_owned).collect()
        }
    };
    let fds = names
        .into_iter()
        .enumerate()
        .map(|(i, name)| (LISTEN_FDS_START + i as RawFd, name))
        .collect();
    let ready_fd = match ready_fd {
        None => None,
        Some(value) => {
            let fd: RawFd = value
                .trim()
                .parse()
                .map_err(|_| env_error(HANDOVER_READY_FD, value, "not an fd number"))?;
            let listeners_end = LISTEN_FDS_START + count as RawFd;
            if fd < LISTEN_FDS_START || (LISTEN_FDS_START..listeners_end).contains(&fd) {
                return Err(env_error(
                    HANDOVER_READY_FD,
                    value,
                    format!(
                        "must be an fd of its own, not 0-2 or a listener's (3..{listeners_end})"
                    ),
                ));
            }
            Some(fd)
        }
    };
    Ok(Inheritance {
        fds,
        bound: Vec::new(),
        ready_fd,
        generation: 1,
        state_fd: None,
        connections_fd: None,
    })
}

/// The highest generation number: one more always fits in a `u64`.
pub(crate) const MAX_GENERATION: u64 = u64::MAX / 2;

/// Parses `HANDOVER_GENERATION`: absent, 1 (a first generation); else a
/// number from 2 to [`MAX_GENERATION`], which only a previous generation
/// sets.
fn parse_generation(value: Option<&str>) -> Result<u64, Error> {
    let Some(value) = value else {
        return Ok(1);
    };
    match value.trim().parse::<u64>() {
        Ok(n) if (2..=MAX_GENERATION).contains(&n) => Ok(n),
        _ => Err(env_error(
            HANDOVER_GENERATION,
            value,
            format!("not a generation number (2 to {MAX_GENERATION})"),
        )),
    }
}

/// Parses `HANDOVER_STATE_FD` or `HANDOVER_CONNECTIONS_FD` (`var`): an fd
/// of its own, after the listeners, and not one that `so_far` names already.
fn parse_own_fd(
    var: &'static str,
    value: Option<&str>,
    so_far: &Inheritance,
) -> Result<Option<RawFd>, Error> {
    let Some(value) = value else {
        return Ok(None);
    };
    let fd: RawFd = value
        .trim()
        .parse()
        .map_err(|_| env_error(var, value, "not an fd number"))?;
    let taken = so_far.fds.iter().any(|(listener, _)| *listener == fd)
        || [so_far.ready_fd, so_far.state_fd].contains(&Some(fd));
    if fd < LISTEN_FDS_START || taken {
        return Err(env_error(
            var,
            value,
            "must be an fd of its own, not 0-2, a listener's, the readiness channel's or the state's",
        ));
    }
    Ok(Some(fd))
}

/// Parses `HANDOVER_BOUND_FDNAMES`: names that must each be an inherited
/// listener's. Absent (systemd, `systemfd`, or a generation of a handover
/// that did not say): none.
fn parse_bound(value: Option<&str>, so_far: &Inheritance) -> Result<Vec<String>, Error> {
    let Some(value) = value.filter(|value| !value.is_empty()) else {
        return Ok(Vec::new());
    };
    value
        .split(':')
        .map(|name| {
            if so_far.fds.iter().any(|(_, inherited)| inherited == name) {
                Ok(name.to_owned())
            } else {
                Err(env_error(
                    HANDOVER_BOUND_FDNAMES,
                    value,
                    format!("{name:?} is not among the inherited listeners' names"),
                ))
            }
        })
        .collect()
}

/// What else a generation passes the next one, besides the listeners and
/// the readiness channel: the fds that follow them, in this order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Alongside {
    /// A state snapshot ([`HANDOVER_STATE_FD`]).
    pub(crate) state: bool,
    /// The connections channel ([`HANDOVER_CONNECTIONS_FD`]).
    pub(crate) connections: bool,
}

/// The variables that tell the next generation about the listeners
/// `passed` (each one's name, and whether a generation bound it), in fd
/// order from 3, its number, `generation`, and where the fds `alongside`
/// are (after the readiness channel); a standby receives them in its
/// message instead.
pub(crate) fn for_next_generation(
    passed: &[(&str, bool)],
    generation: u64,
    alongside: Alongside,
) -> Vec<(&'static str, String)> {
    let names: Vec<&str> = passed.iter().map(|(name, _)| *name).collect();
    let bound: Vec<&str> = passed
        .iter()
        .filter(|(_, bound)| *bound)
        .map(|(name, _)| *name)
        .collect();
    let mut vars = vec![
        (LISTEN_FDS, passed.len().to_string()),
        (LISTEN_FDNAMES, names.join(":")),
        (HANDOVER_BOUND_FDNAMES, bound.join(":")),
        (HANDOVER_GENERATION, generation.to_string()),
    ];
    let mut next = LISTEN_FDS_START + passed.len() as RawFd + 1;
    if alongside.state {
        vars.push((HANDOVER_STATE_FD, next.to_string()));
        next += 1;
    }
    if alongside.connections {
        vars.push((HANDOVER_CONNECTIONS_FD, next.to_string()));
    }
    vars
}

/// This process's environment, as the next generation starts from it:
/// with the notify socket this process was given, which a stable parent's
/// no longer is in.
pub(crate) fn process_env() -> impl Iterator<Item = (OsString, OsString)> {
    std::env::vars_os()
        .filter(|(key, _)| key != NOTIFY_SOCKET)
        .chain(notify_socket().map(|socket| (NOTIFY_SOCKET.into(), socket.to_owned())))
}

/// This process's environment without the inheritance variables it may
/// have been given.
fn own_env(ours: impl Iterator<Item = (OsString, OsString)>) -> Vec<(OsString, OsString)> {
    ours.filter(|(key, _)| !INHERITANCE_VARS.iter().any(|var| key == var))
        .collect()
}

/// The next generation's environment: this one's, without the inheritance
/// variables it may have been given, plus the variables that describe
/// `passed` ([`for_next_generation`]), and the readiness channel's fd just
/// after the listeners'.
pub(crate) fn child_env(
    ours: impl Iterator<Item = (OsString, OsString)>,
    passed: &[(&str, bool)],
    generation: u64,
    alongside: Alongside,
) -> Vec<(OsString, OsString)> {
    let mut env = own_env(ours);
    env.extend(
        for_next_generation(passed, generation, alongside)
            .into_iter()
            .map(|(key, value)| (key.into(), value.into())),
    );
    env.push((
        HANDOVER_READY_FD.into(),
        (LISTEN_FDS_START + passed.len() as RawFd)
            .to_string()
            .into(),
    ));
    env
}

/// A standby's environment: this one's, without the inheritance variables,
/// plus its socket's fd, 3.
pub(crate) fn standby_env(
    ours: impl Iterator<Item = (OsString, OsString)>,
) -> Vec<(OsString, OsString)> {
    let mut env = own_env(ours);
    env.push((
        HANDOVER_STANDBY_FD.into(),
        LISTEN_FDS_START.to_string().into(),
    ));
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(
        fds: Option<&str>,
        names: Option<&str>,
        pid: Option<&str>,
        ready: Option<&str>,
    ) -> Result<Inheritance, Error> {
        parse_listeners(fds, names, pid, ready, 4242)
    }

    fn found(vars: &[(&'static str, &str)]) -> Found {
        Found {
            values: vars.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        }
    }

    #[test]
    fn bound_names_must_be_inherited_ones() {
        let spec = parse(Some("2"), Some("http:admin"), None, None).unwrap();
        assert_eq!(parse_bound(None, &spec).unwrap(), Vec::<String>::new());
        assert_eq!(parse_bound(Some(""), &spec).unwrap(), Vec::<String>::new());
        assert_eq!(parse_bound(Some("admin"), &spec).unwrap(), vec!["admin"]);
        assert_eq!(
            parse_bound(Some("http:admin"), &spec).unwrap(),
            vec!["http", "admin"]
        );
        let err = parse_bound(Some("http:other"), &spec)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"other\" is not among the inherited"),
            "{err}"
        );
        let none = parse(None, None, None, None).unwrap();
        assert!(parse_bound(Some("http"), &none).is_err());
    }

    #[test]
    fn nothing_set_means_nothing_inherited() {
        let spec = Inheritance::parse(&Found::default(), 4242).unwrap();
        assert!(spec.fds.is_empty());
        assert_eq!(spec.ready_fd, None);
        assert_eq!(spec.generation, 1);
    }

    #[test]
    fn names_pid_generation_state_and_bound_are_honoured() {
        let spec = Inheritance::parse(
            &found(&[
                (LISTEN_FDS, "2"),
                (LISTEN_FDNAMES, "http:admin"),
                (LISTEN_PID, "4242"),
                (HANDOVER_READY_FD, "5"),
                (HANDOVER_GENERATION, "7"),
                (HANDOVER_STATE_FD, "6"),
                (HANDOVER_BOUND_FDNAMES, "admin"),
            ]),
            4242,
        )
        .unwrap();
        assert_eq!(spec.fds, vec![(3, "http".into()), (4, "admin".into())]);
        assert_eq!(spec.ready_fd, Some(5));
        assert_eq!(spec.generation, 7);
        assert_eq!(spec.state_fd, Some(6));
        assert_eq!(spec.bound, vec!["admin".to_owned()]);
        let spec = parse(Some("1"), None, None, None).unwrap();
        assert_eq!(spec.fds, vec![(3, "unknown".into())]);
    }

    #[test]
    fn a_message_of_lines_takes_the_allowed_keys_once_each() {
        let allowed = [LISTEN_FDS, LISTEN_FDNAMES];
        let ok = Found::from_lines("LISTEN_FDS=1\nLISTEN_FDNAMES=http\n", &allowed).unwrap();
        assert_eq!(ok.get(LISTEN_FDNAMES), Some("http"));
        assert!(Found::from_lines("LISTEN_PID=1\n", &allowed).is_err());
        assert!(Found::from_lines("LISTEN_FDS=1\nLISTEN_FDS=1\n", &allowed).is_err());
        assert!(Found::from_lines("LISTEN_FDS\n", &allowed).is_err());
    }

    #[test]
    fn the_child_learns_which_listeners_a_generation_bound() {
        let ours = [
            ("PATH", "/usr/bin"),
            ("LISTEN_FDS", "1"),
            ("LISTEN_FDNAMES", "old"),
            ("HANDOVER_BOUND_FDNAMES", "old"),
            ("HANDOVER_READY_FD", "9"),
            ("LISTEN_PID", "1"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = child_env(
            ours.into_iter(),
            &[("http", true), ("activated", false), ("admin", true)],
            4,
            Alongside {
                state: true,
                connections: true,
            },
        );
        let env: Vec<(String, String)> = env
            .into_iter()
            .map(|(k, v)| (k.into_string().unwrap(), v.into_string().unwrap()))
            .collect();
        let expected = [
            ("PATH", "/usr/bin"),
            ("LISTEN_FDS", "3"),
            ("LISTEN_FDNAMES", "http:activated:admin"),
            ("HANDOVER_BOUND_FDNAMES", "http:admin"),
            ("HANDOVER_GENERATION", "4"),
            ("HANDOVER_STATE_FD", "7"),
            ("HANDOVER_CONNECTIONS_FD", "8"),
            ("HANDOVER_READY_FD", "6"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(env, expected);
    }

    /// What one generation writes, the next reads back as it was meant.
    #[test]
    fn what_is_written_for_the_next_generation_reads_back() {
        let passed = [("http", true), ("activated", false)];
        let alongside = Alongside {
            state: true,
            connections: true,
        };
        let env = child_env(std::iter::empty(), &passed, 9, alongside);
        let values = env
            .iter()
            .map(|(k, v)| {
                let key = INHERITANCE_VARS
                    .iter()
                    .find(|var| k == **var)
                    .expect("an inheritance variable");
                (*key, v.to_str().unwrap().to_owned())
            })
            .collect();
        let spec = Inheritance::parse(&Found { values }, 1).unwrap();
        assert_eq!(spec.fds, vec![(3, "http".into()), (4, "activated".into())]);
        assert_eq!(spec.bound, vec!["http".to_owned()]);
        assert_eq!(spec.ready_fd, Some(5));
        assert_eq!(spec.state_fd, Some(6));
        assert_eq!(spec.connections_fd, Some(7));
        assert_eq!(spec.generation, 9);
        // Without the state, the connections channel comes right after
        // the readiness channel.
        let alongside = Alongside {
            state: false,
            connections: true,
        };
        let vars = for_next_generation(&passed, 9, alongside);
        assert!(vars.contains(&(HANDOVER_CONNECTIONS_FD, "6".to_owned())));
        assert!(!vars.iter().any(|(key, _)| *key == HANDOVER_STATE_FD));
    }

    #[test]
    fn a_generation_number_is_bounded_so_the_next_one_fits() {
        let parsed = |value: &str| parse_generation(Some(value));
        assert_eq!(parsed(&MAX_GENERATION.to_string()).unwrap(), MAX_GENERATION);
        assert!(MAX_GENERATION.checked_add(1).is_some());
        for bad in [
            "18446744073709551615",
            &(MAX_GENERATION + 1).to_string(),
            "1",
            "0",
            "-2",
        ] {
            let err = parsed(bad).unwrap_err().to_string();
            assert!(err.starts_with("HANDOVER_GENERATION="), "{bad}: {err}");
        }
    }

    #[test]
    fn the_connections_channel_must_be_an_fd_of_its_own() {
        let base = [
            (LISTEN_FDS, "1"),
            (HANDOVER_READY_FD, "4"),
            (HANDOVER_STATE_FD, "5"),
        ];
        for taken in ["0", "2", "3", "4", "5", "x"] {
            let mut vars = base.to_vec();
            vars.push((HANDOVER_CONNECTIONS_FD, taken));
            let err = Inheritance::parse(&found(&vars), 1)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("HANDOVER_CONNECTIONS_FD="),
                "{taken}: {err}"
            );
        }
        let mut vars = base.to_vec();
        vars.push((HANDOVER_CONNECTIONS_FD, "6"));
        let spec = Inheritance::parse(&found(&vars), 1).unwrap();
        assert_eq!(spec.connections_fd, Some(6));
    }

    proptest::proptest! {
        /// Any environment at all: no panic, and whatever is accepted keeps
        /// the protocol's invariants. A short run in CI; a long one with
        /// `PROPTEST_CASES=1000000 cargo nextest run parse_env_`.
        #[test]
        fn parse_env_never_panics_and_what_it_accepts_is_well_formed(
            fds in proptest::option::of("[0-9]{0,3}|-?[0-9a-z :]{0,24}|[0-9]{20}"),
            names in proptest::option::of("([a-z]{1,8}(:[a-z]{0,8}){0,4})|\\PC{0,40}|.{0,40}"),
            pid in proptest::option::of("4242|[0-9]{0,12}|.{0,8}"),
            ready in proptest::option::of("[0-9]{1,3}|-?[0-9]{0,12}|.{0,6}"),
        ) {
            let parsed = parse(fds.as_deref(), names.as_deref(), pid.as_deref(), ready.as_deref());
            if let Ok(spec) = parsed {
                proptest::prop_assert!(spec.fds.len() <= MAX_LISTEN_FDS);
                for (i, (fd, name)) in spec.fds.iter().enumerate() {
                    proptest::prop_assert_eq!(*fd, LISTEN_FDS_START + i as RawFd);
                    proptest::prop_assert!(!name.is_empty() && name.len() <= 255);
                    proptest::prop_assert!(!name.contains(':') && !name.chars().any(char::is_control));
                }
                if let Some(ready) = spec.ready_fd {
                    proptest::prop_assert!(ready >= LISTEN_FDS_START + spec.fds.len() as RawFd);
                }
                if let Some(pid) = &pid {
                    proptest::prop_assert_eq!(pid.trim(), "4242");
                }
                if fds.is_none() {
                    proptest::prop_assert!(spec.fds.is_empty());
                }
            }
        }
    }

    #[test]
    fn malformed_values_are_clear_errors() {
        let cases = [
            (
                Some("abc"),
                None,
                None,
                None,
                "LISTEN_FDS=\"abc\": not a number of fds",
            ),
            (
                Some("-1"),
                None,
                None,
                None,
                "LISTEN_FDS=\"-1\": not a number of fds",
            ),
            (
                Some("99999999999999999999"),
                None,
                None,
                None,
                "not a number",
            ),
            (Some("1000"), None, None, None, "more than"),
            (Some("2"), Some("http"), None, None, "1 names for 2 fds"),
            (Some("1"), Some("a:b"), None, None, "2 names for 1 fds"),
            (
                Some("1"),
                Some(""),
                None,
                None,
                "\"\" is not a valid fd name",
            ),
            (None, Some("http"), None, None, "set without LISTEN_FDS"),
            (
                Some("1"),
                None,
                Some("1"),
                None,
                "meant for pid 1, and this is pid 4242",
            ),
            (Some("1"), None, Some("x"), None, "not a process id"),
            (Some("1"), None, None, Some("3"), "must be an fd of its own"),
            (Some("1"), None, None, Some("1"), "must be an fd of its own"),
            (Some("1"), None, None, Some("fd"), "not an fd number"),
        ];
        for (fds, names, pid, ready, expected) in cases {
            let err = parse(fds, names, pid, ready).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{fds:?} {names:?} {pid:?} {ready:?}: {err}"
            );
        }
    }
}
