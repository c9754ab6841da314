//! The tamper-evident audit log: append-only JSON lines, each entry carrying the hash
//! of the one before it, with checkpoints and a head record kept beside the log so
//! that edits, reorders, deletions and truncation are all detected.
//!
//! Layout under `DIR` (`state-dir/audit`): `log-NNNNNN.jsonl` files (a new one when the
//! current passes `rotate-mib`; the chain runs across files), `checkpoints.jsonl`
//! (every `checkpoint-every` entries and at each rotation: sequence number, entry hash,
//! and the hash of the previous checkpoint) and `HEAD` (the last sequence number and
//! hash, rewritten in place on every append).
//!
//! The head is also anchored outside the log directory, on every append: a line in
//! `[audit] anchor-file` and, where systemd's journal runs, a journal entry with the
//! sequence number and hash (`DEVOS_AUDIT_SEQ`, `DEVOS_AUDIT_HASH`). Whoever can
//! rewrite the log directory can make it consistent again, but not the anchors they
//! cannot write: `verify` compares the log with every anchor, so a consistent rewrite
//! or a dropped tail is reported. An entry that cannot be written (or anchored) is an
//! error the caller must act on: the agent runs nothing it could not record.
//!
//! A line the agent died writing is cut off when the log is opened again, and the cut
//! (its size and sha256) is itself an entry, `audit.repaired`; see [`AuditLog::open`].

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::AuditConfig;

/// The `prev` of the very first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit entry as written: the hashed body and its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub seq: u64,
    pub time: String,
    pub prev: String,
    /// What happened: `request.submitted`, `action.decided`, `action.finished`,
    /// `rule.added`, `rule.removed`, `agent.started`, ...
    pub event: String,
    /// Who it concerns (the caller's uid), when a user is involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<u32>,
    /// Event details (the action, its risk, the decision and by whom, the result).
    pub detail: serde_json::Value,
    pub hash: String,
}

impl Entry {
    /// sha256 over the previous hash and every field but `hash`, serialised in a fixed
    /// order (struct order; maps in `detail` are sorted).
    fn compute_hash(&self) -> String {
        let body = Entry {
            hash: String::new(),
            ..self.clone()
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut h = Sha256::new();
        h.update(self.prev.as_bytes());
        h.update(b"\n");
        h.update(&json);
        hex::encode(h.finalize())
    }
}

/// A checkpoint: the chain's state at `seq`, itself chained to the previous
/// checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
    pub file: String,
    pub time: String,
    pub prev: String,
    pub checkpoint_hash: String,
}

impl Checkpoint {
    fn compute_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!(
            "{}\n{}\n{}\n{}\n{}",
            self.prev, self.seq, self.hash, self.file, self.time
        ));
        hex::encode(h.finalize())
    }
}

/// Where verification found the first problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub file: String,
    pub line: u64,
    pub seq: Option<u64>,
    pub reason: String,
}

/// The result of `audit verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Verification {
    pub ok: bool,
    pub entries: u64,
    pub files: u64,
    pub checkpoints: u64,
    pub last_hash: String,
    pub first_bad: Option<Problem>,
    /// Anchors (from the anchor file) the log was checked against.
    #[serde(default)]
    pub anchors: u64,
    /// Anchors from the journal, or `None` when the journal was not available.
    #[serde(default)]
    pub journal_anchors: Option<u64>,
    /// `None`: the whole log was read. Else an earlier verification's mark: entries up
    /// to it (and their checkpoints and anchors) were verified then and not read again;
    /// the counts above are of what was read now.
    #[serde(default)]
    pub resumed_after: Option<u64>,
    /// Where the next verification can resume (when this one is ok).
    #[serde(default, skip_serializing)]
    pub mark: Option<Mark>,
}

/// How far a verification read, to resume from: the last entry verified and where it
/// is, and how much of the checkpoints and anchors were read. Kept beside the anchor
/// file ([`Mark::path`]) by the agent after each verification that is ok.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub seq: u64,
    pub hash: String,
    /// The log file holding entry `seq`, the byte its line starts at and its number.
    pub file: String,
    pub offset: u64,
    pub line: u64,
    /// Checkpoint lines verified, and the last one's hash (the chain goes on from it).
    pub checkpoints: u64,
    pub checkpoint_hash: String,
    /// Bytes of the anchor file whose anchors were checked, and the last anchor line
    /// of the log among them (a file replaced by a longer one does not hold it there).
    pub anchor_offset: u64,
    #[serde(default)]
    pub anchor_line: Option<String>,
    /// The journal's cursor after the last anchor checked.
    pub journal_cursor: Option<String>,
}

impl Mark {
    /// Where the mark of the log anchored in `anchor_file` is kept: beside that file,
    /// outside the log directory, for the same reason as the anchors (whoever can
    /// rewrite the log directory must not be able to move the mark too).
    pub fn path(anchor_file: &Path) -> PathBuf {
        let name = anchor_file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        anchor_file.with_file_name(format!("{name}.verified"))
    }

    /// A problem found at the marked entry.
    fn problem(&self, reason: String) -> Problem {
        Problem {
            file: self.file.clone(),
            line: self.line,
            seq: Some(self.seq),
            reason,
        }
    }

    /// The mark at `path`, if there is one that parses.
    pub fn load(path: &Path) -> Option<Mark> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// Keep the mark at `path`, whole or not at all, and never ahead of what is on
    /// disk: the log file it names (in `dir`) and `anchor_file` are made durable
    /// first, so a crash cannot leave a mark naming an entry that was lost.
    pub fn save(&self, path: &Path, dir: &Path, anchor_file: &Path) -> Result<(), AuditError> {
        for file in [dir.join(&self.file), anchor_file.to_path_buf()] {
            match File::open(&file) {
                Ok(f) => f.sync_data().map_err(io(&file))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&file)(e)),
            }
        }
        let tmp = path.with_extension("verified.tmp");
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&serde_json::to_vec(self).unwrap_or_default())
            .and_then(|()| f.sync_data())
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        let parent = path.parent().unwrap_or(Path::new("."));
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io(parent))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the head is anchored besides the log directory.
struct Anchors {
    path: PathBuf,
    file: File,
    journal: Option<std::os::unix::net::UnixDatagram>,
    /// The log directory, as anchors name it.
    log: String,
}

const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// One line of the anchor file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Anchor {
    seq: u64,
    hash: String,
    log: String,
}

impl Anchors {
    fn open(dir: &Path, config: &AuditConfig) -> Result<Anchors, AuditError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let path = config.anchor_file.clone();
        if let Some(parent) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io(parent))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        // Without a journal (not under systemd) the anchor file is the only witness;
        // `verify` reports that the journal had nothing to say.
        let journal = config
            .journal
            .then(|| {
                let s = std::os::unix::net::UnixDatagram::unbound().ok()?;
                s.connect(JOURNAL_SOCKET).ok()?;
                Some(s)
            })
            .flatten();
        Ok(Anchors {
            path,
            file,
            journal,
            log: log_name_of(dir),
        })
    }

    fn record(&mut self, seq: u64, hash: &str) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(&Anchor {
            seq,
            hash: hash.to_owned(),
            log: self.log.clone(),
        })
        .unwrap_or_default();
        line.push(b'\n');
        self.file.write_all(&line).map_err(io(&self.path))?;
        if let Some(j) = &self.journal {
            // The journal is a second witness; losing it (journald restarting) must not
            // stop the agent, the anchor file has the entry.
            let msg = format!(
                "MESSAGE=devos audit anchor {seq}\nPRIORITY=6\nSYSLOG_IDENTIFIER=devos-agent\nDEVOS_AUDIT_LOG={}\nDEVOS_AUDIT_SEQ={seq}\nDEVOS_AUDIT_HASH={hash}\n",
                self.log
            );
            let _ = j.send(msg.as_bytes());
        }
        Ok(())
    }

    /// Make every anchor written so far durable.
    fn sync(&self) -> Result<(), AuditError> {
        self.file.sync_data().map_err(io(&self.path))
    }
}

/// How anchors name a log directory: its canonical path.
fn log_name_of(dir: &Path) -> String {
    std::fs::canonicalize(dir)
        .unwrap_or_else(|_| dir.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// The open log, appended to by the daemon.
pub struct AuditLog {
    anchors: Anchors,
    dir: PathBuf,
    config: AuditConfig,
    file: File,
    head: File,
    file_index: u32,
    size: u64,
    seq: u64,
    last_hash: String,
    last_checkpoint: String,
    checkpoints: u64,
    /// Bytes of the entries each user's events took today (UTC), and which day that
    /// is.
    written: (String, HashMap<u32, u64>),
    /// The last entry known to be on disk (synced with its anchor): up to the last
    /// checkpoint or durable append.
    durable: u64,
    /// Whether the current log file was created since the log directory was last
    /// synced (its name is not durable until then).
    new_file: bool,
}

fn log_name(index: u32) -> String {
    format!("log-{index:06}.jsonl")
}

/// The log files in chain order.
fn log_files(dir: &Path) -> Result<Vec<(u32, PathBuf)>, AuditError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // (Other names are not log files.)
        if let Some(n) = name
            .strip_prefix("log-")
            .and_then(|r| r.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u32>().ok())
        {
            files.push((n, entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

/// Where the chain goes on from (the newest entry that parses: verification reports
/// damage, appending must not stop), and the bytes each user's entries took on `day`,
/// read from the newest entry back to the first of another day.
fn read_tail(
    files: &[(u32, PathBuf)],
    day: &str,
) -> Result<(u64, String, HashMap<u32, u64>), AuditError> {
    /// What counting needs of an entry.
    #[derive(Deserialize)]
    struct Stamp {
        time: String,
        uid: Option<u32>,
    }
    let mut last = None;
    let mut written = HashMap::<u32, u64>::new();
    'files: for (_, p) in files.iter().rev() {
        // Bytes, not text: a damaged line (invalid UTF-8) is skipped like any other
        // that does not parse, it must not keep the log from opening.
        let bytes = std::fs::read(p).map_err(io(p))?;
        for line in bytes.rsplit(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            if last.is_none() {
                let Ok(entry) = serde_json::from_slice::<Entry>(line) else {
                    continue;
                };
                last = Some((entry.seq, entry.hash));
            }
            let Ok(stamp) = serde_json::from_slice::<Stamp>(line) else {
                continue;
            };
            if !stamp.time.starts_with(day) {
                break 'files;
            }
            if let Some(uid) = stamp.uid {
                *written.entry(uid).or_default() += line.len() as u64 + 1;
            }
        }
    }
    let (seq, hash) = last.unwrap_or_else(|| (0, GENESIS.to_owned()));
    Ok((seq, hash, written))
}

/// What [`cut_half_written_line`] cut from the end of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct Cut {
    file: String,
    bytes: u64,
    sha256: String,
}

/// Cut `path` back to just after its last newline when it does not end in one (an
/// append the daemon died in), and make the cut durable; what was cut, if anything.
/// Every append writes whole lines, so only the last line of the last file can be
/// half written: anything after it would be appended to it and never parse again.
fn cut_half_written_line(path: &Path) -> Result<Option<Cut>, AuditError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    let len = file.metadata().map_err(io(path))?.len();
    // Back from the end, a block at a time, to the last newline (if any).
    const BLOCK: u64 = 64 << 10;
    let mut block = Vec::new();
    let mut end = len;
    let keep = loop {
        let start = end.saturating_sub(BLOCK);
        block.resize((end - start) as usize, 0);
        file.seek(SeekFrom::Start(start)).map_err(io(path))?;
        file.read_exact(&mut block).map_err(io(path))?;
        match block.iter().rposition(|b| *b == b'\n') {
            Some(i) => break start + i as u64 + 1,
            None if start == 0 => break 0,
            None => end = start,
        }
    };
    if keep == len {
        return Ok(None);
    }
    let mut hash = Sha256::new();
    file.seek(SeekFrom::Start(keep)).map_err(io(path))?;
    std::io::copy(&mut (&mut file).take(len - keep), &mut hash).map_err(io(path))?;
    file.set_len(keep).map_err(io(path))?;
    file.sync_all().map_err(io(path))?;
    Ok(Some(Cut {
        file: path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned(),
        bytes: len - keep,
        sha256: hex::encode(hash.finalize()),
    }))
}

/// Checkpoints by line number; a line that does not parse keeps its error.
type CheckpointLines = Vec<(u64, Result<Checkpoint, serde_json::Error>)>;

fn read_checkpoints(dir: &Path) -> Result<CheckpointLines, AuditError> {
    let path = dir.join("checkpoints.jsonl");
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&path)(e)),
    };
    let mut out = Vec::new();
    // Bytes, not text: a line that is not UTF-8 is a checkpoint that does not parse
    // (verification reports it), not a log that cannot be opened.
    for (n, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line = line.map_err(io(&path))?;
        out.push((n as u64 + 1, serde_json::from_slice::<Checkpoint>(&line)));
    }
    Ok(out)
}

impl AuditLog {
    /// Open (or create) the log in `dir`, continuing the chain from its last entry.
    ///
    /// A line the agent died writing — at the end of the last log file or of
    /// `checkpoints.jsonl` — is cut off first (it was never acknowledged: the entry's
    /// append had not returned), and the cut goes on the chain as an `audit.repaired`
    /// entry with the bytes cut and their sha256. Without the cut, every later entry
    /// would be appended to the half line and the log would never verify again.
    /// Damage anywhere else is left for verification to report.
    pub fn open(dir: &Path, config: &AuditConfig) -> Result<Self, AuditError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let files = log_files(dir)?;
        let (file_index, path) = files
            .last()
            .cloned()
            .unwrap_or_else(|| (1, dir.join(log_name(1))));
        let mut cuts = Vec::new();
        for damaged in [path.clone(), dir.join("checkpoints.jsonl")] {
            if let Some(cut) = cut_half_written_line(&damaged)? {
                tracing::warn!(
                    "audit log {}: cut a half-written line of {} bytes (sha256 {}) that an earlier run left at its end",
                    damaged.display(),
                    cut.bytes,
                    cut.sha256
                );
                cuts.push(cut);
            }
        }
        let today = now()[..10].to_owned();
        let (seq, last_hash, written) = read_tail(&files, &today)?;
        let new_file = !path.exists();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let size = file.metadata().map_err(io(&path))?.len();
        let head_path = dir.join("HEAD");
        let head = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&head_path)
            .map_err(io(&head_path))?;
        let checkpoints = read_checkpoints(dir)?;
        // Like entries, checkpoints continue from the newest that parses; verification
        // reports a damaged one.
        let last_checkpoint = checkpoints
            .iter()
            .rev()
            .find_map(|(_, c)| c.as_ref().ok().map(|c| c.checkpoint_hash.clone()))
            .unwrap_or_else(|| GENESIS.to_owned());
        let mut log = AuditLog {
            anchors: Anchors::open(dir, config)?,
            dir: dir.to_path_buf(),
            config: config.clone(),
            file,
            head,
            file_index,
            size,
            seq,
            last_hash,
            last_checkpoint,
            checkpoints: checkpoints.len() as u64,
            written: (today, written),
            durable: 0,
            new_file,
        };
        if !cuts.is_empty() {
            log.append_durable(
                "audit.repaired",
                None,
                None,
                None,
                serde_json::json!({ "cut": cuts }),
            )?;
        }
        Ok(log)
    }

    pub fn entries(&self) -> u64 {
        self.seq
    }

    /// How many bytes of entries `uid`'s events took today (UTC).
    pub fn written_today(&mut self, uid: u32) -> u64 {
        *self.written_on(&now()).entry(uid).or_default()
    }

    /// Each user's bytes on the day of `time` (RFC 3339, UTC): the count starts again
    /// on a new day.
    fn written_on(&mut self, time: &str) -> &mut HashMap<u32, u64> {
        let day = &time[..10];
        if self.written.0 != day {
            self.written = (day.to_owned(), HashMap::new());
        }
        &mut self.written.1
    }

    /// Bytes free for the log on its file system (for others than root), and the
    /// file system's size.
    pub fn space(&self) -> Result<(u64, u64), AuditError> {
        let s = nix::sys::statvfs::fstatvfs(&self.file)
            .map_err(|e| io(&self.dir)(std::io::Error::from(e)))?;
        let block = s.fragment_size() as u64;
        Ok((
            s.blocks_available() as u64 * block,
            s.blocks() as u64 * block,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Append one entry and make it durable before returning: the log file (with
    /// every entry before it) and the anchor file are synced to disk, and so is the
    /// log directory when the file is new. For entries that must survive a power loss
    /// once the caller acts on them — an action about to start (a `git push` that ran
    /// cannot be taken back), a decision, a remembered rule: without the sync, such an
    /// entry and its anchor can both vanish, and the next entries reuse their sequence
    /// numbers with nothing to tell. Each call costs two or three fsyncs (milliseconds
    /// on a disk), so other entries use [`AuditLog::append`] and are synced in
    /// batches, at each checkpoint, or by the next durable append.
    pub fn append_durable(
        &mut self,
        event: &str,
        uid: Option<u32>,
        request: Option<&str>,
        action: Option<u32>,
        detail: serde_json::Value,
    ) -> Result<u64, AuditError> {
        let seq = self.append(event, uid, request, action, detail)?;
        self.sync()?;
        Ok(seq)
    }

    /// Make every entry appended so far durable, with its anchor: the log file first
    /// (an anchor on disk for an entry that is not would read as entries dropped).
    fn sync(&mut self) -> Result<(), AuditError> {
        if self.durable == self.seq && !self.new_file {
            return Ok(());
        }
        let log = self.dir.join(log_name(self.file_index));
        self.file.sync_data().map_err(io(&log))?;
        if self.new_file {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io(&self.dir))?;
            self.new_file = false;
        }
        self.anchors.sync()?;
        self.durable = self.seq;
        Ok(())
    }

    /// The last entry known to be on disk with its anchor.
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// Append one entry; returns its sequence number. It is written but not synced
    /// (see [`AuditLog::append_durable`]).
    pub fn append(
        &mut self,
        event: &str,
        uid: Option<u32>,
        request: Option<&str>,
        action: Option<u32>,
        detail: serde_json::Value,
    ) -> Result<u64, AuditError> {
        if self.size >= self.config.rotate_mib * 1024 * 1024 {
            self.rotate()?;
        }
        let mut entry = Entry {
            seq: self.seq + 1,
            time: now(),
            prev: self.last_hash.clone(),
            event: event.to_owned(),
            uid,
            request: request.map(str::to_owned),
            action,
            detail,
            hash: String::new(),
        };
        entry.hash = entry.compute_hash();
        let mut line = serde_json::to_vec(&entry).unwrap_or_default();
        line.push(b'\n');
        let path = self.dir.join(log_name(self.file_index));
        if let Err(e) = self.file.write_all(&line) {
            // No half line may stay behind for the next entry to be appended to.
            if let Err(cut) = self.file.set_len(self.size) {
                tracing::error!(
                    "audit log {}: cannot cut a half-written entry (verification will report it): {cut}",
                    path.display()
                );
            }
            return Err(io(&path)(e));
        }
        self.size += line.len() as u64;
        if let Some(uid) = uid {
            *self.written_on(&entry.time).entry(uid).or_default() += line.len() as u64;
        }
        self.seq = entry.seq;
        self.last_hash = entry.hash;
        self.write_head()?;
        self.anchors.record(self.seq, &self.last_hash)?;
        if self.seq.is_multiple_of(self.config.checkpoint_every) {
            self.checkpoint()?;
        }
        Ok(self.seq)
    }

    /// Overwrite HEAD in place with one fixed-width write (a single sub-page write
    /// is never seen half done), instead of a rename per entry.
    fn write_head(&self) -> Result<(), AuditError> {
        use std::os::unix::fs::FileExt;
        let path = self.dir.join("HEAD");
        let line = format!("{:020} {}\n", self.seq, self.last_hash);
        self.head
            .write_all_at(line.as_bytes(), 0)
            .map_err(io(&path))
    }

    /// Record the chain's state (and make the log durable up to here).
    pub fn checkpoint(&mut self) -> Result<(), AuditError> {
        if self.seq == 0 {
            return Ok(());
        }
        self.sync()?;
        let mut cp = Checkpoint {
            seq: self.seq,
            hash: self.last_hash.clone(),
            file: log_name(self.file_index),
            time: now(),
            prev: self.last_checkpoint.clone(),
            checkpoint_hash: String::new(),
        };
        cp.checkpoint_hash = cp.compute_hash();
        let path = self.dir.join("checkpoints.jsonl");
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let mut line = serde_json::to_vec(&cp).unwrap_or_default();
        line.push(b'\n');
        f.write_all(&line).map_err(io(&path))?;
        f.sync_data().map_err(io(&path))?;
        tracing::info!(seq = cp.seq, hash = %cp.hash, checkpoint = %cp.checkpoint_hash, "audit checkpoint");
        self.last_checkpoint = cp.checkpoint_hash;
        self.checkpoints += 1;
        Ok(())
    }

    /// The chain's state now, for verifying while appends go on: the head and the
    /// checkpoints written so far.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            seq: self.seq,
            hash: self.last_hash.clone(),
        }
    }

    fn rotate(&mut self) -> Result<(), AuditError> {
        self.checkpoint()?;
        self.file_index += 1;
        let path = self.dir.join(log_name(self.file_index));
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        self.new_file = true;
        self.size = 0;
        Ok(())
    }
}

fn now() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

/// The head of a live log at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub seq: u64,
    pub hash: String,
}

/// What `verify` checks the log against besides itself.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// The anchor file (`[audit] anchor-file`).
    pub anchor_file: Option<PathBuf>,
    /// Read the journal's anchors too.
    pub journal: bool,
    /// Verify a live log up to this head (entries appended after it are left for
    /// the next verification); `None` reads the `HEAD` file.
    pub snapshot: Option<Snapshot>,
    /// Read only what came after this earlier verification's mark (its entry must
    /// still be there with its hash); `None` reads everything.
    pub resume: Option<Mark>,
}

impl VerifyOptions {
    pub fn of(config: &AuditConfig) -> VerifyOptions {
        VerifyOptions {
            anchor_file: Some(config.anchor_file.clone()),
            journal: config.journal,
            snapshot: None,
            resume: None,
        }
    }
}

/// Check the whole chain in `dir` (or, with `options.resume`, what came after an
/// earlier verification's mark): every entry's hash, its link to the one before,
/// consecutive sequence numbers across files, every checkpoint, the head, and every
/// anchor outside the directory.
pub fn verify(dir: &Path, options: &VerifyOptions) -> Result<Verification, AuditError> {
    let mut v = Verification {
        ok: true,
        entries: 0,
        files: 0,
        checkpoints: 0,
        last_hash: GENESIS.to_owned(),
        first_bad: None,
        anchors: 0,
        journal_anchors: None,
        resumed_after: None,
        mark: None,
    };
    let limit = options.snapshot.as_ref().map(|s| s.seq);
    // (A mark of an empty log marks nothing.)
    let resume = options.resume.as_ref().filter(|m| m.seq > 0);
    v.resumed_after = resume.map(|m| m.seq);
    let (hashes, last) = check_entries(dir, limit, resume, &mut v)?;
    let mut mark = Mark {
        seq: v.entries,
        hash: v.last_hash.clone(),
        file: last.0,
        offset: last.1,
        line: last.2,
        checkpoints: 0,
        checkpoint_hash: GENESIS.to_owned(),
        anchor_offset: 0,
        anchor_line: None,
        journal_cursor: None,
    };
    if v.first_bad.is_none() {
        check_checkpoints(dir, limit, resume, &hashes, &mut v, &mut mark)?;
    }
    if v.first_bad.is_none() {
        v.first_bad = match &options.snapshot {
            Some(snapshot) => snapshot_problem(snapshot, &v),
            None => head_problem(dir, &v),
        };
    }
    if v.first_bad.is_none() {
        check_anchors(dir, options, resume, &hashes, &mut v, &mut mark)?;
    }
    v.ok = v.first_bad.is_none();
    v.mark = (v.ok && v.entries > 0).then_some(mark);
    Ok(v)
}

/// Each verified entry's hash and the file it is in, by sequence number.
type Hashes = std::collections::HashMap<u64, (String, String)>;

/// The last entry read: its file, the byte its line starts at, its line number.
type Last = (String, u64, u64);

/// Walk the log files in order, up to entry `limit` (from `resume`'s entry, which
/// must still be there unchanged): every entry must parse, follow the one before by
/// number and hash, and match its own hash. Stops at the first problem, which goes
/// into `v`.
fn check_entries(
    dir: &Path,
    limit: Option<u64>,
    resume: Option<&Mark>,
    v: &mut Verification,
) -> Result<(Hashes, Last), AuditError> {
    let mut hashes = Hashes::default();
    let mut last: Last = Default::default();
    let mut expect_seq = 1;
    let mut files = log_files(dir)?;
    if let Some(m) = resume {
        let Some(at) = files.iter().position(|(_, p)| p.ends_with(&m.file)) else {
            v.first_bad =
                Some(m.problem("the file that held the last verified entry is gone".into()));
            return Ok((hashes, last));
        };
        files.drain(..at);
        expect_seq = m.seq;
    }
    for (i, (_, path)) in files.iter().enumerate() {
        v.files += 1;
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let mut file = File::open(path).map_err(io(path))?;
        let (mut offset, mut line_no) = (0, 0);
        if let (0, Some(m)) = (i, resume) {
            use std::io::Seek;
            file.seek(std::io::SeekFrom::Start(m.offset))
                .map_err(io(path))?;
            (offset, line_no) = (m.offset, m.line - 1);
        }
        for line in BufReader::new(file).split(b'\n') {
            let line = line.map_err(io(path))?;
            line_no += 1;
            let start = offset;
            offset += line.len() as u64 + 1;
            let bad = |seq: Option<u64>, reason: String| Problem {
                file: name.clone(),
                line: line_no,
                seq,
                reason,
            };
            if limit.is_some_and(|l| expect_seq > l) {
                return Ok((hashes, last));
            }
            let entry: Entry = match serde_json::from_slice(&line) {
                Ok(e) => e,
                Err(e) => {
                    v.first_bad = Some(bad(None, format!("not a valid entry: {e}")));
                    return Ok((hashes, last));
                }
            };
            // The mark's own entry: the chain goes on from it as it was verified.
            let mark = resume.filter(|m| m.seq == expect_seq && hashes.is_empty());
            if let Some(m) = mark {
                v.last_hash = entry.prev.clone();
                if entry.seq != m.seq || entry.hash != m.hash {
                    v.first_bad = Some(bad(
                        Some(m.seq),
                        format!(
                            "entry {} is not where or what it was when last verified: the log was rewritten",
                            m.seq
                        ),
                    ));
                    return Ok((hashes, last));
                }
            }
            if let Some(reason) = entry_problem(&entry, expect_seq, &v.last_hash) {
                v.first_bad = Some(bad(Some(entry.seq), reason));
                return Ok((hashes, last));
            }
            hashes.insert(entry.seq, (entry.hash.clone(), name.clone()));
            last = (name.clone(), start, line_no);
            v.last_hash = entry.hash;
            v.entries = entry.seq;
            expect_seq += 1;
        }
    }
    if let Some(m) = resume.filter(|_| hashes.is_empty()) {
        v.first_bad = Some(m.problem(format!(
            "entry {} is not where it was when last verified: the log was truncated",
            m.seq
        )));
    }
    Ok((hashes, last))
}

/// What is wrong with `entry`, expected as number `expect_seq` after the entry with
/// hash `last_hash`.
fn entry_problem(entry: &Entry, expect_seq: u64, last_hash: &str) -> Option<String> {
    if entry.seq != expect_seq {
        Some(if entry.seq > expect_seq {
            format!(
                "expected entry {expect_seq}, found {}: entries are missing or out of order",
                entry.seq
            )
        } else {
            format!(
                "expected entry {expect_seq}, found {}: entries are repeated or out of order",
                entry.seq
            )
        })
    } else if entry.prev != last_hash {
        Some(
            "does not link to the entry before it (an entry was removed, inserted or reordered)"
                .to_owned(),
        )
    } else if entry.compute_hash() != entry.hash {
        Some("its contents do not match its hash (the entry was edited)".to_owned())
    } else {
        None
    }
}

/// Every checkpoint up to entry `limit` (after those `resume` counted, the last of
/// which must be unchanged) must link to the one before and match the entry it names.
/// Stops at the first problem, which goes into `v`.
fn check_checkpoints(
    dir: &Path,
    limit: Option<u64>,
    resume: Option<&Mark>,
    hashes: &Hashes,
    v: &mut Verification,
    mark: &mut Mark,
) -> Result<(), AuditError> {
    let (skip, mut prev) = resume.map_or((0, GENESIS.to_owned()), |m| {
        (m.checkpoints, m.checkpoint_hash.clone())
    });
    let checkpoints = read_checkpoints(dir)?;
    if skip > checkpoints.len() as u64 {
        v.first_bad = Some(Problem {
            file: "checkpoints.jsonl".into(),
            line: skip,
            seq: None,
            reason: format!(
                "{skip} checkpoints were verified before, {} are left: checkpoints were removed",
                checkpoints.len()
            ),
        });
        return Ok(());
    }
    let written = checkpoints.len() as u64;
    for (line, cp) in checkpoints {
        let bad = |reason: String| Problem {
            file: "checkpoints.jsonl".into(),
            line,
            seq: None,
            reason,
        };
        let cp = match cp {
            Ok(cp) => cp,
            // A live log's last checkpoint may be half written as it is read: it
            // checkpoints an entry after the head verified.
            Err(_) if line == written && limit.is_some() => break,
            Err(e) if line > skip => {
                v.first_bad = Some(bad(format!("not a valid checkpoint: {e}")));
                break;
            }
            Err(_) => continue,
        };
        if line < skip {
            continue;
        }
        if line == skip {
            if cp.checkpoint_hash != prev {
                v.first_bad = Some(bad(
                    "the last checkpoint verified before was changed".to_owned()
                ));
                break;
            }
            continue;
        }
        if limit.is_some_and(|l| cp.seq > l) {
            break;
        }
        let reason = if cp.prev != prev || cp.compute_hash() != cp.checkpoint_hash {
            Some("checkpoint chain is broken (a checkpoint was edited or removed)".to_owned())
        } else {
            match hashes.get(&cp.seq) {
                None => Some(format!(
                    "checkpoint at entry {} but the log ends at entry {}: the log was truncated",
                    cp.seq, v.entries
                )),
                Some((h, _)) if *h != cp.hash => {
                    Some(format!("entry {} differs from its checkpoint", cp.seq))
                }
                Some(_) => None,
            }
        };
        if let Some(reason) = reason {
            v.first_bad = Some(Problem {
                seq: Some(cp.seq),
                ..bad(reason)
            });
            break;
        }
        prev = cp.checkpoint_hash;
        v.checkpoints += 1;
        mark.checkpoints = line;
        mark.checkpoint_hash = prev.clone();
    }
    if let Some(m) = resume.filter(|_| mark.checkpoints == 0) {
        (mark.checkpoints, mark.checkpoint_hash) = (m.checkpoints, m.checkpoint_hash.clone());
    }
    Ok(())
}

/// A live log verified up to `snapshot` must end there.
fn snapshot_problem(snapshot: &Snapshot, v: &Verification) -> Option<Problem> {
    (snapshot.seq != v.entries || snapshot.hash != v.last_hash).then(|| Problem {
        file: "HEAD".into(),
        line: 1,
        seq: Some(snapshot.seq),
        reason: format!(
            "the agent's head is entry {} but the log ends at entry {}: the log was truncated or changed",
            snapshot.seq, v.entries
        ),
    })
}

/// The log must end at the entry the `HEAD` file records (an empty log may have none).
fn head_problem(dir: &Path, v: &Verification) -> Option<Problem> {
    let head_path = dir.join("HEAD");
    match std::fs::read_to_string(&head_path) {
        Ok(head) if head.trim().is_empty() && v.entries == 0 => None,
        Ok(head) => {
            let mut parts = head.split_whitespace();
            // (A HEAD that does not parse is reported below, as entry ?.)
            let seq = parts.next().and_then(|s| s.parse::<u64>().ok());
            let hash = parts.next().unwrap_or("");
            (seq != Some(v.entries) || hash != v.last_hash).then(|| Problem {
                file: "HEAD".into(),
                line: 1,
                seq,
                reason: format!(
                    "the log ends at entry {} but HEAD records entry {}: the log was truncated or HEAD was changed",
                    v.entries,
                    seq.map_or("?".into(), |s| s.to_string())
                ),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && v.entries == 0 => None,
        Err(e) => Some(Problem {
            file: "HEAD".into(),
            line: 0,
            seq: None,
            reason: format!("cannot read HEAD: {e}"),
        }),
    }
}

/// Compare the log with the anchors recorded outside it (those after `resume`'s when
/// resuming), and note in `mark` how far each source was read.
fn check_anchors(
    dir: &Path,
    options: &VerifyOptions,
    resume: Option<&Mark>,
    hashes: &Hashes,
    v: &mut Verification,
    mark: &mut Mark,
) -> Result<(), AuditError> {
    let log = log_name_of(dir);
    let limit = options.snapshot.as_ref().map(|s| s.seq);
    let after = resume.map_or(0, |m| m.seq);
    // Anchors up to the head verified, each with where its source goes on after it.
    let wanted = |a: &Anchor| limit.is_none_or(|l| a.seq <= l);
    let mut sources: Vec<(String, Vec<(Anchor, Position)>)> = Vec::new();
    if let Some(path) = &options.anchor_file {
        let from = resume.map_or(0, |m| m.anchor_offset);
        mark.anchor_offset = from;
        mark.anchor_line = resume.and_then(|m| m.anchor_line.clone());
        // Anchors are only ever appended: a file shorter than what was read before, or
        // without the last anchor read where it was, was cut or replaced.
        let len = std::fs::metadata(path).map_or(0, |m| m.len());
        let replaced = if len < from {
            Some(format!(
                "the anchor file holds {len} bytes but {from} were read when the log was last verified: it was cut or replaced"
            ))
        } else {
            match &mark.anchor_line {
                Some(line) if !anchor_line_ends_at(path, from, line)? => Some(format!(
                    "the anchor file no longer holds the anchor that ended at byte {from} when the log was last verified: it was replaced"
                )),
                _ => None,
            }
        };
        if let Some(reason) = replaced {
            v.first_bad = Some(Problem {
                file: path.display().to_string(),
                line: 0,
                seq: resume.map(|m| m.seq),
                reason,
            });
            return Ok(());
        }
        let anchors = anchor_file(path, from, &log)?;
        sources.push((path.display().to_string(), anchors));
    }
    mark.journal_cursor = resume.and_then(|m| m.journal_cursor.clone());
    if options.journal {
        // Only the log's writer (the directory's owner) anchors it: anyone may log a
        // journal entry with these fields, but journald records who sent it.
        let writer = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(dir).map_err(io(dir))?);
        if let Some(anchors) = journal_anchors(&log, writer, mark.journal_cursor.as_deref()) {
            sources.push(("the journal".into(), anchors));
        }
    }
    for (i, (source, anchors)) in sources.iter().enumerate() {
        let mut checked = 0;
        for (a, position) in anchors.iter().take_while(|(a, _)| wanted(a)) {
            match position {
                Position::Offset(o, line) => {
                    mark.anchor_offset = *o;
                    mark.anchor_line = Some(line.clone());
                }
                Position::Cursor(c) => mark.journal_cursor = Some(c.clone()),
            }
            if a.seq < after {
                continue;
            }
            checked += 1;
            let reason = match hashes.get(&a.seq) {
                None => format!(
                    "{source} records entry {} but the log ends at entry {}: entries were dropped",
                    a.seq, v.entries
                ),
                Some((h, _)) if *h != a.hash => format!(
                    "entry {} differs from its anchor in {source}: the log was rewritten",
                    a.seq
                ),
                Some(_) => continue,
            };
            v.first_bad = Some(Problem {
                file: hashes
                    .get(&a.seq)
                    .map(|(_, f)| f.clone())
                    .unwrap_or_default(),
                line: 0,
                seq: Some(a.seq),
                reason,
            });
            return Ok(());
        }
        if i == 0 && options.anchor_file.is_some() {
            v.anchors = checked;
        } else {
            v.journal_anchors = Some(checked);
        }
    }
    Ok(())
}

/// Where an anchor's source goes on after it: a byte of the anchor file (after the
/// anchor's line), or a journal cursor.
#[derive(Debug, Clone, PartialEq)]
enum Position {
    Offset(u64, String),
    Cursor(String),
}

/// The anchors for `log` in the anchor file from byte `from`. A line cut short (a
/// crash while it was written) anchors nothing; the others still do.
fn anchor_file(path: &Path, from: u64, log: &str) -> Result<Vec<(Anchor, Position)>, AuditError> {
    use std::io::Seek;
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path)(e)),
    };
    file.seek(std::io::SeekFrom::Start(from))
        .map_err(io(path))?;
    let mut offset = from;
    let mut anchors = Vec::new();
    for line in BufReader::new(file).split(b'\n') {
        let line = line.map_err(io(path))?;
        offset += line.len() as u64 + 1;
        if let Ok(a) = serde_json::from_slice::<Anchor>(&line)
            && a.log == log
        {
            let line = String::from_utf8_lossy(&line).into_owned();
            anchors.push((a, Position::Offset(offset, line)));
        }
    }
    Ok(anchors)
}

/// Whether the anchor file holds `line` (and its newline) just before byte `end`.
fn anchor_line_ends_at(path: &Path, end: u64, line: &str) -> Result<bool, AuditError> {
    use std::io::{Read, Seek};
    let want = format!("{line}\n");
    let Some(start) = end.checked_sub(want.len() as u64) else {
        return Ok(false);
    };
    let mut file = File::open(path).map_err(io(path))?;
    file.seek(std::io::SeekFrom::Start(start))
        .map_err(io(path))?;
    let mut found = vec![0; want.len()];
    file.read_exact(&mut found).map_err(io(path))?;
    Ok(found == want.as_bytes())
}

/// The anchors the journal holds for a log (after `cursor`), or `None` without a
/// journal.
fn journal_anchors(
    log: &str,
    writer: u32,
    cursor: Option<&str>,
) -> Option<Vec<(Anchor, Position)>> {
    if !Path::new(JOURNAL_SOCKET).exists() {
        return None;
    }
    // A journal that cannot be read is reported as none (`journal-anchors: null`).
    let mut command = std::process::Command::new("journalctl");
    command.args(["--no-pager", "--quiet", "-o", "json"]);
    if let Some(cursor) = cursor {
        command.arg(format!("--after-cursor={cursor}"));
    }
    let out = command
        .arg(format!("_UID={writer}"))
        .arg(format!("DEVOS_AUDIT_LOG={log}"))
        .stdin(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    Some(anchors_in_journal(
        &String::from_utf8_lossy(&out.stdout),
        log,
        writer,
    ))
}

/// The anchors for `log` in `journalctl -o json` output that `writer` sent: an entry
/// another user logged with the same fields (`logger --journald`) is not an anchor.
fn anchors_in_journal(json_lines: &str, log: &str, writer: u32) -> Vec<(Anchor, Position)> {
    let writer = writer.to_string();
    json_lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        // `_UID` is journald's own (trusted) field, taken from the sender's socket.
        .filter(|j| {
            j["_UID"].as_str() == Some(&writer) && j["DEVOS_AUDIT_LOG"].as_str() == Some(log)
        })
        // (Only entries with both fields are anchors.)
        .filter_map(|j| {
            Some((
                Anchor {
                    seq: j["DEVOS_AUDIT_SEQ"].as_str()?.parse().ok()?,
                    hash: j["DEVOS_AUDIT_HASH"].as_str()?.to_owned(),
                    log: log.to_owned(),
                },
                Position::Cursor(j["__CURSOR"].as_str().unwrap_or_default().to_owned()),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests;
