use super::*;

fn config(checkpoint_every: u64) -> AuditConfig {
    AuditConfig {
        checkpoint_every,
        rotate_mib: 1,
    }
}

fn write(dir: &Path, n: u64, checkpoint_every: u64) {
    let mut log = AuditLog::open(dir, &config(checkpoint_every)).unwrap();
    for i in 0..n {
        log.append(
            "action.finished",
            Some(1000),
            Some("r1"),
            Some(i as u32),
            serde_json::json!({"exit": 0, "argv": ["ls", "-la"]}),
        )
        .unwrap();
    }
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("log-000001.jsonl")
}

fn lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(log_path(dir))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn save(dir: &Path, lines: &[String]) {
    std::fs::write(log_path(dir), lines.join("\n") + "\n").unwrap();
}

fn first_bad(dir: &Path) -> Problem {
    let v = verify(dir).unwrap();
    assert!(!v.ok, "tampering was not detected");
    v.first_bad.unwrap()
}

#[test]
fn an_untouched_log_verifies_and_reopening_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 10, 4);
    write(dir.path(), 5, 4);
    let v = verify(dir.path()).unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.entries, 15);
    assert_eq!(v.checkpoints, 3);
}

#[test]
fn an_edit_is_detected_at_the_edited_entry() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 10, 4);
    let mut l = lines(dir.path());
    l[6] = l[6].replace("\"exit\":0", "\"exit\":1");
    save(dir.path(), &l);
    let bad = first_bad(dir.path());
    assert_eq!((bad.line, bad.seq), (7, Some(7)), "{bad:?}");
    assert!(bad.reason.contains("edited"), "{bad:?}");
}

#[test]
fn a_reorder_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 10, 4);
    let mut l = lines(dir.path());
    l.swap(3, 4);
    save(dir.path(), &l);
    let bad = first_bad(dir.path());
    assert_eq!(bad.line, 4, "{bad:?}");
    assert!(bad.reason.contains("out of order"), "{bad:?}");
}

#[test]
fn a_deletion_is_detected_even_with_renumbered_sequence() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 10, 4);
    let mut l = lines(dir.path());
    l.remove(2);
    save(dir.path(), &l);
    assert!(first_bad(dir.path()).reason.contains("missing"));

    // A careful forger also renumbers what follows: the hash link still breaks.
    let mut l = lines(dir.path());
    for line in l.iter_mut().skip(2) {
        let mut e: Entry = serde_json::from_str(line).unwrap();
        e.seq -= 1;
        *line = serde_json::to_string(&e).unwrap();
    }
    save(dir.path(), &l);
    let bad = first_bad(dir.path());
    assert_eq!(bad.line, 3);
    assert!(bad.reason.contains("does not link"), "{bad:?}");
}

#[test]
fn truncation_is_detected_before_and_after_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 10, 4);
    let l = lines(dir.path());
    // Past the last checkpoint (entry 8): HEAD catches it.
    save(dir.path(), &l[..9]);
    let bad = first_bad(dir.path());
    assert!(bad.reason.contains("truncated"), "{bad:?}");
    // Before a checkpoint, with HEAD rewritten to match: the checkpoint catches it.
    save(dir.path(), &l[..6]);
    let last: Entry = serde_json::from_str(&l[5]).unwrap();
    std::fs::write(dir.path().join("HEAD"), format!("6 {}\n", last.hash)).unwrap();
    let bad = first_bad(dir.path());
    assert_eq!(bad.file, "checkpoints.jsonl");
    assert!(bad.reason.contains("truncated"), "{bad:?}");
    // Emptied entirely.
    save(dir.path(), &[]);
    std::fs::write(log_path(dir.path()), "").unwrap();
    assert!(!verify(dir.path()).unwrap().ok);
}

#[test]
fn a_forged_checkpoint_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 8, 4);
    let path = dir.path().join("checkpoints.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let first = text.lines().next().unwrap().to_owned();
    std::fs::write(&path, format!("{first}\n")).unwrap();
    // Dropping the second checkpoint alone is fine (the chain of what is left holds)...
    assert!(verify(dir.path()).unwrap().ok);
    // ...but editing one is not.
    let mut cp: Checkpoint = serde_json::from_str(&first).unwrap();
    cp.seq = 3;
    std::fs::write(&path, serde_json::to_string(&cp).unwrap() + "\n").unwrap();
    assert!(first_bad(dir.path()).reason.contains("checkpoint chain"));
}

#[test]
fn rotation_keeps_the_chain_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = AuditLog::open(dir.path(), &config(1000)).unwrap();
    let big = "x".repeat(300 * 1024);
    for _ in 0..8 {
        log.append(
            "request.submitted",
            Some(0),
            None,
            None,
            serde_json::json!({ "text": big }),
        )
        .unwrap();
    }
    drop(log);
    let v = verify(dir.path()).unwrap();
    assert!(v.ok, "{v:?}");
    assert!(v.files >= 2, "{v:?}");
    assert!(v.checkpoints >= 1, "rotation writes a checkpoint: {v:?}");
    // Removing the oldest file is detected: the chain no longer starts at entry 1.
    std::fs::remove_file(log_path(dir.path())).unwrap();
    assert!(first_bad(dir.path()).reason.contains("missing"));
}
