//! Offline checks of values that parse but would fail (or likely fail) a build later:
//! a suite of the other distribution, a timezone that is no zone name or that the
//! image has no zoneinfo for, a supplementary group the base system does not have.
//!
//! What is certain is an error at the key; what may be legitimate (a release newer
//! than this builder, a group a package creates) is a warning, also at the key.

use std::path::Path;

use serde_spanned::Spanned;

use super::{Distro, Source, SpecError};

/// The areas of the tz database's canonical zone names (`Area/Location`).
const ZONE_AREAS: &[&str] = &[
    "Africa",
    "America",
    "Antarctica",
    "Arctic",
    "Asia",
    "Atlantic",
    "Australia",
    "Europe",
    "Indian",
    "Pacific",
    "Etc",
];

/// The groups every Debian and Ubuntu system has: base-passwd's static list, and
/// the system groups systemd's sysusers creates.
pub(super) const BASE_GROUPS: &[&str] = &[
    "root",
    "daemon",
    "bin",
    "sys",
    "adm",
    "tty",
    "disk",
    "lp",
    "mail",
    "news",
    "uucp",
    "man",
    "proxy",
    "kmem",
    "dialout",
    "fax",
    "voice",
    "cdrom",
    "floppy",
    "tape",
    "sudo",
    "audio",
    "dip",
    "www-data",
    "backup",
    "operator",
    "list",
    "irc",
    "src",
    "shadow",
    "utmp",
    "video",
    "sasl",
    "plugdev",
    "staff",
    "games",
    "users",
    "nogroup",
    "systemd-journal",
    "input",
    "kvm",
    "render",
    "sgx",
    "clock",
];

/// A warning at a value: `file:line:col: message`, then the hint.
fn warning<T>(src: &Source, at: &Spanned<T>, message: &str, hint: &str) -> String {
    src.error(at, message, hint).to_string()
}

/// `[system] kernel-cmdline` arguments that change how the builder's root is found,
/// mounted or verified (they come after the builder's own, so they win): a boot test
/// may want one (a root that is not there), an image almost never.
pub(super) fn kernel_cmdline(src: &Source, raw: &Spanned<String>, warnings: &mut Vec<String>) {
    let overrides = |arg: &&str| {
        let key = arg.split_once('=').map_or(*arg, |(k, _)| k);
        matches!(
            key,
            "root" | "roothash" | "rootfstype" | "rootflags" | "ro" | "rw" | "usrhash"
        ) || ["systemd.verity", "rd.systemd.verity", "mount.usr"]
            .iter()
            .any(|p| key.starts_with(p))
    };
    let args: Vec<&str> = raw.get_ref().split_whitespace().filter(overrides).collect();
    if !args.is_empty() {
        warnings.push(warning(
            src,
            raw,
            &format!(
                "`{}` on the kernel command line overrides how the builder finds, mounts or verifies the root",
                args.join(" ")
            ),
            "remove it unless you mean it: the builder sets the root (root=, roothash=, rootfstype=, ro) itself, and a verified root's dm-verity settings are its own",
        ));
    }
}

/// `[agent.config]` with `[agent] enable = false`: written nowhere, as no agent is
/// installed to read it.
pub(super) fn agent_config_unused(
    src: &Source,
    config: &Spanned<toml::Table>,
    warnings: &mut Vec<String>,
) {
    warnings.push(warning(
        src,
        config,
        "`[agent.config]` is ignored: `[agent] enable = false` installs no agent to read it",
        "remove `[agent.config]`, or set `enable = true` to install the agent",
    ));
}

/// `[agent.config.model]` naming a region and a cross-region inference profile that
/// Bedrock does not serve there: every call of the agent would be refused.
pub(super) fn model_profiles(
    src: &Source,
    config: &Spanned<toml::Table>,
    model: &devos_agent::config::ModelConfig,
    warnings: &mut Vec<String>,
) {
    if !model.enabled {
        return;
    }
    for (key, id) in [("small", &model.small), ("large", &model.large)] {
        if let Some(why) = devos_agent::config::profile_outside_region(id, &model.region) {
            warnings.push(warning(
                src,
                config,
                &format!("`[agent.config.model] {key}`: {why} (`model.region`)"),
                "name the model's profile for that region's geography (`eu.…`, `apac.…`, or `global.…` where Bedrock offers it), or a region of the profile's geography",
            ));
        }
    }
}

/// `[base] suite` for Debian or Ubuntu: another distribution's codename is an error;
/// a codename this builder does not know is a warning (it may be newer), with the
/// known name it is closest to.
pub(super) fn suite(
    src: &Source,
    raw: &Spanned<String>,
    distro: Distro,
    warnings: &mut Vec<String>,
) -> Result<(), SpecError> {
    let other = match distro {
        Distro::Debian => Distro::Ubuntu,
        Distro::Ubuntu => Distro::Debian,
        Distro::Nixos => return Ok(()),
    };
    let name = raw.get_ref().as_str();
    // `bookworm-backports`, `noble-updates`: the codename is before the dash.
    let codename = name.split('-').next().unwrap_or(name);
    if distro.known_suites().contains(&codename) {
        return Ok(());
    }
    if other.known_suites().contains(&codename) {
        return Err(src.error(
            raw,
            format!(
                "`{name}` is a suite of {}, not of {}",
                other.title(),
                distro.title()
            ),
            &format!(
                "set `distro = \"{}\"`, or give a {} suite such as `{}`",
                other.name(),
                distro.title(),
                distro.default_suite()
            ),
        ));
    }
    let near = distro
        .nearest_suite(codename)
        .map(|k| format!("did you mean `{k}`? Otherwise "))
        .unwrap_or_default();
    warnings.push(warning(
        src,
        raw,
        &format!(
            "`{name}` is not a suite devos-build knows for {} ({}, …); if it is new, ignore this",
            distro.title(),
            distro.recent_suites()
        ),
        &format!("{near}check the codename: the build fails if the mirror has no `dists/{name}/`"),
    ));
    Ok(())
}

/// `[system] timezone` (its shape checked where it is read): warnings only, since
/// the build is the judge — a zone the host's database does not have (or, without
/// one, not `Area/Location` with a tz area), and a zone but `UTC` in a Debian or
/// Ubuntu image that does not install tzdata itself (a package may still bring it).
pub(super) fn timezone(
    src: &Source,
    raw: &Spanned<String>,
    distro: Distro,
    packages: &[String],
    zoneinfo: &Path,
    warnings: &mut Vec<String>,
) -> Result<(), SpecError> {
    let zone = raw.get_ref().as_str();
    if zone == "UTC" {
        return Ok(());
    }
    let has = |p: &str| packages.iter().any(|n| n == p);
    let known = if zoneinfo.is_dir() {
        zoneinfo.join(zone).is_file()
    } else {
        has("tzdata-legacy")
            || zone
                .split_once('/')
                .is_some_and(|(area, _)| ZONE_AREAS.contains(&area))
    };
    if !known {
        let whose = if zoneinfo.is_dir() {
            format!("this host's {}", zoneinfo.display())
        } else {
            "the tz database's areas".to_owned()
        };
        warnings.push(warning(
            src,
            raw,
            &format!("timezone `{zone}` is not in {whose}"),
            "check the name (`timedatectl list-timezones`); the build fails if the image's tzdata does not have it",
        ));
    }
    if distro != Distro::Nixos && !has("tzdata") {
        warnings.push(warning(
            src,
            raw,
            &format!("timezone `{zone}` needs the package `tzdata`, which the spec does not install"),
            "add `tzdata` to `[packages] include` (or a layer's), or use `timezone = \"UTC\"`; unless a package the image installs brings it, the build fails when it sets the zone",
        ));
    }
    Ok(())
}

/// `[[users]] groups` of a Debian or Ubuntu image: a group that is not in the base
/// system is a warning (a package may create it; if none does, the build fails).
pub(super) fn groups(
    src: &Source,
    groups: &[Spanned<String>],
    distro: Distro,
    warnings: &mut Vec<String>,
) {
    if distro == Distro::Nixos {
        // The NixOS module maps `sudo` to `wheel` and declares the groups it needs.
        return;
    }
    for g in groups {
        let name = g.get_ref().as_str();
        if BASE_GROUPS.contains(&name) {
            continue;
        }
        let hint = if name == "wheel" {
            format!(
                "{} has no `wheel` group: admins are in `sudo`; use `groups = [\"sudo\"]`",
                distro.title()
            )
        } else {
            "install the package that creates it, or remove it from `groups` (the build fails at the users step if the group is missing)".to_owned()
        };
        warnings.push(warning(
            src,
            g,
            &format!(
                "group `{name}` is not in {}'s base system (sudo, adm, users, …); unless a package in the image creates it, the build fails",
                distro.title()
            ),
            &hint,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(text: &str) -> Source<'_> {
        Source {
            file: Path::new("s.toml"),
            text,
        }
    }

    /// The spanned value `value` of `text` (its first occurrence).
    fn at(text: &str, value: &str) -> Spanned<String> {
        let start = text.find(value).unwrap();
        Spanned::new(start..start + value.len(), value.to_owned())
    }

    #[test]
    fn suites_of_the_other_distro_are_errors_unknown_ones_warnings() {
        let check = |distro, suite: &str| {
            let text = format!("suite = \"{suite}\"");
            let mut warnings = Vec::new();
            let r = self::suite(&src(&text), &at(&text, suite), distro, &mut warnings);
            (r.map_err(|e| e.to_string()), warnings)
        };
        assert_eq!(check(Distro::Debian, "trixie"), (Ok(()), vec![]));
        assert_eq!(
            check(Distro::Debian, "bookworm-backports"),
            (Ok(()), vec![])
        );
        assert_eq!(check(Distro::Ubuntu, "noble"), (Ok(()), vec![]));
        let (r, _) = check(Distro::Debian, "noble");
        let e = r.unwrap_err();
        assert!(
            e.starts_with("s.toml:1:10: `noble` is a suite of Ubuntu, not of Debian")
                && e.contains("hint: set `distro = \"ubuntu\"`"),
            "{e}"
        );
        let e = check(Distro::Ubuntu, "trixie").0.unwrap_err();
        assert!(
            e.contains("`trixie` is a suite of Debian, not of Ubuntu"),
            "{e}"
        );
        let (r, w) = check(Distro::Debian, "trixy");
        assert_eq!(r, Ok(()));
        assert_eq!(w.len(), 1);
        assert!(
            w[0].starts_with("s.toml:1:10: `trixy` is not a suite devos-build knows for Debian (bookworm, trixie, forky, sid, …)")
                && w[0].contains("if it is new, ignore this")
                && w[0].contains("hint: did you mean `trixie`?"),
            "{}",
            w[0]
        );
    }

    #[test]
    fn timezones_need_a_zone_shape_and_tzdata() {
        let zoneinfo = tempfile::tempdir().unwrap();
        std::fs::create_dir(zoneinfo.path().join("Europe")).unwrap();
        std::fs::write(zoneinfo.path().join("Europe/Berlin"), "TZif").unwrap();
        let check = |zone: &str, distro, packages: &[&str], zi: &Path| {
            let text = format!("timezone = \"{zone}\"");
            let packages: Vec<String> = packages.iter().map(|p| (*p).to_owned()).collect();
            let mut warnings = Vec::new();
            let r = timezone(
                &src(&text),
                &at(&text, zone),
                distro,
                &packages,
                zi,
                &mut warnings,
            );
            (r.map_err(|e| e.to_string()), warnings)
        };
        let zi = zoneinfo.path();
        let none = Path::new("/nonexistent/zoneinfo");
        assert_eq!(check("UTC", Distro::Debian, &[], zi), (Ok(()), vec![]));
        assert_eq!(
            check("Europe/Berlin", Distro::Debian, &["tzdata"], zi),
            (Ok(()), vec![])
        );
        // NixOS images always have the zone database.
        assert_eq!(
            check("Europe/Berlin", Distro::Nixos, &[], zi),
            (Ok(()), vec![])
        );
        // Without tzdata in the spec: a warning (a package may bring it).
        let (r, w) = check("Europe/Berlin", Distro::Debian, &["dbus"], zi);
        assert_eq!(r, Ok(()));
        assert!(
            w.len() == 1
                && w[0].starts_with(
                    "s.toml:1:13: timezone `Europe/Berlin` needs the package `tzdata`"
                )
                && w[0].contains("hint: add `tzdata` to `[packages] include`"),
            "{w:?}"
        );
        // Not in the host's database, or without one not Area/Location: a warning.
        for (zone, zi) in [
            ("Mars/Olympus", zi),
            ("Europe/Atlantis", zi),
            ("Mars/Olympus", none),
        ] {
            let (r, w) = check(zone, Distro::Debian, &["tzdata"], zi);
            assert_eq!(r, Ok(()));
            assert!(
                w.len() == 1 && w[0].contains(&format!("timezone `{zone}` is not in")),
                "{w:?}"
            );
        }
        // Legacy names are in tzdata-legacy; a tz area without a database to compare.
        assert_eq!(
            check(
                "US/Eastern",
                Distro::Debian,
                &["tzdata", "tzdata-legacy"],
                none
            ),
            (Ok(()), vec![])
        );
        assert_eq!(
            check("Europe/Atlantis", Distro::Debian, &["tzdata"], none),
            (Ok(()), vec![])
        );
    }

    #[test]
    fn groups_outside_the_base_system_are_warnings() {
        let text = "groups = [\"sudo\", \"wheel\", \"docker\"]";
        let groups = [at(text, "sudo"), at(text, "wheel"), at(text, "docker")];
        let mut w = Vec::new();
        self::groups(&src(text), &groups, Distro::Debian, &mut w);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("s.toml:1:20: group `wheel` is not in Debian's base system")
                && w[0].contains("hint: Debian has no `wheel` group"),
            "{}",
            w[0]
        );
        assert!(w[1].contains("group `docker`") && w[1].contains("hint: install the package"));
        let mut w = Vec::new();
        self::groups(&src(text), &groups, Distro::Nixos, &mut w);
        assert!(w.is_empty());
    }
}
