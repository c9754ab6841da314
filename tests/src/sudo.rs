//! A throwaway user with a home of their own, and commands run as them or as root
//! "under sudo" for them (the environment sudo sets), for tests of what a command run
//! through sudo leaves in the invoking user's home.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::{require, require_root};

/// A user made for one test (removed when dropped), whose home is a temporary
/// directory they own.
pub struct SudoUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    home: tempfile::TempDir,
}

impl SudoUser {
    /// Make the user (`tag` keeps users of tests running at once apart).
    pub fn new(tag: &str) -> SudoUser {
        require_root();
        require("useradd", "passwd");
        require("runuser", "util-linux");
        let home = tempfile::tempdir().expect("a temporary home");
        let name = format!("devos-{tag}{}", std::process::id() % 100_000);
        let made = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/bin/sh", "--home-dir"])
            .arg(home.path())
            .arg(&name)
            .status()
            .expect("cannot run useradd");
        assert!(made.success(), "useradd {name}");
        let id = |flag: &str| -> u32 {
            let out = Command::new("id")
                .args([flag, &name])
                .output()
                .expect("cannot run id");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("id prints a number")
        };
        let (uid, gid) = (id("-u"), id("-g"));
        let user = SudoUser {
            name,
            uid,
            gid,
            home,
        };
        user.give(user.home());
        user
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// Make `path` the user's.
    pub fn give(&self, path: &Path) {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
            .unwrap_or_else(|e| panic!("cannot give {} to the user: {e}", path.display()));
    }

    /// A copy of `program` in the user's home, where they can run it (the build tree
    /// may not be theirs to enter).
    pub fn install(&self, program: &Path) -> PathBuf {
        let copy = self.home().join(program.file_name().unwrap_or_default());
        crate::install_executable(program, &copy);
        copy
    }

    /// A clean environment: no variable of the test's own.
    fn clean(&self, c: &mut Command) {
        c.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", self.home());
    }

    /// `program args` as the user.
    pub fn run(&self, program: &Path, args: &[&str]) -> Output {
        let mut c = Command::new("runuser");
        c.args(["-u", &self.name, "--"]).arg(program).args(args);
        self.clean(&mut c);
        c.output().expect("cannot run runuser")
    }

    /// `program args` as root, with what `sudo` sets for the user.
    pub fn sudo(&self, program: &Path, args: &[&str]) -> Output {
        self.sudo_command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
    }

    /// `program` to run as root, with what `sudo` sets for the user.
    pub fn sudo_command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        self.clean(&mut c);
        c.env("SUDO_USER", &self.name)
            .env("SUDO_UID", self.uid.to_string())
            .env("SUDO_GID", self.gid.to_string())
            .env("HOME", "/root");
        c
    }
}

impl Drop for SudoUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}
