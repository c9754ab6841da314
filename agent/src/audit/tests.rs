use super::*;

/// The audit settings of a test whose log is in `dir`, a temporary directory of its
/// own: the anchors go there too (the log's own files are `log-N.jsonl`,
/// `checkpoints.jsonl` and `HEAD`), so no two tests share them and none is left behind.
fn config(dir: &Path, checkpoint_every: u64) -> AuditConfig {
    AuditConfig {
        checkpoint_every,
        rotate_mib: 1,
        anchor_file: dir.join("anchors.jsonl"),
        journal: false,
    }
}

fn verify(dir: &Path) -> Result<Verification, AuditError> {
    super::verify(dir, &VerifyOptions::default())
}

fn write(dir: &Path, n: u64, checkpoint_every: u64) {
    let mut log = AuditLog::open(dir, &config(dir, checkpoint_every)).unwrap();
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
    let mut log = AuditLog::open(dir.path(), &config(dir.path(), 1000)).unwrap();
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

/// Rewrite the log in `dir` consistently with one detail changed: every hash,
/// checkpoint and HEAD recomputed — what someone who can write the log directory,
/// but not the anchors, could do.
fn rewrite_consistently(dir: &Path) {
    let entries: Vec<Entry> = lines(dir)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let scratch = tempfile::tempdir().unwrap();
    let forged = scratch.path().join("log");
    let cfg = AuditConfig {
        anchor_file: scratch.path().join("forged-anchors.jsonl"),
        ..config(scratch.path(), 4)
    };
    let mut log = AuditLog::open(&forged, &cfg).unwrap();
    for e in &entries {
        let mut detail = e.detail.clone();
        if e.seq == 2 {
            detail["argv"] = serde_json::json!(["rm", "-rf", "/"]);
        }
        log.append(&e.event, e.uid, e.request.as_deref(), e.action, detail)
            .unwrap();
    }
    drop(log);
    for f in std::fs::read_dir(dir).unwrap().flatten() {
        std::fs::remove_file(f.path()).unwrap();
    }
    for f in std::fs::read_dir(&forged).unwrap().flatten() {
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
}

/// Drop the last `n` entries and make HEAD and the checkpoints agree.
fn drop_tail_consistently(dir: &Path, n: usize) {
    let mut kept = lines(dir);
    kept.truncate(kept.len() - n);
    save(dir, &kept);
    let last: Entry = serde_json::from_str(kept.last().unwrap()).unwrap();
    std::fs::write(
        dir.join("HEAD"),
        format!("{:020} {}\n", last.seq, last.hash),
    )
    .unwrap();
    let checkpoints: Vec<String> = std::fs::read_to_string(dir.join("checkpoints.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| serde_json::from_str::<Checkpoint>(l).unwrap().seq <= last.seq)
        .map(str::to_owned)
        .collect();
    std::fs::write(dir.join("checkpoints.jsonl"), checkpoints.join("\n") + "\n").unwrap();
}

#[test]
fn a_consistent_rewrite_or_a_dropped_tail_is_caught_by_the_anchors() {
    for forge in ["rewrite", "drop"] {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("audit");
        let cfg = config(root.path(), 4);
        let mut log = AuditLog::open(&dir, &cfg).unwrap();
        for i in 0..10 {
            log.append(
                "action.finished",
                Some(1000),
                Some("r"),
                Some(i),
                serde_json::json!({"argv": ["ls"]}),
            )
            .unwrap();
        }
        drop(log);
        let options = VerifyOptions::of(&cfg);
        assert!(super::verify(&dir, &options).unwrap().ok);
        if forge == "rewrite" {
            rewrite_consistently(&dir);
        } else {
            drop_tail_consistently(&dir, 3);
        }
        // The log alone looks fine; against the anchors it does not.
        assert!(
            verify(&dir).unwrap().ok,
            "the {forge} forgery is not consistent"
        );
        let v = super::verify(&dir, &options).unwrap();
        assert!(!v.ok, "{v:?}");
        let reason = v.first_bad.unwrap().reason;
        let want = if forge == "rewrite" {
            "the log was rewritten"
        } else {
            "entries were dropped"
        };
        assert!(reason.contains(want), "{forge}: {reason}");
    }
}

#[test]
fn an_entry_that_cannot_be_anchored_is_an_error() {
    let root = tempfile::tempdir().unwrap();
    let cfg = config(root.path(), 4);
    let mut log = AuditLog::open(&root.path().join("audit"), &cfg).unwrap();
    log.append("a", None, None, None, serde_json::json!({}))
        .unwrap();
    // /dev/full: every write fails with ENOSPC, as on a full disk.
    log.anchors.file = std::fs::OpenOptions::new()
        .append(true)
        .open("/dev/full")
        .unwrap();
    assert!(
        log.append("b", None, None, None, serde_json::json!({}))
            .is_err()
    );
}

#[test]
fn only_the_writers_journal_entries_anchor_the_log() {
    // What `journalctl -o json` prints: the agent's own anchor (root), one another user
    // sent with `logger --journald` carrying the same fields, and one for another log.
    let entry = |uid: u32, log: &str, seq: u64, hash: &str| {
        serde_json::json!({
            "_UID": uid.to_string(),
            "DEVOS_AUDIT_LOG": log,
            "DEVOS_AUDIT_SEQ": seq.to_string(),
            "DEVOS_AUDIT_HASH": hash,
        })
        .to_string()
    };
    let journal = [
        entry(0, "/var/lib/devos/audit", 1, "aa"),
        entry(1000, "/var/lib/devos/audit", 1, "forged"),
        entry(1000, "/var/lib/devos/audit", 99, "forged"),
        entry(0, "/elsewhere", 2, "bb"),
        "not json".to_owned(),
    ]
    .join("\n");
    let anchors = anchors_in_journal(&journal, "/var/lib/devos/audit", 0);
    assert_eq!(anchors.len(), 1, "{anchors:?}");
    assert_eq!((anchors[0].0.seq, anchors[0].0.hash.as_str()), (1, "aa"));
}

/// A log of `n` entries with anchors beside it, verified once: its directory, the
/// options that resume from that verification, and the anchor file.
fn verified(root: &Path, n: u64) -> (PathBuf, AuditConfig, VerifyOptions) {
    let dir = root.join("audit");
    let cfg = config(root, 4);
    append(&dir, &cfg, n);
    let v = super::verify(&dir, &VerifyOptions::of(&cfg)).unwrap();
    assert!(v.ok && v.resumed_after.is_none(), "{v:?}");
    let options = VerifyOptions {
        resume: v.mark,
        ..VerifyOptions::of(&cfg)
    };
    (dir, cfg, options)
}

fn append(dir: &Path, cfg: &AuditConfig, n: u64) {
    let mut log = AuditLog::open(dir, cfg).unwrap();
    for i in 0..n {
        log.append(
            "e",
            Some(1000),
            None,
            Some(i as u32),
            serde_json::json!({"i": i}),
        )
        .unwrap();
    }
}

#[test]
fn a_verification_resumes_after_the_last_and_reads_only_what_came_since() {
    let root = tempfile::tempdir().unwrap();
    let (dir, cfg, options) = verified(root.path(), 10);
    assert_eq!(options.resume.as_ref().unwrap().seq, 10);
    // Nothing new: only the marked entry is read again.
    let v = super::verify(&dir, &options).unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!((v.resumed_after, v.entries, v.anchors), (Some(10), 10, 0));
    // Across a rotation (1 MiB files) and more checkpoints.
    append(&dir, &cfg, 6000);
    let v = super::verify(&dir, &options).unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.entries, 6010);
    assert!(v.files >= 2, "{v:?}");
    assert_eq!(v.anchors, 6000);
    assert_eq!(v.checkpoints, 6008 / 4 - 10 / 4 + v.files - 1, "{v:?}");
    // Resuming from that mark in turn, and a full verification, agree.
    let next = VerifyOptions {
        resume: v.mark.clone(),
        ..options.clone()
    };
    assert!(super::verify(&dir, &next).unwrap().ok);
    let full = super::verify(&dir, &VerifyOptions::of(&cfg)).unwrap();
    assert!(full.ok && full.resumed_after.is_none(), "{full:?}");
    assert_eq!((full.entries, full.last_hash), (v.entries, v.last_hash));
}

#[test]
fn a_resumed_verification_still_finds_what_changed_after_the_mark_or_the_mark_itself() {
    type Tamper = fn(&Path, &Path);
    let cases: [(&str, Tamper, &str); 6] = [
        (
            "an edit after the mark",
            |dir, _| {
                let mut l = lines(dir);
                l[12] = l[12].replace("\"event\":\"e\"", "\"event\":\"x\"");
                save(dir, &l);
            },
            "edited",
        ),
        (
            "the marked entry rewritten, with a hash that fits",
            |dir, _| {
                let mut l = lines(dir);
                let mut e: Entry = serde_json::from_str(&l[9]).unwrap();
                e.event = "x".into();
                e.hash = e.compute_hash();
                l[9] = serde_json::to_string(&e).unwrap();
                save(dir, &l);
            },
            "when last verified",
        ),
        (
            "the log cut below the mark",
            |dir, _| {
                let l = lines(dir);
                save(dir, &l[..5]);
            },
            "when last verified: the log was truncated",
        ),
        (
            "the log files removed",
            |dir, _| {
                std::fs::remove_file(log_path(dir)).unwrap();
            },
            "is gone",
        ),
        (
            "checkpoints removed",
            |dir, _| {
                std::fs::write(dir.join("checkpoints.jsonl"), "").unwrap();
            },
            "checkpoints were removed",
        ),
        (
            "an anchor after the mark that does not match",
            |_, anchors| {
                let mut text = std::fs::read_to_string(anchors).unwrap();
                let last = text.lines().last().unwrap().to_owned();
                let forged = serde_json::json!({"seq": 14, "hash": "00", "log": serde_json::from_str::<serde_json::Value>(&last).unwrap()["log"]});
                text.push_str(&format!("{forged}\n"));
                std::fs::write(anchors, text).unwrap();
            },
            "differs from its anchor",
        ),
    ];
    let cases = cases.into_iter().chain([
        (
            "the anchor file cut",
            (|_, anchors| std::fs::write(anchors, "").unwrap()) as Tamper,
            "it was cut or replaced",
        ),
        (
            "the anchor file replaced by a longer one",
            |_, anchors| {
                // Every anchor still there, a line of another log's before them: the
                // bytes at the mark are no longer the anchor read there.
                let text = std::fs::read_to_string(anchors).unwrap();
                let other = r#"{"seq":1,"hash":"00","log":"other"}"#;
                std::fs::write(anchors, format!("{other}\n{text}")).unwrap();
            },
            "no longer holds the anchor that ended at byte",
        ),
    ]);
    for (what, tamper, want) in cases {
        let root = tempfile::tempdir().unwrap();
        let (dir, cfg, options) = verified(root.path(), 10);
        append(&dir, &cfg, 5);
        assert!(super::verify(&dir, &options).unwrap().ok, "{what}");
        tamper(&dir, &cfg.anchor_file);
        let v = super::verify(&dir, &options).unwrap();
        assert!(!v.ok, "{what}: not found");
        let reason = v.first_bad.unwrap().reason;
        assert!(reason.contains(want), "{what}: {reason}");
    }
}

#[test]
fn an_edit_before_the_mark_is_left_to_a_full_verification() {
    let root = tempfile::tempdir().unwrap();
    let (dir, cfg, options) = verified(root.path(), 10);
    let mut l = lines(&dir);
    // (The same length: the marked entry stays where it was.)
    l[2] = l[2].replace("\"i\":2", "\"i\":7");
    save(&dir, &l);
    assert!(super::verify(&dir, &options).unwrap().ok);
    let full = super::verify(&dir, &VerifyOptions::of(&cfg)).unwrap();
    assert!(!full.ok && full.first_bad.unwrap().seq == Some(3));
}

/// Every value the agent records reads back to the bytes it was hashed as: costs
/// (floats whose shortest form a parser one step off would change), the extremes of
/// integers, strings that need escapes. A log that fails its own verification would
/// fail the boot check and the health signal.
#[test]
fn every_value_the_agent_records_verifies_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = AuditLog::open(dir.path(), &config(dir.path(), 1000)).unwrap();
    let config = crate::config::ModelConfig::default();
    let mut values = Vec::new();
    for model in config.prices.keys() {
        for input in (1..2000).step_by(7) {
            for output in [1, 8, 13, 97, 4096] {
                let usage = crate::model::bedrock::Usage {
                    input,
                    output,
                    ..Default::default()
                };
                values.push(serde_json::json!(crate::model::cost(
                    &config, model, &usage
                )));
            }
        }
    }
    // Floats across the whole range, from their bits.
    let mut bits = 0x9e37_79b9_7f4a_7c15_u64;
    for _ in 0..5000 {
        bits ^= bits << 13;
        bits ^= bits >> 7;
        bits ^= bits << 17;
        let f = f64::from_bits(bits);
        if f.is_finite() {
            values.push(serde_json::json!(f));
        }
    }
    values.extend([
        serde_json::json!(0.000_205_000_000_000_000_02),
        serde_json::json!(f64::MIN_POSITIVE),
        serde_json::json!(f64::MAX),
        serde_json::json!(5e-324),
        serde_json::json!(u64::MAX),
        serde_json::json!(i64::MIN),
        serde_json::json!("tab\t nul\u{0} bidi\u{202e} emoji 🙂 quote\" backslash\\ \u{7f}"),
    ]);
    let n = values.len() as u64;
    for chunk in values.chunks(200) {
        log.append(
            "model.called",
            Some(1000),
            Some("r1"),
            None,
            serde_json::json!({"values": chunk}),
        )
        .unwrap();
    }
    let v = verify(dir.path()).unwrap();
    assert!(v.ok, "{:?}", v.first_bad);
    assert_eq!(v.entries, n.div_ceil(200));
}

#[test]
fn each_users_bytes_today_are_read_back_when_the_log_is_opened_again() {
    let dir = tempfile::tempdir().unwrap();
    let append = |log: &mut AuditLog, uid: Option<u32>, bytes: usize| {
        let detail = serde_json::json!({"output": "x".repeat(bytes)});
        log.append("action.finished", uid, Some("r1"), Some(1), detail)
            .unwrap();
    };
    // Yesterday's entry does not count today.
    let mut log = AuditLog::open(dir.path(), &config(dir.path(), 4)).unwrap();
    append(&mut log, Some(1000), 100);
    drop(log);
    let today = now()[..10].to_owned();
    let l = lines(dir.path());
    save(dir.path(), &[l[0].replace(&today, "2000-01-01")]);

    let mut log = AuditLog::open(dir.path(), &config(dir.path(), 4)).unwrap();
    assert_eq!(log.written_today(1000), 0);
    // Enough to rotate (1 MiB files here): today's entries span two files.
    for _ in 0..6 {
        append(&mut log, Some(1000), 300 << 10);
        append(&mut log, Some(1001), 10);
        append(&mut log, None, 10);
    }
    assert!(dir.path().join(log_name(2)).exists());
    let counted = (log.written_today(1000), log.written_today(1001));
    assert!(counted.0 > 6 * (300 << 10) && counted.1 > 0, "{counted:?}");
    drop(log);

    let mut log = AuditLog::open(dir.path(), &config(dir.path(), 4)).unwrap();
    assert_eq!((log.written_today(1000), log.written_today(1001)), counted);
    assert_eq!(log.written_today(0), 0);
    // The chain goes on from where it was.
    append(&mut log, Some(1001), 10);
    assert!(
        verify(dir.path())
            .unwrap()
            .first_bad
            .is_some_and(|b| b.seq == Some(1))
    );
}

/// Entry `seq` as `append` would write it after the last one in `dir` (without its
/// newline), with text whose characters take several bytes.
fn next_line(dir: &Path, seq: u64) -> Vec<u8> {
    let last: Entry = serde_json::from_str(lines(dir).last().unwrap()).unwrap();
    let mut entry = Entry {
        seq,
        time: now(),
        prev: last.hash,
        event: "action.finished".into(),
        uid: Some(1000),
        request: Some("r1".into()),
        action: Some(0),
        detail: serde_json::json!({ "output": "é🙂".repeat(40) }),
        hash: String::new(),
    };
    entry.hash = entry.compute_hash();
    serde_json::to_vec(&entry).unwrap()
}

fn append_bytes(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(bytes).unwrap();
}

#[test]
fn a_half_written_last_line_is_cut_and_the_cut_is_on_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 10, 4);
    let whole = std::fs::read(log_path(dir.path())).unwrap();
    // The agent died writing entry 11, inside a character: the tail is not UTF-8.
    let line = next_line(dir.path(), 11);
    let keep = (line.len() / 2..line.len())
        .find(|k| std::str::from_utf8(&line[..*k]).is_err())
        .unwrap();
    let half = &line[..keep];
    append_bytes(&log_path(dir.path()), half);
    assert!(!verify(dir.path()).unwrap().ok);

    // Opening cuts it off and records the cut; the log verifies, and goes on.
    let mut log = AuditLog::open(dir.path(), &config(dir.path(), 4)).unwrap();
    assert_eq!(log.entries(), 11);
    log.append("e", None, None, None, serde_json::json!({}))
        .unwrap();
    drop(log);
    let text = std::fs::read(log_path(dir.path())).unwrap();
    assert_eq!(
        text[..whole.len()],
        whole[..],
        "whole lines stay as they were"
    );
    let repaired: Entry = serde_json::from_str(&lines(dir.path())[10]).unwrap();
    assert_eq!(repaired.event, "audit.repaired");
    assert_eq!(
        repaired.detail,
        serde_json::json!({ "cut": [{
            "file": "log-000001.jsonl",
            "bytes": keep,
            "sha256": hex::encode(Sha256::digest(half)),
        }]})
    );
    let v = verify(dir.path()).unwrap();
    assert!(v.ok, "{:?}", v.first_bad);
    assert_eq!(v.entries, 12);
    // A log that ends in a whole line is left as it is.
    drop(AuditLog::open(dir.path(), &config(dir.path(), 4)).unwrap());
    assert_eq!(lines(dir.path()).len(), 12);
}

#[test]
fn a_log_that_is_only_a_half_line_opens_empty_again() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(log_path(dir.path()), b"{\"seq\":1,\"time\":\"20").unwrap();
    let log = AuditLog::open(dir.path(), &config(dir.path(), 4)).unwrap();
    assert_eq!(log.entries(), 1);
    drop(log);
    let l = lines(dir.path());
    assert_eq!(l.len(), 1);
    let repaired: Entry = serde_json::from_str(&l[0]).unwrap();
    assert_eq!(
        (repaired.event.as_str(), repaired.prev.as_str()),
        ("audit.repaired", GENESIS)
    );
    assert!(verify(dir.path()).unwrap().ok);
}

#[test]
fn a_half_written_checkpoint_is_cut_too() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 8, 4);
    let path = dir.path().join("checkpoints.jsonl");
    let first = std::fs::read_to_string(&path).unwrap();
    append_bytes(&path, &first.as_bytes()[..first.len() / 3]);
    assert!(!verify(dir.path()).unwrap().ok);
    // The next checkpoint would have gone after the half line.
    write(dir.path(), 4, 4);
    assert!(std::fs::read_to_string(&path).unwrap().starts_with(&first));
    let v = verify(dir.path()).unwrap();
    assert!(v.ok, "{:?}", v.first_bad);
    assert_eq!((v.entries, v.checkpoints), (13, 3));
    let repaired: Entry = serde_json::from_str(&lines(dir.path())[8]).unwrap();
    assert_eq!(repaired.event, "audit.repaired");
    assert_eq!(repaired.detail["cut"][0]["file"], "checkpoints.jsonl");

    // A checkpoint that is not even UTF-8 before the end is not repaired: the log still
    // opens, and verification finds it.
    let mut text = std::fs::read(&path).unwrap();
    text[10] = 0xff;
    std::fs::write(&path, &text).unwrap();
    write(dir.path(), 1, 4);
    let bad = first_bad(dir.path());
    assert_eq!(
        (bad.file.as_str(), bad.line),
        ("checkpoints.jsonl", 1),
        "{bad:?}"
    );
    assert!(bad.reason.contains("not a valid checkpoint"), "{bad:?}");
}

#[test]
fn a_line_cut_short_before_the_end_is_still_tampering() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 10, 4);
    let mut l = lines(dir.path());
    let half = l[4].len() / 2;
    l[4].truncate(half);
    save(dir.path(), &l);
    // Opening repairs only a half line at the very end: this one stays, and is found.
    write(dir.path(), 1, 4);
    let bad = first_bad(dir.path());
    assert_eq!(bad.line, 5, "{bad:?}");
    assert!(bad.reason.contains("not a valid entry"), "{bad:?}");
    // Nor is a half line at the end of an earlier file repaired.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 3, 4);
    let mut text = std::fs::read(log_path(dir.path())).unwrap();
    text.truncate(text.len() - 10);
    std::fs::write(log_path(dir.path()), &text).unwrap();
    std::fs::write(dir.path().join(log_name(2)), b"").unwrap();
    write(dir.path(), 1, 4);
    let bad = first_bad(dir.path());
    assert_eq!(
        (bad.file.as_str(), bad.line),
        ("log-000001.jsonl", 3),
        "{bad:?}"
    );
}

#[test]
fn a_durable_append_is_on_disk_when_it_returns_and_others_wait_for_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = AuditLog::open(dir.path(), &config(dir.path(), 4)).unwrap();
    let detail = || serde_json::json!({});
    log.append("request.submitted", Some(1000), Some("r1"), None, detail())
        .unwrap();
    assert_eq!(log.durable(), 0, "an ordinary append is not synced");
    let started = log
        .append_durable("action.started", Some(1000), Some("r1"), Some(0), detail())
        .unwrap();
    assert_eq!(started, 2);
    assert_eq!(
        log.durable(),
        2,
        "a durable append is synced, with all before it"
    );
    // (As a reader opening the file sees it.)
    let last: Entry = serde_json::from_str(lines(dir.path()).last().unwrap()).unwrap();
    assert_eq!((last.seq, last.event.as_str()), (2, "action.started"));
    log.append("action.finished", Some(1000), Some("r1"), Some(0), detail())
        .unwrap();
    assert_eq!(log.durable(), 2);
    // The checkpoint (every 4 entries) syncs what came before it.
    log.append("request.finished", Some(1000), Some("r1"), None, detail())
        .unwrap();
    assert_eq!(log.durable(), 4);
    // In a new file after a rotation too.
    log.rotate().unwrap();
    log.append_durable("rule.added", Some(1000), None, None, detail())
        .unwrap();
    assert_eq!(log.durable(), 5);
    assert!(!log.new_file, "the new file's name was not synced");
    drop(log);
    assert!(verify(dir.path()).unwrap().ok);
}
