//! A deployable copy of an example, in a directory of the test's own, so
//! that a test can deploy another file over it; and the gate its warm-up
//! waits on.

use std::path::{Path, PathBuf};

/// The `hello` example built next to this test binary.
pub fn hello_binary() -> PathBuf {
    example_binary("hello")
}

/// An example built next to this test binary.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: build the examples (cargo build --examples)",
        path.display()
    );
    path
}

/// A directory holding the binary that generations are started from.
pub struct Deploy {
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub pid_file: PathBuf,
    /// The directory the first generation starts in, given as `$PWD` too
    /// (as a shell would); `None`: the test's own.
    pub cwd: Option<PathBuf>,
    source: PathBuf,
}

impl Deploy {
    /// A deploy of `examples/hello`.
    pub fn new(tag: &str) -> Self {
        Self::of(tag, "hello")
    }

    /// A deploy of the example `name`.
    pub fn of(tag: &str, name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("handover-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let deploy = Deploy {
            bin: dir.join(name),
            pid_file: dir.join("server.pid"),
            cwd: None,
            dir,
            source: example_binary(name),
        };
        deploy.install_good();
        deploy
    }

    /// A deploy of `examples/hello` laid out as release directories behind
    /// a symlink, as Capistrano and the like do: `releases/v1/hello`, with
    /// `current` pointing at `releases/v1`. The first generation is started
    /// as `current/hello`, in `current`.
    pub fn releases(tag: &str) -> Self {
        let mut deploy = Self::new(tag);
        deploy.add_release("v1");
        deploy.point_current_at("v1");
        deploy.bin = deploy.dir.join("current").join("hello");
        deploy.cwd = Some(deploy.dir.join("current"));
        deploy
    }

    /// A copy of `examples/hello` at `releases/{name}/hello`.
    pub fn add_release(&self, name: &str) {
        let release = self.dir.join("releases").join(name);
        std::fs::create_dir_all(&release).unwrap();
        std::fs::copy(&self.source, release.join("hello")).unwrap();
    }

    /// Points `current` at `releases/{name}`, atomically (a new symlink
    /// renamed over the old one).
    pub fn point_current_at(&self, name: &str) {
        let new = self.dir.join("current.new");
        let _ = std::fs::remove_file(&new);
        std::os::unix::fs::symlink(Path::new("releases").join(name), &new).unwrap();
        std::fs::rename(&new, self.dir.join("current")).unwrap();
    }

    fn install(&self, write: impl FnOnce(&Path)) {
        use std::os::unix::fs::PermissionsExt;
        let new = self.dir.join("binary.new");
        write(&new);
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();
        // As deploys do: a rename over the path, never a write into it.
        std::fs::rename(&new, &self.bin).unwrap();
    }

    pub fn install_good(&self) {
        self.install(|new| {
            std::fs::copy(&self.source, new).unwrap();
        });
    }

    pub fn install_script(&self, script: &str) {
        self.install(|new| std::fs::write(new, script).unwrap());
    }

    /// A copy of the example at `hello.real` beside the deployed binary,
    /// for a script deployed over it to `exec` (see [`Gate::script`]).
    pub fn keep_real_binary(&self) -> PathBuf {
        let real = self.dir.join("hello.real");
        std::fs::copy(&self.source, &real).unwrap();
        real
    }

    pub fn read_pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// A gate in this deploy's directory, open (see [`Gate`]).
    pub fn gate(&self) -> Gate {
        let gate = Gate {
            path: self.dir.join("gate"),
        };
        gate.open();
        gate
    }
}

impl Drop for Deploy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A file whose presence lets a generation's warm-up end
/// (`hello --warmup-until PATH`): open, a generation warms up and becomes
/// ready; closed, it waits there until the test opens it, so that the test,
/// not the clock, decides when a new generation is ready.
pub struct Gate {
    pub path: PathBuf,
}

impl Gate {
    pub fn open(&self) {
        std::fs::write(&self.path, "").unwrap();
    }

    pub fn close(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Its path, for `--warmup-until`.
    pub fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// A script that waits at this gate, then execs `real` with its
    /// arguments: a binary whose start-up takes as long as the test says.
    pub fn script(&self, real: &Path) -> String {
        format!(
            "#!/bin/sh\nwhile [ ! -e {gate} ]; do sleep 0.01; done\nexec {real} \"$@\"\n",
            gate = self.path.display(),
            real = real.display()
        )
    }
}
