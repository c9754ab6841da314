use super::*;
use crate::model::manifest::{Artifact, CacheKeys, Manifest, Package, StageTiming};
use crate::model::spec::Format;
use crate::model::states::{ChangeState, PublicationState};
use crate::support::digest::FileEntry;

pub(crate) fn manifest(version: &str, packages: &[(&str, &str)]) -> Manifest {
    Manifest {
        name: "devos-test".into(),
        version: version.into(),
        build_id: format!("{version}-id"),
        description: String::new(),
        distro: "debian".into(),
        suite: "bookworm".into(),
        builder_version: "0.1.0".into(),
        source_date_epoch: 1_700_000_000,
        kernel_cmdline: String::new(),
        root_hash: None,
        update: Vec::new(),
        update_feed: None,
        secure_boot: None,
        inputs: Vec::new(),
        package_sources: "host".into(),
        agent: None,
        users: Vec::new(),
        packages: packages
            .iter()
            .map(|(n, v)| Package {
                name: (*n).into(),
                version: (*v).into(),
            })
            .collect(),
        partitions: Vec::new(),
        artifacts: vec![Artifact {
            file: format!("devos-test-{version}.raw"),
            format: Format::Raw,
            sha256: "ab".repeat(32),
            size: 1 << 30,
            used_bytes: 300 << 20,
        }],
        stages: vec![StageTiming {
            name: "rootfs".into(),
            seconds: 40.5,
        }],
        cache_keys: CacheKeys::default(),
    }
}

fn file(path: &str, content: &str) -> FileEntry {
    FileEntry {
        path: path.into(),
        kind: 'f',
        mode: 0o644,
        uid: 0,
        gid: 0,
        size: content.len() as u64,
        mtime: 1,
        content: content.into(),
    }
}

/// Record a build of devos-test@`version` holding `files`.
fn record(reg: &mut Registry, version: &str, files: &[FileEntry]) {
    reg.record_build(
        Path::new("/o"),
        Path::new("s"),
        &manifest(version, &[]),
        files,
    )
    .unwrap();
}

#[test]
fn round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("reg/registry.db");
    let mut reg = Registry::open(&path).unwrap();
    assert_eq!(reg.schema_version().unwrap(), SCHEMA_VERSION);
    let m = manifest("0.1.0+aaa", &[("bash", "5.2")]);
    let files = vec![file("/etc/a", "1"), file("/etc/b", "2")];
    reg.record_build(Path::new("/out/a"), Path::new("spec.toml"), &m, &files)
        .unwrap();
    // Idempotent: recording the same version again replaces its rows.
    reg.record_build(Path::new("/out/a"), Path::new("spec.toml"), &m, &files)
        .unwrap();
    drop(reg);

    let reg = Registry::open(&path).unwrap();
    let all = reg.versions(None).unwrap();
    assert_eq!(all.len(), 1);
    let v = reg.find("devos-test@0.1.0+aaa").unwrap();
    assert_eq!(v.artifacts.len(), 1);
    assert_eq!(v.artifacts[0].sha256, "ab".repeat(32));
    assert_eq!(reg.files(&v).unwrap(), files);
    let back = reg.manifest(&v).unwrap();
    assert_eq!(back.packages.len(), 1);
    assert_eq!(back.stages[0].seconds, 40.5);
    assert_eq!(v.tested, None);
    // A spec given relative to the build's directory is kept absolute.
    assert_eq!(
        Path::new(&v.spec),
        std::env::current_dir().unwrap().join("spec.toml")
    );
}

#[test]
fn references_and_test_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut reg = Registry::open(&tmp.path().join("r.db")).unwrap();
    for v in ["0.1.0+aaa111", "0.1.0+bbb222"] {
        reg.record_build(Path::new("/o"), Path::new("s"), &manifest(v, &[]), &[])
            .unwrap();
    }
    assert_eq!(
        reg.find("devos-test@0.1.0+b").unwrap().version,
        "0.1.0+bbb222"
    );
    let err = reg.find("devos-test@0.1.0").unwrap_err().to_string();
    assert!(err.contains("matches 2 versions"), "{err}");
    let err = reg.find("nope").unwrap_err().to_string();
    assert!(err.contains("known images: devos-test"), "{err}");
    let err = reg.find("devos-test@9.9.9").unwrap_err().to_string();
    assert!(err.contains("image list devos-test"), "{err}");
    // An empty version is no prefix of every version: it is refused, with what to give.
    let err = reg.find("devos-test@").unwrap_err().to_string();
    assert!(
        err.contains("`devos-test@` names no version after the `@`")
            && err.contains("\n  hint: give NAME@VERSION"),
        "{err}"
    );
    let err = reg.find("@0.1.0").unwrap_err().to_string();
    assert!(err.contains("names no image before the `@`"), "{err}");

    let run = TestRun {
        started_at: 5,
        passed: true,
        accelerator: "tcg".into(),
        seconds: 30.0,
        raw_sha256: None,
        failure: None,
    };
    let booted = Booted {
        file: "devos-test-0.1.0+aaa111.raw",
        sha256: &"ab".repeat(32),
    };
    // A version the registry does not hold: nothing recorded, and said so.
    for (version, held) in [("0.1.0+aaa111", true), ("9.9.9+ccc333", false)] {
        let recorded =
            reg.record_test("devos-test", version, &run, &booted, &serde_json::json!({}));
        assert_eq!(recorded.unwrap(), held, "{version}");
    }
    let v = reg.find("devos-test@0.1.0+aaa111").unwrap();
    assert_eq!(v.tested, Some(true));
    assert_eq!(reg.test_runs(&v).unwrap().len(), 1);

    // The publish/rollout gate: untested and failed versions are refused.
    reg.require_passing("devos-test@0.1.0+aaa111").unwrap();
    let err = reg
        .require_passing("devos-test@0.1.0+bbb222")
        .unwrap_err()
        .to_string();
    assert!(err.contains("has not been boot-tested"), "{err}");
    let failed = TestRun {
        passed: false,
        started_at: 6,
        ..run
    };
    reg.record_test(
        "devos-test",
        "0.1.0+aaa111",
        &failed,
        &booted,
        &serde_json::json!({"passed": false, "failure": "check `test:x` failed: exit 3"}),
    )
    .unwrap();
    // Why it failed is kept with the run (`image show` says it); a passed run has none.
    let runs = reg
        .test_runs(&reg.find("devos-test@0.1.0+aaa111").unwrap())
        .unwrap();
    assert_eq!(
        runs.iter()
            .map(|r| r.failure.as_deref())
            .collect::<Vec<_>>(),
        [Some("check `test:x` failed: exit 3"), None]
    );
    let err = reg
        .require_passing("devos-test@0.1.0+aaa111")
        .unwrap_err()
        .to_string();
    assert!(err.contains("failed its last boot test"), "{err}");
}

#[test]
fn migrations_run_forward_and_keep_data() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("r.db");
    // A registry written by a builder that only knew schema version 1.
    let mut old = Registry::open_at(&path, 1).unwrap();
    assert_eq!(old.schema_version().unwrap(), 1);
    record(&mut old, "0.1.0+a", &[]);
    drop(old);
    // Reading it (`image list`) migrates it, the one write a reading command makes.
    let reg = Registry::open_read(&path).unwrap();
    assert_eq!(reg.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(reg.versions(None).unwrap().len(), 1);
    // The tables of later migrations exist.
    reg.conn
        .execute_batch(
            "SELECT * FROM test_runs; SELECT * FROM publications; SELECT * FROM rollouts;",
        )
        .unwrap();
}

/// Every table and its columns, in order, and every index: what a schema is.
fn schema(reg: &Registry) -> Vec<String> {
    let names: Vec<(String, String)> = reg
        .conn
        .prepare(
            "SELECT type, name FROM sqlite_master
             WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    names
        .into_iter()
        .map(|(kind, name)| {
            if kind != "table" {
                return format!("{kind} {name}");
            }
            let columns: Vec<String> = reg
                .conn
                .prepare(&format!("SELECT name FROM pragma_table_info('{name}')"))
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            format!("table {name}({})", columns.join(", "))
        })
        .collect()
}

/// What each schema version holds; a new migration adds a row here.
const SCHEMAS: &[&[&str]] = &[
    &[],
    &[
        "table artifacts(version_id, file, format, sha256, size)",
        "table files(version_id, path, kind, mode, uid, gid, size, mtime, content)",
        "table images(id, name, created_at)",
        "table stage_timings(version_id, seq, stage, seconds)",
        "table versions(id, image_id, version, build_id, dir, spec, manifest, built_at, state)",
    ],
    &[
        "table artifacts(version_id, file, format, sha256, size)",
        "table files(version_id, path, kind, mode, uid, gid, size, mtime, content)",
        "table images(id, name, created_at)",
        "table publications(id, version_id, region, snapshot_id, ami_id, state, created_at)",
        "table rollouts(id, stack, region, from_version_id, to_version_id, state, reason, started_at, finished_at)",
        "table stage_timings(version_id, seq, stage, seconds)",
        "table test_runs(id, version_id, started_at, passed, accelerator, seconds, report)",
        "table versions(id, image_id, version, build_id, dir, spec, manifest, built_at, state)",
    ],
    &[
        "index publications_once",
        "table artifacts(version_id, file, format, sha256, size)",
        "table files(version_id, path, kind, mode, uid, gid, size, mtime, content)",
        "table images(id, name, created_at)",
        "table publications(id, version_id, region, snapshot_id, ami_id, state, created_at, kind, parameter, updated_at)",
        "table rollouts(id, stack, region, from_version_id, to_version_id, state, reason, started_at, finished_at)",
        "table stage_timings(version_id, seq, stage, seconds)",
        "table test_runs(id, version_id, started_at, passed, accelerator, seconds, report)",
        "table versions(id, image_id, version, build_id, dir, spec, manifest, built_at, state)",
    ],
    &[
        "index publications_once",
        "table artifacts(version_id, file, format, sha256, size)",
        "table bad_versions(stack, region, version_id, reason, marked_at)",
        "table files(version_id, path, kind, mode, uid, gid, size, mtime, content)",
        "table images(id, name, created_at)",
        "table publications(id, version_id, region, snapshot_id, ami_id, state, created_at, kind, parameter, updated_at)",
        "table rollouts(id, stack, region, from_version_id, to_version_id, state, reason, started_at, finished_at, kind, issued_after)",
        "table stage_timings(version_id, seq, stage, seconds)",
        "table test_runs(id, version_id, started_at, passed, accelerator, seconds, report)",
        "table versions(id, image_id, version, build_id, dir, spec, manifest, built_at, state)",
    ],
    &[
        "index publications_once",
        "table artifacts(version_id, file, format, sha256, size)",
        "table bad_versions(stack, region, version_id, reason, marked_at)",
        "table files(version_id, path, kind, mode, uid, gid, size, mtime, content)",
        "table images(id, name, created_at)",
        "table publications(id, version_id, region, snapshot_id, ami_id, state, created_at, kind, parameter, updated_at)",
        "table rollouts(id, stack, region, from_version_id, to_version_id, state, reason, started_at, finished_at, kind, issued_after, parameters_before)",
        "table stage_timings(version_id, seq, stage, seconds)",
        "table test_runs(id, version_id, started_at, passed, accelerator, seconds, report)",
        "table versions(id, image_id, version, build_id, dir, spec, manifest, built_at, state)",
    ],
    &[
        "index publications_once",
        "table artifacts(version_id, file, format, sha256, size)",
        "table bad_versions(stack, region, version_id, reason, marked_at)",
        "table files(version_id, path, kind, mode, uid, gid, size, mtime, content)",
        "table images(id, name, created_at)",
        "table publications(id, version_id, region, snapshot_id, ami_id, state, created_at, kind, parameter, updated_at)",
        "table rollouts(id, stack, region, from_version_id, to_version_id, state, reason, started_at, finished_at, kind, issued_after, parameters_before)",
        "table stage_timings(version_id, seq, stage, seconds)",
        "table test_runs(id, version_id, started_at, passed, accelerator, seconds, report, raw_sha256)",
        "table versions(id, image_id, version, build_id, dir, spec, manifest, built_at, state)",
    ],
];

/// Each schema version has exactly its tables and columns, and a registry of any
/// version migrates to exactly the newest schema, keeping its versions.
#[test]
fn every_schema_version_has_its_tables_and_columns_and_migrates_to_the_newest() {
    assert_eq!(
        SCHEMAS.len() as i64,
        SCHEMA_VERSION + 1,
        "describe the new schema version in SCHEMAS"
    );
    let newest: Vec<String> = SCHEMAS[SCHEMAS.len() - 1]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    for (version, expected) in SCHEMAS.iter().enumerate().skip(1) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("r.db");
        let mut old = Registry::open_at(&path, version as i64).unwrap();
        assert_eq!(schema(&old), *expected, "schema version {version}");
        old.record_build(
            Path::new("/o"),
            Path::new("s"),
            &manifest("0.1.0+a", &[("bash", "5.2")]),
            &[file("/etc/hostname", "devos")],
        )
        .unwrap();
        drop(old);
        let reg = Registry::open(&path).unwrap();
        assert_eq!(schema(&reg), newest, "migrated from version {version}");
        let v = reg.find("devos-test@0.1.0+a").unwrap();
        assert_eq!(reg.files(&v).unwrap().len(), 1, "from version {version}");
    }
}

#[test]
fn a_newer_schema_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("r.db");
    drop(Registry::open(&path).unwrap());
    let conn = Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    for open in [Registry::open, Registry::open_read] {
        let err = open(&path).err().unwrap().to_string();
        assert!(err.contains("newer than this devos-build knows"), "{err}");
    }
}

#[test]
fn another_programs_database_is_refused_and_left_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("places.db");
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch("CREATE TABLE notes(x); INSERT INTO notes VALUES (1);")
        .unwrap();
    drop(conn);
    let before = std::fs::read(&path).unwrap();
    for open in [Registry::open, Registry::open_read] {
        let err = open(&path).err().unwrap().to_string();
        assert!(
            err.contains("not a devos-build registry (its tables: notes)"),
            "{err}"
        );
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file was written"
    );
    let conn = Connection::open(&path).unwrap();
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "delete");
}

#[test]
fn concurrent_writers_do_not_lose_records() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("r.db");
    drop(Registry::open(&path).unwrap());
    std::thread::scope(|s| {
        for t in 0..4 {
            let path = &path;
            s.spawn(move || {
                let mut reg = Registry::open(path).unwrap();
                for i in 0..10 {
                    let m = manifest(&format!("0.1.{t}+{i:03}"), &[("bash", "5")]);
                    reg.record_build(Path::new("/o"), Path::new("s"), &m, &[file("/x", "y")])
                        .unwrap();
                }
            });
        }
    });
    assert_eq!(
        Registry::open(&path).unwrap().versions(None).unwrap().len(),
        40
    );
}

#[test]
fn publications_are_one_row_per_version_region_and_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let mut reg = Registry::open(&tmp.path().join("r.db")).unwrap();
    record(&mut reg, "0.1.0+a", &[]);
    let v = reg.find("devos-test@0.1.0+a").unwrap();
    let mut p = Publication {
        name: v.name.clone(),
        version: v.version.clone(),
        build_id: v.build_id.clone(),
        region: "eu-west-1".into(),
        kind: "ami".into(),
        ami_id: Some("ami-1".into()),
        snapshot_ids: vec!["snap-1".into(), "snap-2".into()],
        parameter: Some("/devos/x".into()),
        state: PublicationState::Available,
        created_at: 0,
        updated_at: 0,
    };
    reg.record_publication(&v, &p).unwrap();
    p.state = PublicationState::Deregistered;
    reg.record_publication(&v, &p).unwrap();
    let all = reg.publications(Some("devos-test"), None).unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].state, PublicationState::Deregistered);
    assert_eq!(all[0].snapshot_ids, ["snap-1", "snap-2"]);
    assert!(reg.publications(Some("other"), None).unwrap().is_empty());
}

#[test]
fn one_change_of_a_stack_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("r.db");
    let mut reg = Registry::open(&path).unwrap();
    record(&mut reg, "0.1.0+a", &[]);
    let v = reg.find("devos-test@0.1.0+a").unwrap();
    // The command takes the lock before it plans; its rollout, and the automatic
    // rollback that starts, go on under it.
    reg.lock_stack("s1", "r1").unwrap();
    let first = reg.start_rollout("s1", "r1", "rollout", None, &v).unwrap();
    let back = reg
        .start_rollout("s1", "r1", "auto-rollback", None, &v)
        .unwrap();
    reg.finish_rollout(back, ChangeState::RolledBack, None)
        .unwrap();
    reg.finish_rollout(first, ChangeState::RolledBack, None)
        .unwrap();
    // Another process: the lock is a file beside the registry, held while this
    // process lives.
    let other = std::fs::File::open(tmp.path().join("r.db.fleet-s1@r1.lock")).unwrap();
    assert!(
        other.try_lock().is_err(),
        "the stack's lock was let go early"
    );
    // Another stack, or the same stack in another region, is not held up.
    let elsewhere = reg.start_rollout("s1", "r2", "rollout", None, &v).unwrap();
    reg.finish_rollout(elsewhere, ChangeState::Succeeded, None)
        .unwrap();
    // Held by another process: refused, naming it.
    let tmp2 = tempfile::tempdir().unwrap();
    let mut reg2 = Registry::open(&tmp2.path().join("r.db")).unwrap();
    let taken = std::fs::File::create(tmp2.path().join("r.db.fleet-s1@r1.lock")).unwrap();
    taken.lock().unwrap();
    let e = reg2
        .start_rollout("s1", "r1", "rollout", None, &v)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("another devos-build is changing stack s1 in r1"),
        "{e}"
    );
    // Never through a symlink.
    let target = tmp2.path().join("elsewhere");
    std::os::unix::fs::symlink(&target, tmp2.path().join("r.db.fleet-s2@r1.lock")).unwrap();
    assert!(reg2.lock_stack("s2", "r1").is_err());
    assert!(!target.exists());
}

#[test]
fn reading_an_empty_file_leaves_it_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("registry.db");
    std::fs::write(&path, "").unwrap();
    let reg = Registry::open_read(&path).unwrap();
    assert!(reg.versions(None).unwrap().is_empty());
    drop(reg);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "no -wal or -shm"
    );
}

/// The names in `dir` and the bytes of `file`: what a reader must leave as it was.
fn snapshot(dir: &Path, file: &Path) -> (Vec<std::ffi::OsString>, Vec<u8>) {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    (names, std::fs::read(file).unwrap())
}

/// A reading command opens a registry read-only: it reads what was recorded and cannot
/// write, through SQLite's locks (here, a directory it may write) and read as the file
/// it is (`immutable`: another user's directory), whatever the path is made of (a path
/// starting with `//` too); read as it is, nothing is made beside it.
#[test]
fn reading_a_registry_never_writes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a dir ?#%41 of #1");
    let path = dir.join("registry?.db");
    let mut reg = Registry::open(&path).unwrap();
    record(&mut reg, "0.1.0+a", &[]);
    drop(reg);
    let before = snapshot(&dir, &path);
    assert_eq!(before.0, ["registry?.db"]);
    let slashes = PathBuf::from(format!("/{}", path.display()));
    for (immutable, path) in [(true, &path), (true, &slashes), (false, &path)] {
        let mut reg = Registry {
            conn: connect_read_only(path, immutable).unwrap(),
            path: path.clone(),
        };
        assert_eq!(reg.versions(None).unwrap().len(), 1, "{}", path.display());
        let write = reg.record_build(
            Path::new("/o"),
            Path::new("s"),
            &manifest("0.2.0+b", &[]),
            &[],
        );
        assert!(
            format!("{:#}", write.err().unwrap()).contains("readonly"),
            "a read-only registry was written"
        );
        drop(reg);
        let after = snapshot(&dir, path);
        assert_eq!(after.1, before.1, "the registry's bytes changed");
        if immutable {
            assert_eq!(after.0, before.0, "files were made beside it");
        }
    }
    // What a reading command opens, here a directory it may write.
    assert_eq!(
        Registry::open_read(&path)
            .unwrap()
            .versions(None)
            .unwrap()
            .len(),
        1
    );
}

/// While a writer has the registry open, a reader sees what it committed (from the
/// -wal file, through SQLite's shared memory), and the writer goes on writing.
#[test]
fn a_reader_sees_what_an_open_writer_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("registry.db");
    let mut writer = Registry::open(&path).unwrap();
    record(&mut writer, "0.1.0+a", &[]);
    assert!(wal_file(&path, "-wal").metadata().unwrap().len() > 0);
    let reader = Registry::open_read(&path).unwrap();
    assert_eq!(reader.versions(None).unwrap().len(), 1);
    record(&mut writer, "0.2.0+b", &[]);
    assert_eq!(reader.versions(None).unwrap().len(), 2);
}

/// A reader that opened a closed registry is not broken by a writer that starts
/// afterwards, writes more than SQLite's checkpoint threshold and closes (which copies
/// its pages into the file under the reader): SQLite's locks keep the reader's pages.
#[test]
fn a_reader_outlives_a_writer_that_checkpoints_under_it() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("registry.db");
    record(&mut Registry::open(&path).unwrap(), "0.1.0+a", &[]);
    let reader = Registry::open_read(&path).unwrap();
    assert_eq!(reader.versions(None).unwrap().len(), 1);
    let files: Vec<FileEntry> = (0..20_000)
        .map(|i| file(&format!("/usr/share/doc/package-{i}/copyright"), "text"))
        .collect();
    record(&mut Registry::open(&path).unwrap(), "0.2.0+b", &files);
    assert_eq!(reader.versions(None).unwrap().len(), 2);
    let v = reader.find("devos-test@0.2.0+b").unwrap();
    assert_eq!(reader.files(&v).unwrap().len(), 20_000);
}

#[test]
fn a_file_that_is_no_database_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("notes.txt");
    std::fs::write(
        &path,
        "not a database, just some text that is long enough\n".repeat(20),
    )
    .unwrap();
    for e in [
        Registry::open_read(&path).err().unwrap(),
        Registry::open(&path).err().unwrap(),
    ] {
        let e = format!("{e:#}");
        assert!(
            e.contains(&format!("{} is not a registry", path.display())),
            "{e}"
        );
        assert!(
            e.contains("hint: point --registry or DEVOS_REGISTRY"),
            "{e}"
        );
    }
}

/// Record a passing boot test of devos-test@0.1.0+aaa111 that booted `file`, whose
/// sha256 is `sha` repeated to 64 digits.
fn record_pass(reg: &mut Registry, file: &str, sha: &str) -> anyhow::Result<()> {
    let run = TestRun {
        started_at: crate::support::time::now(),
        passed: true,
        accelerator: "tcg".into(),
        seconds: 1.0,
        raw_sha256: None,
        failure: None,
    };
    let booted = Booted {
        file,
        sha256: &sha.repeat(32),
    };
    reg.record_test(
        "devos-test",
        "0.1.0+aaa111",
        &run,
        &booted,
        &serde_json::json!({}),
    )
    .map(|recorded| assert!(recorded))
}

/// A boot test counts for the bytes it booted: a rebuild to other bytes (`--force`)
/// is untested until tested, one to the same bytes (reproducible) keeps its result,
/// and a test of bytes a rebuild replaced meanwhile is not recorded.
#[test]
fn a_test_counts_for_the_raw_image_it_booted() {
    let dir = tempfile::tempdir().unwrap();
    let mut reg = Registry::open(&dir.path().join("r.db")).unwrap();
    let reference = "devos-test@0.1.0+aaa111";
    let build = |reg: &mut Registry, sha: &str| {
        let mut m = manifest("0.1.0+aaa111", &[]);
        m.artifacts[0].sha256 = sha.repeat(32);
        reg.record_build(dir.path(), Path::new("images/devos-test.toml"), &m, &[])
            .unwrap();
    };
    let test = |reg: &mut Registry, sha: &str| record_pass(reg, "devos-test-0.1.0+aaa111.raw", sha);
    build(&mut reg, "ab");
    test(&mut reg, "ab").unwrap();
    assert_eq!(reg.find(reference).unwrap().tested, Some(true));
    build(&mut reg, "ab");
    assert_eq!(reg.find(reference).unwrap().tested, Some(true));
    build(&mut reg, "cd");
    assert_eq!(reg.find(reference).unwrap().tested, None);
    let err = reg.require_passing(reference).unwrap_err().to_string();
    assert!(err.contains("has not been boot-tested"), "{err}");
    let err = test(&mut reg, "ab").unwrap_err().to_string();
    assert!(
        err.contains("the version was built again meanwhile")
            && err.contains("the result is not recorded"),
        "{err}"
    );
    assert_eq!(reg.find(reference).unwrap().tested, None);
    test(&mut reg, "cd").unwrap();
    assert_eq!(reg.find(reference).unwrap().tested, Some(true));
}

/// A run is recorded only for a disk that is one of the version's artifacts byte for
/// byte (a copy whose bytes differ, or a file the build did not make, is not the
/// version), and then counts for the version's raw image, whichever format booted.
#[test]
fn a_test_is_recorded_only_for_the_versions_own_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut reg = Registry::open(&dir.path().join("r.db")).unwrap();
    let reference = "devos-test@0.1.0+aaa111";
    let mut m = manifest("0.1.0+aaa111", &[]);
    m.artifacts.push(Artifact {
        file: "devos-test-0.1.0+aaa111.qcow2".into(),
        format: Format::Qcow2,
        sha256: "cd".repeat(32),
        size: 1 << 28,
        used_bytes: 1 << 28,
    });
    reg.record_build(dir.path(), Path::new("images/devos-test.toml"), &m, &[])
        .unwrap();
    let mut test =
        |file: &str, sha: &str| record_pass(&mut reg, file, sha).map_err(|e| e.to_string());
    let err = test("devos-test-0.1.0+aaa111.raw", "ef").unwrap_err();
    assert!(
        err.contains("this is another copy") && err.contains("the result is not recorded"),
        "{err}"
    );
    let err = test("other.raw", "ab").unwrap_err();
    assert!(
        err.contains(
            "`other.raw`, which this test booted, is not one of devos-test@0.1.0+aaa111's artifacts"
        ),
        "{err}"
    );
    let err = test("devos-test-0.1.0+aaa111.qcow2", "ab").unwrap_err();
    assert!(err.contains("another copy"), "{err}");
    test("devos-test-0.1.0+aaa111.qcow2", "cd").unwrap();
    let v = reg.find(reference).unwrap();
    assert_eq!(v.tested, Some(true));
    let runs = reg.test_runs(&v).unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].raw_sha256, Some("ab".repeat(32)));
}
