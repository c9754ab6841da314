//! The command line's handling of its input and output, with commands that start no
//! build, no VM and no network: closed pipes, registry paths, key export destinations.

mod common;

use std::process::Output;

use common::devos_build_command;

/// Run with stdout on a pipe whose reader has already gone, as `| head -1` leaves it.
fn with_closed_stdout(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    devos_build_command()
        .args(args)
        .stdout(writer)
        .output()
        .unwrap()
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    for args in [
        &["completions", "bash"][..],
        &["cache", "status", "--json"],
        &["man"],
    ] {
        let out = with_closed_stdout(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}
