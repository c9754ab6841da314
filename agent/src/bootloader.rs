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
    /// The entry chosen for every boot (`bootctl set-default`: `LoaderEntryDefault`).
    pub default: Option<String>,
    /// The entry chosen for the next boot only (`LoaderEntryOneShot`).
    pub oneshot: Option<String>,
    /// Whether this boot is counted (`LoaderBootCountPath`): a version on trial.
    pub counted: bool,
}

impl LoaderState {
    /// The running machine's (all unset where systemd-boot did not start it).
    pub fn read() -> Self {
        Self {
            selected: loader_var("LoaderEntrySelected"),
            default: loader_var("LoaderEntryDefault"),
            oneshot: loader_var("LoaderEntryOneShot"),
            counted: loader_var("LoaderBootCountPath").is_some(),
        }
    }
}

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
    fn parse(image: &str, file: &str) -> Option<Self> {
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

    /// Whether the boot loader's entry id `id` names this entry (it compares ids
    /// without regard to case).
    fn is(&self, id: &str) -> bool {
        self.file.eq_ignore_ascii_case(id)
    }
}

/// `image`'s kernel images in `dir`, newest version first.
pub fn entries(dir: &Path, image: &str) -> std::io::Result<Vec<Entry>> {
    let mut entries: Vec<Entry> = std::fs::read_dir(dir)?
        .filter_map(|e| Entry::parse(image, &e.ok()?.file_name().into_string().ok()?))
        .collect();
    entries.sort_by(|a, b| version_cmp(&b.version, &a.version));
    Ok(entries)
}

/// The entry the next boot starts, as systemd-boot chooses it, and why: the one-shot
/// choice, else the default (`bootctl set-default`), else the newest version that has
/// tries left (a failed one only when nothing else is left). `entries` newest first.
pub fn next_boot<'a>(
    entries: &'a [Entry],
    loader: &LoaderState,
) -> Option<(&'a Entry, &'static str)> {
    let named = |id: &Option<String>| {
        id.as_deref()
            .and_then(|id| entries.iter().find(|e| e.is(id)))
    };
    if let Some(e) = named(&loader.oneshot) {
        return Some((e, "chosen for the next boot only"));
    }
    if let Some(e) = named(&loader.default) {
        return Some((
            e,
            "the boot loader's default (`devos update --rollback` or a fleet's move chose it)",
        ));
    }
    entries
        .iter()
        .find(|e| !e.failed())
        .map(|e| (e, "the newest version with tries left"))
        .or_else(|| {
            entries
                .first()
                .map(|e| (e, "every version's tries are used up"))
        })
}

/// Versions compared as systemd does, near enough: runs of digits as numbers, the rest
/// as text (`0.2.10` is newer than `0.2.9`).
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut rest = s;
        while let Some(c) = rest.chars().next() {
            let digit = c.is_ascii_digit();
            let end = rest
                .find(|ch: char| ch.is_ascii_digit() != digit)
                .unwrap_or(rest.len());
            out.push((digit, &rest[..end]));
            rest = &rest[end..];
        }
        out
    }
    fn key((digit, part): (bool, &str)) -> (bool, usize, &str) {
        let trimmed = part.trim_start_matches('0');
        if digit {
            (true, trimmed.len(), trimmed)
        } else {
            (false, 0, part)
        }
    }
    parts(a)
        .into_iter()
        .map(key)
        .cmp(parts(b).into_iter().map(key))
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
        let mut loader = LoaderState::default();
        let next = |l: &LoaderState| next_boot(&entries, l).map(|(e, _)| e.version.clone());
        // The newest with tries left; a failed one is passed over.
        assert_eq!(next(&loader).as_deref(), Some("0.2.1"));
        // The default, compared without regard to case; one that names no entry any
        // more (renamed by a counted boot) is not a choice.
        loader.default = Some("DEVOS_0.2.0.EFI".into());
        assert_eq!(next(&loader).as_deref(), Some("0.2.0"));
        loader.default = Some("devos_0.2.0+3.efi".into());
        assert_eq!(next(&loader).as_deref(), Some("0.2.1"));
        // A one-shot choice comes first.
        loader.oneshot = Some("devos_0.2.2+0-3.efi".into());
        assert_eq!(next(&loader).as_deref(), Some("0.2.2"));
        // Every version failed: the newest still boots.
        let failed = [entry("devos_0.2.2+0-3.efi"), entry("devos_0.2.1+0-3.efi")];
        let (e, why) = next_boot(&failed, &LoaderState::default()).unwrap();
        assert_eq!(
            (e.version.as_str(), why),
            ("0.2.2", "every version's tries are used up")
        );
        assert!(next_boot(&[], &LoaderState::default()).is_none());
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
