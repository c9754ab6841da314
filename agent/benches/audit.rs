//! What verifying the audit log costs as it grows: a log of 1,000,000 entries of the
//! size actions write (default checkpoints and rotation, the anchor file, no journal),
//! read whole (`devos audit verify`), then 1,000 more entries verified from the mark
//! the first left (what the boot check and the health signal read), twice: the first
//! resumed verification in this process is the slower one.
//! `cargo bench -p devos-agent --bench audit`.

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use devos_agent::audit::{AuditLog, VerifyOptions, verify};
use devos_agent::config::AuditConfig;

fn append(log: &mut AuditLog, n: u64) {
    for i in 0..n {
        log.append(
            "action.finished",
            Some(1000),
            Some("r-0123456789abcdef"),
            Some(1),
            serde_json::json!({
                "argv": ["git", "status", "--short"],
                "exit": 0,
                "i": i,
                "stdout-sha256": "ab".repeat(32),
            }),
        )
        .unwrap();
    }
}

fn main() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("audit");
    let config = AuditConfig {
        anchor_file: root.path().join("anchors.jsonl"),
        journal: false,
        ..AuditConfig::default()
    };
    let mut log = AuditLog::open(&dir, &config).unwrap();
    let entries = 1_000_000;
    append(&mut log, entries);
    let bytes: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let start = Instant::now();
    let full = verify(&dir, &VerifyOptions::of(&config)).unwrap();
    let full_time = start.elapsed();
    assert!(full.ok, "{full:?}");
    append(&mut log, 1000);
    let options = VerifyOptions {
        resume: full.mark,
        ..VerifyOptions::of(&config)
    };
    let start = Instant::now();
    let since = verify(&dir, &options).unwrap();
    let since_time = start.elapsed();
    let start = Instant::now();
    assert!(verify(&dir, &options).unwrap().ok);
    let again_time = start.elapsed();
    assert!(since.ok && since.entries == entries + 1000, "{since:?}");
    println!(
        "audit verify, {entries} entries ({:.0} MB): whole log {:.2} s; 1000 entries since the last verification {:.1} ms (the same again: {:.1} ms)",
        bytes as f64 / 1e6,
        full_time.as_secs_f64(),
        since_time.as_secs_f64() * 1000.0,
        again_time.as_secs_f64() * 1000.0
    );
}
