//! What systemd-boot knows about this machine's versions: the unified kernel images in
//! the ESP (one per installed version, named `IMAGE_VERSION.efi`, with boot tries while
//! a version is on trial) and the EFI variables in which the boot loader says what it
//! started and what it is to start next (the Boot Loader Interface).

use std::path::Path;

/// Where efivarfs shows the Boot Loader Interface's variables, and their vendor GUID.
const LOADER_VARS: &str = "/sys/firmware/efi/efivars";
const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

/// A Boot Loader Interface string variable (`LoaderEntrySelected`, …), when set.
pub fn loader_var(name: &str) -> Option<String> {
    let bytes = std::fs::read(format!("{LOADER_VARS}/{name}-{LOADER_GUID}")).ok()?;
    efi_string(&bytes)
}

/// An EFI string variable as efivarfs shows it: 4 bytes of attributes, then UTF-16LE
/// up to a NUL.
pub fn efi_string(bytes: &[u8]) -> Option<String> {
    let units: Vec<u16> = bytes
        .get(4..)?
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16(&units).ok().filter(|s| !s.is_empty())
}

/// What the boot loader said about this boot and chose for the next ones.
#[derive(Debug, Default, Clone)]
pub struct LoaderState {
    /// The entry this boot started (`LoaderEntrySelected`).
    pub selected: Option<String>,
    /// The entry (a glob pattern, or `@saved`) chosen for every boot
    /// (`bootctl set-default`: `LoaderEntryDefault`).
    pub default: Option<String>,
    /// The entry chosen for the next boot only (`LoaderEntryOneShot`).
    pub oneshot: Option<String>,
    /// The entry `@saved` stands for (`LoaderEntryLastBooted`).
    pub last_booted: Option<String>,
    /// Where the boot loader renamed this boot's kernel image to count the try
    /// (`LoaderBootCountPath`, `\EFI\Linux\NAME+LEFT-DONE.efi`): set only on a
    /// counted boot, a version on trial.
    pub count_path: Option<String>,
    /// The boot loader's major version (`LoaderInfo`, `systemd-boot 257.9-1`).
    pub loader_version: Option<u32>,
}

impl LoaderState {
    /// The running machine's (all unset where systemd-boot did not start it). What
    /// the loader set at boot is read once; the choices for the next boot each time.
    pub fn read() -> Self {
        static AT_BOOT: std::sync::OnceLock<LoaderState> = std::sync::OnceLock::new();
        let at_boot = AT_BOOT.get_or_init(|| Self {
            selected: loader_var("LoaderEntrySelected"),
            last_booted: loader_var("LoaderEntryLastBooted"),
            count_path: loader_var("LoaderBootCountPath"),
            loader_version: loader_var("LoaderInfo").and_then(|i| loader_major(&i)),
            ..Self::default()
        });
        Self {
            default: loader_var("LoaderEntryDefault"),
            oneshot: loader_var("LoaderEntryOneShot"),
            ..at_boot.clone()
        }
    }

    /// Whether this boot is counted: a version on trial.
    pub fn counted(&self) -> bool {
        self.count_path.is_some()
    }

    /// The file name this boot's kernel image had once the boot loader counted the
    /// try (on a counted boot).
    pub fn counted_name(&self) -> Option<&str> {
        self.count_path.as_deref()?.rsplit(['\\', '/']).next()
    }
}

/// The major version in `LoaderInfo` (`systemd-boot 257.9-1~deb13u1` is 257).
fn loader_major(info: &str) -> Option<u32> {
    let version = info.strip_prefix("systemd-boot ")?;
    let end = version
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(version.len());
    version[..end].parse().ok()
}

/// The first systemd-boot whose entry ids leave out the boot-counting suffix (an id
/// is the file name with it before that): what a default names is matched likewise.
const IDS_WITHOUT_COUNTER: u32 = 258;

/// One version's kernel image in the ESP: `IMAGE_VERSION.efi`, with `+LEFT` or
/// `+LEFT-DONE` before `.efi` while its boots are counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its file name (the boot loader's entry id).
    pub file: String,
    /// The version, in systemd-sysupdate's spelling (`_` for `+`).
    pub version: String,
    /// (tries left, tries done) while the version is on trial; None once it is good.
    pub tries: Option<(u32, u32)>,
}

impl Entry {
    /// `file` as one of `image`'s entries, if it is one.
    pub fn parse(image: &str, file: &str) -> Option<Self> {
        let rest = file.strip_suffix(".efi")?.strip_prefix(image)?;
        let rest = rest.strip_prefix('_')?;
        let (version, tries) = match rest.split_once('+') {
            None => (rest, None),
            Some((version, counter)) => {
                let (left, done) = counter.split_once('-').unwrap_or((counter, "0"));
                (version, Some((left.parse().ok()?, done.parse().ok()?)))
            }
        };
        Some(Self {
            file: file.to_owned(),
            version: version.to_owned(),
            tries,
        })
    }

    /// Installed by an update and never booted (`+LEFT` or `+LEFT-0`).
    pub fn untried(&self) -> bool {
        matches!(self.tries, Some((_, 0)))
    }

    /// Its tries are used up: it failed to come up healthy, and the boot loader
    /// starts it only when nothing else is left.
    pub fn failed(&self) -> bool {
        matches!(self.tries, Some((0, _)))
    }

    /// The file name without the boot-counting suffix.
    fn uncounted(&self) -> String {
        match self.tries {
            Some(_) => format!(
                "{}.efi",
                self.file
                    .strip_suffix(".efi")
                    .and_then(|s| s.rsplit_once('+'))
                    .map_or(self.file.as_str(), |(name, _)| name)
            ),
            None => self.file.clone(),
        }
    }

    /// Whether the boot loader's `pattern` (a default or one-shot choice: a glob,
    /// compared without regard to case) names this entry, as the boot loader of
    /// `version` forms its id.
    fn named_by(&self, pattern: &str, version: Option<u32>) -> bool {
        let id = match version {
            Some(v) if v >= IDS_WITHOUT_COUNTER => self.uncounted(),
            _ => self.file.clone(),
        };
        glob_match(&pattern.to_ascii_lowercase(), &id.to_ascii_lowercase())
    }
}

/// `text` against a glob `pattern` as systemd-boot matches entry ids: `*`, `?` and
/// `[...]` (with `!` or `^` to negate, and ranges).
fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // (pattern index, text index) to resume from at the last `*`.
    let (mut pi, mut ti, mut star) = (0, 0, None);
    while ti < t.len() {
        // How much of the pattern the text's next character takes, if it matches.
        let step = match p.get(pi) {
            Some('*') => {
                star = Some((pi + 1, ti));
                pi += 1;
                continue;
            }
            Some('?') => Some(1),
            Some('[') => class_match(&p[pi..], t[ti]),
            Some(&c) => (c == t[ti]).then_some(1),
            None => None,
        };
        match step {
            Some(len) => {
                pi += len;
                ti += 1;
            }
            None => match star {
                Some((after, from)) => {
                    pi = after;
                    ti = from + 1;
                    star = Some((after, from + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A `[...]` class at the start of `p` against `c`: the class's length when it
/// matches.
fn class_match(p: &[char], c: char) -> Option<usize> {
    let mut i = 1;
    let negate = matches!(p.get(i), Some('!' | '^'));
    if negate {
        i += 1;
    }
    let mut found = false;
    let mut first = true;
    while let Some(&x) = p.get(i) {
        if x == ']' && !first {
            return (found != negate).then_some(i + 1);
        }
        if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|&e| e != ']') {
            found |= (x..=p[i + 2]).contains(&c);
            i += 3;
        } else {
            found |= x == c;
            i += 1;
        }
        first = false;
    }
    // No closing `]`: the `[` stands for itself.
    (c == '[').then_some(1)
}

/// `image`'s kernel images in `dir`, newest version first.
pub fn entries(dir: &Path, image: &str) -> std::io::Result<Vec<Entry>> {
    let mut entries: Vec<Entry> = std::fs::read_dir(dir)?
        .filter_map(|e| Entry::parse(image, &e.ok()?.file_name().into_string().ok()?))
        .collect();
    entries.sort_by(|a, b| version_cmp(&b.version, &a.version));
    Ok(entries)
}

/// What the next boot starts, as systemd-boot chooses it.
#[derive(Debug, PartialEq, Eq)]
pub enum NextBoot<'a> {
    /// One of the image's kernel images, and why.
    Entry(&'a Entry, &'static str),
    /// A choice set outside devos that names none of them (another entry of the
    /// boot loader's, or nothing it has), and how it was made.
    Other(String, &'static str),
}

/// What the next boot starts, as systemd-boot chooses it: the one-shot choice, else
/// the default (`bootctl set-default`; `@saved`: the entry booted last), else the
/// first entry in its order: the newest version that has tries left (a failed one only
/// when nothing else is left). `entries` newest first.
pub fn next_boot<'a>(entries: &'a [Entry], loader: &LoaderState) -> Option<NextBoot<'a>> {
    let named = |pattern: &str| {
        let pattern = match pattern {
            "@saved" => loader.last_booted.as_deref()?,
            p => p,
        };
        Some(
            entries
                .iter()
                .find(|e| e.named_by(pattern, loader.loader_version))
                .ok_or_else(|| pattern.to_owned()),
        )
    };
    let choices = [
        (&loader.oneshot, "chosen for the next boot only"),
        (
            &loader.default,
            "the boot loader's default (`bootctl set-default`: `devos update --rollback`, a fleet's move, or by hand)",
        ),
    ];
    for (choice, why) in choices {
        match choice.as_deref().and_then(named) {
            Some(Ok(e)) => return Some(NextBoot::Entry(e, why)),
            Some(Err(pattern)) => return Some(NextBoot::Other(pattern, why)),
            None => {}
        }
    }
    entries
        .iter()
        .find(|e| !e.failed())
        .map(|e| NextBoot::Entry(e, "the newest version with tries left"))
        .or_else(|| {
            entries
                .first()
                .map(|e| NextBoot::Entry(e, "every version's tries are used up"))
        })
}

/// Versions compared as systemd compares them (`strverscmp_improved`, which
/// systemd-boot sorts its entries and systemd-sysupdate its versions with): characters
/// other than letters, digits and `~-^.` are skipped; `~` sorts before anything, even
/// the end; then runs of digits compare as numbers and are newer than letters, runs of
/// letters as text; `-`, `^` and `.` separate.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let valid = |c: u8| c.is_ascii_alphanumeric() || b"~-^.".contains(&c);
    // The byte at `k`, NUL past the end (as in C).
    let at = |s: &[u8], k: usize| s.get(k).copied().unwrap_or(0);
    let run =
        |s: &[u8], k: usize, of: fn(&u8) -> bool| k + s[k..].iter().take_while(|c| of(c)).count();
    let (mut i, mut j) = (0, 0);
    loop {
        while i < a.len() && !valid(a[i]) {
            i += 1;
        }
        while j < b.len() && !valid(b[j]) {
            j += 1;
        }
        // `~` (a pre-release) is older than anything, the end included.
        if at(a, i) == b'~' || at(b, j) == b'~' {
            let r = (at(a, i) != b'~').cmp(&(at(b, j) != b'~'));
            if r.is_ne() {
                return r;
            }
            i += 1;
            j += 1;
        }
        // At the end of either: the longer is newer.
        if i >= a.len() || j >= b.len() {
            return a[i.min(a.len())..].cmp(&b[j.min(b.len())..]);
        }
        // A separator where the other has none: older.
        for sep in [b'-', b'^', b'.'] {
            if at(a, i) == sep || at(b, j) == sep {
                let r = (at(a, i) != sep).cmp(&(at(b, j) != sep));
                if r.is_ne() {
                    return r;
                }
                i += 1;
                j += 1;
            }
        }
        let (ea, eb);
        if at(a, i).is_ascii_digit() || at(b, j).is_ascii_digit() {
            // Numbers: newer than letters, then by value (leading zeros dropped).
            (ea, eb) = (run(a, i, u8::is_ascii_digit), run(b, j, u8::is_ascii_digit));
            let r = (ea != i).cmp(&(eb != j));
            if r.is_ne() {
                return r;
            }
            while i < ea && a[i] == b'0' {
                i += 1;
            }
            while j < eb && b[j] == b'0' {
                j += 1;
            }
            let r = (ea - i)
                .cmp(&(eb - j))
                .then_with(|| a[i..ea].cmp(&b[j..eb]));
            if r.is_ne() {
                return r;
            }
        } else {
            // Letters: as text, a longer run newer.
            (ea, eb) = (
                run(a, i, u8::is_ascii_alphabetic),
                run(b, j, u8::is_ascii_alphabetic),
            );
            let n = (ea - i).min(eb - j);
            let r = a[i..i + n]
                .cmp(&b[j..j + n])
                .then_with(|| (ea - i).cmp(&(eb - j)));
            if r.is_ne() {
                return r;
            }
        }
        (i, j) = (ea, eb);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(file: &str) -> Entry {
        Entry::parse("devos", file).unwrap()
    }

    #[test]
    fn entries_are_read_with_their_tries() {
        assert_eq!(entry("devos_0.2.1_ab.efi").tries, None);
        assert_eq!(entry("devos_0.2.1_ab+3.efi").tries, Some((3, 0)));
        assert_eq!(entry("devos_0.2.1_ab+2-1.efi").tries, Some((2, 1)));
        assert_eq!(entry("devos_0.2.1_ab+0-3.efi").version, "0.2.1_ab");
        assert!(entry("devos_0.2.1_ab+3.efi").untried());
        assert!(!entry("devos_0.2.1_ab+2-1.efi").untried());
        assert!(entry("devos_0.2.1_ab+0-3.efi").failed());
        for other in [
            "devos.efi",
            "devos-x_0.2.1.efi",
            "devos_0.2.1+x.efi",
            "devos_0.2.1",
            "other_0.2.1.efi",
        ] {
            assert_eq!(Entry::parse("devos", other), None, "{other}");
        }
    }

    #[test]
    fn the_next_boot_is_chosen_as_systemd_boot_chooses_it() {
        let entries = [
            entry("devos_0.2.2+0-3.efi"),
            entry("devos_0.2.1+2-1.efi"),
            entry("devos_0.2.0.efi"),
        ];
        let mut loader = LoaderState {
            loader_version: Some(257),
            ..LoaderState::default()
        };
        let next = |l: &LoaderState| match next_boot(&entries, l) {
            Some(NextBoot::Entry(e, _)) => e.version.clone(),
            other => format!("{other:?}"),
        };
        // The newest with tries left; a failed one is passed over.
        assert_eq!(next(&loader), "0.2.1");
        // The default, compared without regard to case, a glob.
        loader.default = Some("DEVOS_0.2.0.EFI".into());
        assert_eq!(next(&loader), "0.2.0");
        loader.default = Some("devos_0.2.[0-0]*".into());
        assert_eq!(next(&loader), "0.2.0");
        // systemd-boot 257 names a counted entry with its counter: a default that
        // names it as it was before this boot renamed it names nothing; from 258 on
        // ids leave the counter out, on both sides.
        loader.default = Some("devos_0.2.1+3-0.efi".into());
        assert_eq!(
            next_boot(&entries, &loader),
            Some(NextBoot::Other(
                "devos_0.2.1+3-0.efi".into(),
                "the boot loader's default (`bootctl set-default`: `devos update --rollback`, a fleet's move, or by hand)"
            ))
        );
        loader.loader_version = Some(258);
        loader.default = Some("devos_0.2.2.efi".into());
        assert_eq!(next(&loader), "0.2.2");
        // `@saved`: the entry booted last.
        loader.default = Some("@saved".into());
        loader.last_booted = Some("devos_0.2.0.efi".into());
        assert_eq!(next(&loader), "0.2.0");
        // A one-shot choice comes first.
        loader.oneshot = Some("devos_0.2.1.efi".into());
        assert_eq!(next(&loader), "0.2.1");
        // Every version failed: the newest still boots.
        let failed = [entry("devos_0.2.2+0-3.efi"), entry("devos_0.2.1+0-3.efi")];
        let Some(NextBoot::Entry(e, why)) = next_boot(&failed, &LoaderState::default()) else {
            panic!()
        };
        assert_eq!(
            (e.version.as_str(), why),
            ("0.2.2", "every version's tries are used up")
        );
        assert!(next_boot(&[], &LoaderState::default()).is_none());
    }

    #[test]
    fn globs_match_as_the_boot_loader_matches_ids() {
        for (pattern, text, hit) in [
            ("devos_*.efi", "devos_0.2.1.efi", true),
            ("devos_*.efi", "devos_0.2.1.conf", false),
            ("*", "", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("[a-c]x", "bx", true),
            ("[!a-c]x", "bx", false),
            ("[^a-c]x", "dx", true),
            ("[]]", "]", true),
            ("a[b", "a[b", true),
            ("*0.2.1*", "devos_0.2.1_ab+3-0.efi", true),
            ("devos", "devos_0", false),
        ] {
            assert_eq!(glob_match(pattern, text), hit, "{pattern} {text}");
        }
    }

    #[test]
    fn versions_compare_as_systemd_compares_them() {
        use std::cmp::Ordering::*;
        // Each as `systemd-analyze compare-versions` answers it.
        for (a, b, want) in [
            ("0.2.10_a", "0.2.9_b", Greater),
            ("0.2.1_abc", "0.2.1_1bc", Less),
            ("0.2.1_a", "0.2.1_a", Equal),
            ("0.2.0_ff", "0.2.1_00", Less),
            ("1.0.01", "1.0.1", Equal),
            ("1.0~rc1", "1.0", Less),
            ("1.0", "1.0.1", Less),
            ("1.0-2", "1.0.1", Less),
            ("1.0^1", "1.0", Greater),
            ("1.0^1", "1.0.1", Less),
            ("abc", "abcd", Less),
            ("1a", "1", Greater),
            ("1", "a", Greater),
            ("", "0", Less),
            ("1_2", "1.2", Greater),
            ("1+2", "12", Less),
        ] {
            assert_eq!(version_cmp(a, b), want, "{a} {b}");
            assert_eq!(version_cmp(b, a), want.reverse(), "{b} {a}");
        }
    }

    #[test]
    fn the_loader_s_version_and_the_counted_name_are_read() {
        assert_eq!(loader_major("systemd-boot 257.9-1~deb13u1"), Some(257));
        assert_eq!(loader_major("systemd-boot 258"), Some(258));
        assert_eq!(loader_major("GRUB 2.12"), None);
        let loader = LoaderState {
            count_path: Some("\\EFI\\Linux\\devos_0.2.1+2-1.efi".into()),
            ..LoaderState::default()
        };
        assert!(loader.counted());
        assert_eq!(loader.counted_name(), Some("devos_0.2.1+2-1.efi"));
        assert_eq!(entry("devos_0.2.1+2-1.efi").uncounted(), "devos_0.2.1.efi");
        assert_eq!(entry("devos_0.2.1.efi").uncounted(), "devos_0.2.1.efi");
    }

    #[test]
    fn efi_strings_are_read_as_efivarfs_shows_them() {
        let mut var = vec![7, 0, 0, 0];
        for u in "devos_0.2.2+2-1.efi".encode_utf16().chain([0]) {
            var.extend_from_slice(&u.to_le_bytes());
        }
        assert_eq!(efi_string(&var).as_deref(), Some("devos_0.2.2+2-1.efi"));
        assert_eq!(efi_string(&[7, 0, 0, 0, 0, 0]), None);
        assert_eq!(efi_string(&[7]), None);
    }
}
