//! A server under a stable parent in a container: the namespace's PID 1,
//! the stable parent, and its generations.

use std::time::Duration;

use super::deploy::Deploy;
use super::proc::{children_of, processes_from, send_signal, zombies_of};
use super::server::{Launch, Server};
use super::wait::wait_until;

/// A server started with `--stable-parent on` in a pid namespace under
/// `init`: the namespace's PID 1, the stable parent, and its first
/// generation.
pub struct Kept {
    pub server: Server,
    pub ns_init: u32,
    pub keeper: u32,
}

impl Kept {
    pub async fn start(tag: &str, init: &[&str]) -> Kept {
        Self::start_with(tag, init, &[]).await
    }

    /// Like [`start`](Self::start), with more arguments for the server.
    pub async fn start_with(tag: &str, init: &[&str], args: &[&str]) -> Kept {
        Self::start_deploy(Deploy::new(tag), init, args).await
    }

    /// Like [`start_with`](Self::start_with), of another deploy (another
    /// example).
    pub async fn start_deploy(deploy: Deploy, init: &[&str], args: &[&str]) -> Kept {
        let args: Vec<&str> = ["--stable-parent", "on"]
            .iter()
            .chain(args)
            .copied()
            .collect();
        let server = Server::launch(deploy, Launch::Container(init), &args, &[]).await;
        let unshare = server.first.id().unwrap();
        let [ns_init] = children_of(unshare)[..] else {
            panic!("unshare has one child, the namespace's PID 1");
        };
        let keeper = if init.is_empty() {
            ns_init
        } else {
            let [keeper] = children_of(ns_init)[..] else {
                panic!("the init has one child, the stable parent");
            };
            keeper
        };
        Kept {
            server,
            ns_init,
            keeper,
        }
    }

    /// The one generation running under the stable parent.
    pub fn generation(&self) -> u32 {
        let [generation] = children_of(self.keeper)[..] else {
            panic!(
                "one generation under the stable parent: {:?}\n{}",
                children_of(self.keeper),
                self.server.log_text()
            );
        };
        generation
    }

    /// Upgrades through the namespace's PID 1, as `docker kill -s HUP`
    /// does; returns the new generation once the old one has exited.
    pub async fn restart(&self) -> u32 {
        let old = self.generation();
        send_signal(self.ns_init, "HUP");
        let mut new = None;
        wait_until(
            "the next generation alone under the stable parent",
            Duration::from_secs(20),
            || {
                new = match children_of(self.keeper)[..] {
                    [one] if one != old => Some(one),
                    _ => None,
                };
                new.is_some()
            },
        )
        .await;
        new.unwrap()
    }

    /// Waits until the stable parent has reaped every old generation.
    pub async fn wait_reaped(&self) {
        wait_until(
            "the stable parent reaps the old generation",
            Duration::from_secs(20),
            || zombies_of(self.keeper).is_empty(),
        )
        .await;
    }

    /// `SIGTERM` to the namespace's PID 1, as `docker stop` sends: the
    /// container must end with status 0 and leave no process.
    pub async fn stop(&mut self) {
        send_signal(self.ns_init, "TERM");
        let status = tokio::time::timeout(Duration::from_secs(20), self.server.first.wait())
            .await
            .expect("the container ends after SIGTERM")
            .unwrap();
        assert!(status.success(), "the container exited with {status}");
        assert!(processes_from(&self.server.deploy.dir).is_empty());
    }
}
