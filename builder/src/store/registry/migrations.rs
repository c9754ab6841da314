//! The registry's schema, as forward migrations.

/// Forward migrations; migration `i` takes the schema from version `i` to `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: images, versions, artifacts, stage timings, files.
    "CREATE TABLE images (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE versions (
        id INTEGER PRIMARY KEY,
        image_id INTEGER NOT NULL REFERENCES images(id),
        version TEXT NOT NULL,
        build_id TEXT NOT NULL,
        dir TEXT NOT NULL,
        spec TEXT NOT NULL,
        manifest TEXT NOT NULL,
        built_at INTEGER NOT NULL,
        -- 'built', or 'removed' once `image gc` deleted its artifacts.
        state TEXT NOT NULL DEFAULT 'built',
        UNIQUE (image_id, version)
    );
    CREATE TABLE artifacts (
        version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
        file TEXT NOT NULL,
        format TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        PRIMARY KEY (version_id, file)
    );
    CREATE TABLE stage_timings (
        version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        stage TEXT NOT NULL,
        seconds REAL NOT NULL,
        PRIMARY KEY (version_id, seq)
    );
    CREATE TABLE files (
        version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
        path TEXT NOT NULL,
        kind TEXT NOT NULL,
        mode INTEGER NOT NULL,
        uid INTEGER NOT NULL,
        gid INTEGER NOT NULL,
        size INTEGER NOT NULL,
        mtime INTEGER NOT NULL,
        -- sha256 for regular files, the target for symlinks, else empty.
        content TEXT NOT NULL,
        PRIMARY KEY (version_id, path)
    ) WITHOUT ROWID;",
    // 2: boot-test runs, AMI publications and fleet rollouts.
    "CREATE TABLE test_runs (
        id INTEGER PRIMARY KEY,
        version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
        started_at INTEGER NOT NULL,
        passed INTEGER NOT NULL,
        accelerator TEXT NOT NULL,
        seconds REAL NOT NULL,
        report TEXT NOT NULL
    );
    CREATE TABLE publications (
        id INTEGER PRIMARY KEY,
        version_id INTEGER NOT NULL REFERENCES versions(id),
        region TEXT NOT NULL,
        snapshot_id TEXT,
        ami_id TEXT,
        state TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE rollouts (
        id INTEGER PRIMARY KEY,
        stack TEXT NOT NULL,
        region TEXT NOT NULL,
        from_version_id INTEGER REFERENCES versions(id),
        to_version_id INTEGER NOT NULL REFERENCES versions(id),
        state TEXT NOT NULL,
        reason TEXT,
        started_at INTEGER NOT NULL,
        finished_at INTEGER
    );",
    // 3: publications know their kind (ami, packer), SSM parameter and last change;
    // one row per version, region and kind.
    "ALTER TABLE publications ADD COLUMN kind TEXT NOT NULL DEFAULT 'ami';
    ALTER TABLE publications ADD COLUMN parameter TEXT;
    ALTER TABLE publications ADD COLUMN updated_at INTEGER;
    CREATE UNIQUE INDEX publications_once ON publications (version_id, region, kind);",
    // 4: rollouts know their kind (deploy, rollout, rollback, auto-rollback) and how
    // long the stack call took to issue; versions that failed their gate on a stack
    // are marked bad there.
    "ALTER TABLE rollouts ADD COLUMN kind TEXT NOT NULL DEFAULT 'rollout';
    ALTER TABLE rollouts ADD COLUMN issued_after REAL;
    CREATE TABLE bad_versions (
        stack TEXT NOT NULL,
        region TEXT NOT NULL,
        version_id INTEGER NOT NULL REFERENCES versions(id),
        reason TEXT NOT NULL,
        marked_at INTEGER NOT NULL,
        UNIQUE (stack, region, version_id)
    );",
    // 5: what a change set the parameters it gave to before (a JSON object), so that
    // judging it again after an interruption can put them back.
    "ALTER TABLE rollouts ADD COLUMN parameters_before TEXT;",
    // 6: which raw image a boot test booted, so that a version rebuilt to other bytes
    // (`--force`) is not taken as tested. Earlier runs are taken to be of the bytes
    // the version has now.
    "ALTER TABLE test_runs ADD COLUMN raw_sha256 TEXT;
    UPDATE test_runs SET raw_sha256 =
      (SELECT a.sha256 FROM artifacts a WHERE a.version_id = test_runs.version_id AND a.format = 'raw');",
];

pub(crate) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;
