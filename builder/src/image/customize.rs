//! The `customize` stage: turn a bootstrapped tree into a DevOS image tree — the agent
//! package and its config, os-release identity, users, hostname, fstab, enabled
//! units, an empty machine-id — ready to be split into partitions.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::image::identity::Identity;
use crate::model::spec::{RootFs, Spec};
use crate::support::{cmd, remove};

/// Units enabled in every image: (unit, the target whose .wants gets it).
const ENABLED_UNITS: &[(&str, &str)] = &[
    ("systemd-networkd.service", "multi-user.target"),
    ("systemd-networkd.socket", "sockets.target"),
];

/// Units that make no sense in an immutable VM image and only cost boot time (each is
/// a process or a mount that takes 1-2 s of CPU under TCG): package maintenance,
/// scrubbing a read-only root, and early module loads for hardware and subsystems a
/// DevOS VM does not use (GPUs, device-mapper, loop, pstore, configfs, huge pages).
/// The modules still load on demand when something needs them.
const MASKED_UNITS: &[&str] = &[
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "apt-daily.service",
    "apt-daily-upgrade.service",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "modprobe@drm.service",
    "modprobe@dm_mod.service",
    "modprobe@loop.service",
    "modprobe@efi_pstore.service",
    "modprobe@configfs.service",
    "sys-kernel-config.mount",
    "dev-hugepages.mount",
    // /dev/fuse is a static node: opening it loads the module when it is needed.
    "modprobe@fuse.service",
    "sys-fs-fuse-connections.mount",
    // Unpacks the initrd into /run on every boot (1.4 s under TCG, 28 MB of memory) for
    // dracut's shutdown module, which the initrd does not have.
    "dracut-shutdown.service",
    // udev rules handed in as credentials: images bring their rules in the tree.
    "systemd-udev-load-credentials.service",
];

/// Generators (run by systemd before any unit starts, on every boot and reload) of what
/// a DevOS image does not use: sshd on AF_VSOCK and a local AF_UNIX socket (the query
/// loads the vsock and VMCI modules; DevOS runs ssh.service), SysV init scripts (every
/// package here has native units), /etc/rc.local, resume from hibernation (no swap),
/// TPM2 setup; and dm-verity's, whose work is done in the initrd (its unit in the booted
/// system only finds `/dev/mapper/root` open, at the cost of a process that loads
/// libcryptsetup). Masked the way systemd documents: a link to /dev/null in /etc. The
/// initrd, made before, keeps its own.
const MASKED_GENERATORS: &[&str] = &[
    "systemd-ssh-generator",
    "systemd-veritysetup-generator",
    "systemd-sysv-generator",
    "systemd-rc-local-generator",
    "systemd-hibernate-resume-generator",
    "systemd-tpm2-generator",
];

/// Units the agent package brings, enabled when `[agent] enable` is true.
const AGENT_UNITS: &[(&str, &str)] = &[
    ("devos-agent.service", "multi-user.target"),
    ("devos-ec2-keys.service", "multi-user.target"),
    ("devos-selftest.service", "multi-user.target"),
];

pub(crate) fn customize(spec: &Spec, id: &Identity, root: &Path, agent_deb: &Path) -> Result<()> {
    check_bootable(spec, root)?;
    if spec.agent_enabled {
        install_agent(spec, root, agent_deb)?;
    }
    write_os_release(spec, id, root)?;
    write_identity(spec, root)?;
    write_fstab(spec, id, root)?;
    write_network(root)?;
    mask_units(root)?;
    create_users(spec, root)?;
    crate::image::access::set_up(spec, root)?;
    // /home lives on the writable data partition; tmpfiles must not try to make it a
    // directory on the read-only root.
    replace_with_symlink(&root.join("home"), "var/home")?;
    fs::create_dir_all(root.join("var/home"))?;
    // The ESP's mount point: systemd mounts the ESP the machine booted from there on
    // first access (gpt-auto), where updates install the next kernel image. The root
    // is read-only, so the directory must be in the image.
    fs::create_dir_all(root.join("efi"))?;
    fs::write(
        root.join("etc/tmpfiles.d/home.conf"),
        "# DevOS: /home is a symlink to /var/home (the writable data partition).\nd /var/home 0755 - - -\n",
    )?;
    if let Some(update) = &spec.update {
        write_update_config(spec, id, update, root)?;
    }
    for tree in &spec.extra_trees {
        copy_tree(tree, root)?;
    }
    for unit in &spec.enable_units {
        in_image(root, &["systemctl", "enable", "--", unit]).with_context(|| {
            format!(
                "cannot enable {unit} (`[system] enable-units` in {})\n  hint: the unit must be in the image, from a package or an extra tree, with an [Install] section",
                spec.path.display()
            )
        })?;
    }
    remove_build_leftovers(root)?;
    mark_updated(root, id.source_date_epoch)?;
    // Last: every file time in the image is at most SOURCE_DATE_EPOCH.
    crate::image::files::clamp_mtimes(root, id.source_date_epoch)?;
    Ok(())
}

/// `[update]`: systemd-sysupdate's transfer files for the feed, and the key its
/// signature must be made with, where systemd-pull looks first.
fn write_update_config(
    spec: &Spec,
    id: &Identity,
    update: &crate::model::spec::Update,
    root: &Path,
) -> Result<()> {
    let dir = root.join(crate::image::sysupdate::TRANSFER_DIR);
    fs::create_dir_all(&dir)?;
    for (name, text) in crate::image::sysupdate::transfers(&spec.name, &id.version, &update.url) {
        fs::write(dir.join(name), text)?;
    }
    let keyring = root.join(crate::image::sysupdate::KEYRING);
    fs::write(&keyring, &update.key)?;
    fs::set_permissions(&keyring, fs::Permissions::from_mode(0o644))?;
    // A version on trial is good (systemd-bless-boot) only once its agent is healthy.
    if spec.agent_enabled {
        let requires = root.join("etc/systemd/system/boot-complete.target.requires");
        fs::create_dir_all(&requires)?;
        symlink(
            "/usr/lib/systemd/system/devos-boot-complete.service",
            requires.join("devos-boot-complete.service"),
        )?;
    }
    Ok(())
}

/// Run a command chrooted into the image (its own programs, its paths).
fn in_image(root: &Path, argv: &[&str]) -> Result<()> {
    cmd::run(Command::new("chroot").arg(root).args(argv))?;
    Ok(())
}

/// Copy an extra tree into the image: packed on the host (owned by root, modes kept)
/// and unpacked by the image's own tar inside a chroot, so that the image's
/// symlinks (`/lib` -> `usr/lib`, absolute ones in /etc) resolve inside the image and
/// never to the host.
fn copy_tree(tree: &crate::model::spec::ExtraTree, root: &Path) -> Result<()> {
    use std::process::Stdio;
    let what = || {
        format!(
            "cannot copy the extra tree {} into {}",
            tree.path.display(),
            tree.target
        )
    };
    check_tree(tree)?;
    in_image(root, &["mkdir", "-p", "--", &tree.target]).with_context(what)?;
    let mut pack = Command::new("tar")
        .args([
            "--create",
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--sort=name",
            "-C",
        ])
        .arg(&tree.path)
        .arg(".")
        .stdout(Stdio::piped())
        .spawn()
        .with_context(what)?;
    let packed = pack.stdout.take().context("tar has no stdout")?;
    let unpack = Command::new("chroot")
        .arg(root)
        .args([
            "tar",
            "--extract",
            "--keep-directory-symlink",
            "--no-overwrite-dir",
            "-C",
        ])
        .arg(&tree.target)
        .stdin(packed)
        .output()
        .with_context(what)?;
    if !pack.wait().with_context(what)?.success() {
        bail!(
            "{}: tar could not read the tree (its message is above)",
            what()
        );
    }
    if !unpack.status.success() {
        bail!(
            "{}: {}\n  hint: an extra tree holds only files, directories and symlinks; a path in it that is a file in the image cannot become a directory",
            what(),
            String::from_utf8_lossy(&unpack.stderr).trim()
        );
    }
    Ok(())
}

/// Refuse an entry of an extra tree the builder does not copy: a symlink that points
/// outside the image, a device node, FIFO or socket (the spec's check, again when the
/// tree is copied: it may have changed since the spec was read).
fn check_tree(tree: &crate::model::spec::ExtraTree) -> Result<()> {
    if let Some(bad) = tree
        .bad_entry()
        .with_context(|| format!("cannot read {}", tree.path.display()))?
    {
        bail!("{} {}\n  hint: {}", bad.path.display(), bad.what, bad.hint);
    }
    Ok(())
}

/// Mark /etc and /var as up to date with /usr. Units with `ConditionNeedsUpdate=`
/// (ldconfig, hwdb and journal catalog rebuilds) would otherwise run on every boot,
/// because a read-only root can never record that they ran.
fn mark_updated(root: &Path, source_date_epoch: u64) -> Result<()> {
    // /usr's time as it will be once every time is clamped.
    let usr = fs::metadata(root.join("usr"))?
        .modified()?
        .min(std::time::UNIX_EPOCH + std::time::Duration::from_secs(source_date_epoch));
    let nsec = usr
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    for dir in ["etc", "var"] {
        let path = root.join(dir).join(".updated");
        // A new file, never through whatever is at the path (an extra tree may have
        // put a symlink there).
        remove::file_if_present(&path)?;
        let mut file = fs::File::options()
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.write_all(
            format!("# This file was created by devos-build.\nTIMESTAMP_NSEC={nsec}\n").as_bytes(),
        )?;
        file.set_modified(usr)?;
    }
    Ok(())
}

fn check_bootable(spec: &Spec, root: &Path) -> Result<()> {
    let needs = [
        ("boot/vmlinuz-*", "a kernel", spec.distro.kernel_package()),
        (
            "usr/lib/systemd/boot/efi/systemd-bootx64.efi",
            "the systemd-boot EFI binary",
            "systemd-boot-efi",
        ),
        ("usr/bin/dbus-daemon", "the D-Bus daemon", "dbus"),
        ("usr/lib/systemd/systemd", "systemd", "systemd-sysv"),
    ];
    for (path, what, package) in needs {
        if crate::image::disk::find_one(root, path).is_none() {
            bail!(
                "the root filesystem has no {what} ({path})\n  hint: add `{package}` to `[packages] include` in {}",
                spec.path.display()
            );
        }
    }
    Ok(())
}

fn install_agent(spec: &Spec, root: &Path, agent_deb: &Path) -> Result<()> {
    // dpkg --root runs the (trigger-only) maintainer scripts chrooted into the tree.
    cmd::run(
        Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .args(["--force-unsafe-io", "-i"])
            .arg(agent_deb),
    )
    .context("while installing the agent package into the image")?;
    fs::write(
        root.join("etc/devos/agent.toml"),
        spec.agent_config.to_file(),
    )?;
    for (unit, target) in AGENT_UNITS {
        enable(root, unit, target)?;
    }
    symlink(
        "/usr/lib/systemd/system/devos-agent.service",
        root.join("etc/systemd/system/dbus-org.devos.Agent1.service"),
    )?;
    Ok(())
}

pub(crate) fn enable(root: &Path, unit: &str, target: &str) -> Result<()> {
    let wants = root.join(format!("etc/systemd/system/{target}.wants"));
    fs::create_dir_all(&wants)?;
    let link = wants.join(unit);
    if link.symlink_metadata().is_err() {
        symlink(format!("/usr/lib/systemd/system/{unit}"), link)?;
    }
    Ok(())
}

/// Add `IMAGE_ID` and `IMAGE_VERSION` to os-release (the file /etc/os-release links to).
fn write_os_release(spec: &Spec, id: &Identity, root: &Path) -> Result<()> {
    let path = root.join("usr/lib/os-release");
    let text =
        fs::read_to_string(&path).with_context(|| format!("while reading {}", path.display()))?;
    let mut out: String = text
        .lines()
        .filter(|l| !l.starts_with("IMAGE_ID=") && !l.starts_with("IMAGE_VERSION="))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(&format!(
        "IMAGE_ID={}\nIMAGE_VERSION={}\n",
        spec.name, id.version
    ));
    fs::write(&path, out)?;
    Ok(())
}

fn write_identity(spec: &Spec, root: &Path) -> Result<()> {
    fs::write(root.join("etc/hostname"), format!("{}\n", spec.hostname))?;
    fs::write(
        root.join("etc/hosts"),
        format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{0}\n::1\t\tlocalhost ip6-localhost ip6-loopback\n",
            spec.hostname
        ),
    )?;
    let zone = root.join("usr/share/zoneinfo").join(&spec.timezone);
    if spec.timezone != "UTC" && !zone.exists() {
        bail!(
            "timezone `{}` is not in the image (no {})\n  hint: add `tzdata` to `[packages] include` in {}, or check the zone name",
            spec.timezone,
            zone.display(),
            spec.path.display()
        );
    }
    replace_with_symlink(
        &root.join("etc/localtime"),
        &format!("/usr/share/zoneinfo/{}", spec.timezone),
    )?;
    fs::write(root.join("etc/timezone"), format!("{}\n", spec.timezone))?;
    // Empty: systemd makes a transient id at boot; every machine gets its own.
    fs::write(root.join("etc/machine-id"), "")?;
    // A D-Bus machine id left from the build would be shared by every machine.
    remove::file_if_present(&root.join("var/lib/dbus/machine-id"))?;
    Ok(())
}

/// /var grows into a disk larger than the image (an EBS volume launched larger, a
/// resized qcow2): systemd-repart, at every boot, gives the var partition (the disk's
/// last) the free space after it, and `x-systemd.growfs` in fstab grows the filesystem
/// once mounted. Only the var partition is defined: the ESP and the root slots are
/// left as they are.
fn write_fstab(spec: &Spec, id: &Identity, root: &Path) -> Result<()> {
    let repart = root.join(devos_agent::selftest::REPART_VAR);
    fs::create_dir_all(repart.parent().expect("a file in a directory"))?;
    fs::write(
        &repart,
        "# DevOS: /var takes the free space of a disk larger than the image.\n\
         [Partition]\nType=var\n",
    )?;
    let root_type = match spec.root_fs {
        RootFs::Ext4 => "ext4",
        RootFs::Erofs => "erofs",
    };
    // A verified root is the device dm-verity makes (its partition is named by the
    // root hash, known only once the root is made).
    let root_device = if spec.verity {
        "/dev/mapper/root".to_owned()
    } else {
        format!("PARTUUID={}", id.root_partuuid)
    };
    fs::write(
        root.join("etc/fstab"),
        format!(
            "# DevOS: the root filesystem is read-only; /var is the writable data partition.\n\
             {root_device}\t/\t{root_type}\tro,noatime\t0\t0\n\
             PARTUUID={}\t/var\text4\tdefaults,noatime,nosuid,nodev,x-systemd.growfs\t0\t2\n\
             tmpfs\t/tmp\ttmpfs\tmode=1777,nosuid,nodev\t0\t0\n",
            id.var_partuuid
        ),
    )?;
    Ok(())
}

/// Every wired link by DHCP; instance metadata (IPv4 and EC2's IPv6 address) only for
/// root. The instance's role is the system's (the agent's Bedrock calls, its fleet tags,
/// the health signal): a user who could read its credentials could spend and tag as
/// the machine. `prohibit` fails a user's connect at once (EACCES), for every socket a
/// non-root uid opens, the agent's sandboxed actions included.
const NETWORK: &str = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n\n\
    [RoutingPolicyRule]\nTo=169.254.169.254/32\nUser=1-4294967294\nType=prohibit\nPriority=100\n\n\
    [RoutingPolicyRule]\nTo=fd00:ec2::254/128\nUser=1-4294967294\nType=prohibit\nPriority=100\n";

/// Names are resolved through DNS only: every machine of an image has the same host
/// name, and LLMNR (systemd-resolved's default) would answer and ask for single-label
/// names on every link, where any neighbour can answer for them.
const RESOLVED: &str = "# DevOS (written by devos-build, see its image/customize.rs).\n[Resolve]\nLLMNR=no\nMulticastDNS=no\n";

/// EC2's time service: link-local, it answers on every EC2 instance, with no route
/// out of the VPC needed (IPv4, and the Nitro instances' IPv6 address).
const EC2_TIME_SERVERS: &str = "169.254.169.123 fd00:ec2::123";

/// systemd-timesyncd asks EC2's time service first, then the distribution's servers
/// (the package's own `FallbackNTP=`, which a set `NTP=` would otherwise switch off):
/// it moves on to the next while one does not answer, so the image keeps its clock on
/// EC2 without a way out and anywhere else with one.
fn time_servers(root: &Path) -> Result<()> {
    // (A package without the file names no fallback: EC2's servers alone.)
    let shipped = root.join("etc/systemd/timesyncd.conf");
    let text = match fs::read_to_string(&shipped) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", shipped.display())),
    };
    let fallback = text
        .lines()
        .find_map(|l| l.trim_start_matches('#').strip_prefix("FallbackNTP="))
        .unwrap_or_default()
        .trim();
    // First of the drop-ins: a spec's own (`NTP=` to reset, or its servers) come after.
    let dir = root.join("etc/systemd/timesyncd.conf.d");
    fs::create_dir_all(&dir)?;
    let servers = format!("{EC2_TIME_SERVERS} {fallback}");
    fs::write(
        dir.join("00-devos.conf"),
        format!(
            "# DevOS (written by devos-build, see its image/customize.rs): EC2's time service\n\
             # first, then the distribution's servers.\n[Time]\nNTP={}\n",
            servers.trim_end()
        ),
    )?;
    Ok(())
}

fn write_network(root: &Path) -> Result<()> {
    let dir = root.join("etc/systemd/network");
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("80-devos-dhcp.network"), NETWORK)?;
    for (unit, target) in ENABLED_UNITS {
        enable(root, unit, target)?;
    }
    // Early boot under TCG is bound by CPU: the bus (and the agent, in its own unit)
    // get the larger share while the system starts, ahead of logind, networkd and
    // resolved, which start at the same moment.
    let dbus = root.join("etc/systemd/system/dbus.service.d");
    fs::create_dir_all(&dbus)?;
    fs::write(
        dbus.join("devos-startup.conf"),
        "# DevOS: the bus first while the system starts (see the builder's customize stage).\n[Service]\nStartupCPUWeight=1000\n",
    )?;

    if root.join("usr/lib/systemd/systemd-resolved").exists() {
        replace_with_symlink(
            &root.join("etc/resolv.conf"),
            "../run/systemd/resolve/stub-resolv.conf",
        )?;
        let conf = root.join("etc/systemd/resolved.conf.d");
        fs::create_dir_all(&conf)?;
        fs::write(conf.join("devos.conf"), RESOLVED)?;
    }
    if root.join("usr/lib/systemd/systemd-timesyncd").exists() {
        time_servers(root)?;
    }
    reorder_units(root)?;
    Ok(())
}

/// Units the package orders ahead of something early boot waits for, although nothing
/// there needs them: (unit, the `Before=` entry to drop, whether it moves from
/// sysinit.target to multi-user.target).
/// - systemd-resolved: before sysinit.target (3-4 s under TCG), though nothing in early
///   boot resolves names; started with multi-user.target instead.
/// - systemd-timesyncd: before sysinit.target, though it cannot reach a server before
///   the network is up; it still starts as early (it has no default dependencies), but
///   sysinit.target no longer waits for it.
///
/// (Tried and dropped: taking systemd-journal-flush and systemd-update-utmp off the
/// path too. Early boot under TCG is bound by CPU, not by ordering: their work then
/// competed with dbus and the agent and the agent answered later, not sooner.)
const REORDERED_UNITS: &[(&str, &str, bool)] = &[
    ("systemd-resolved.service", "sysinit.target", true),
    ("systemd-timesyncd.service", "sysinit.target", true),
];

/// Take [`REORDERED_UNITS`] off the early-boot path. Ordering cannot be removed by a
/// drop-in: the image carries the package's unit with the entry taken out of
/// `Before=`, in /etc, regenerated from the package's unit on every build.
fn reorder_units(root: &Path) -> Result<()> {
    for &(unit, not_before, to_multi_user) in REORDERED_UNITS {
        let shipped = root.join("usr/lib/systemd/system").join(unit);
        if !shipped.exists() {
            continue;
        }
        let text = fs::read_to_string(&shipped)
            .with_context(|| format!("while reading {}", shipped.display()))?;
        let mut out = format!(
            "# DevOS: the package's unit, not ordered before {not_before} (see the builder's\n# customize stage).\n"
        );
        for line in text.lines() {
            let line = match line.strip_prefix("Before=") {
                Some(list) => {
                    let kept: Vec<&str> = list
                        .split_whitespace()
                        .filter(|u| *u != not_before)
                        .collect();
                    if kept.is_empty() {
                        continue;
                    }
                    format!("Before={}", kept.join(" "))
                }
                None if to_multi_user && line == "WantedBy=sysinit.target" => {
                    "WantedBy=multi-user.target".into()
                }
                None => line.to_owned(),
            };
            out.push_str(&line);
            out.push('\n');
        }
        fs::write(root.join("etc/systemd/system").join(unit), out)?;
        if to_multi_user {
            let old = root
                .join("etc/systemd/system/sysinit.target.wants")
                .join(unit);
            if old.symlink_metadata().is_ok() {
                fs::remove_file(&old)?;
            }
            enable(root, unit, "multi-user.target")?;
        }
    }
    Ok(())
}

fn mask_units(root: &Path) -> Result<()> {
    for unit in MASKED_UNITS {
        replace_with_symlink(&root.join("etc/systemd/system").join(unit), "/dev/null")?;
    }
    let generators = root.join("etc/systemd/system-generators");
    fs::create_dir_all(&generators)?;
    for generator in MASKED_GENERATORS {
        replace_with_symlink(&generators.join(generator), "/dev/null")?;
    }
    Ok(())
}

/// Users are written straight into passwd/group/shadow (not with useradd) so no
/// build-time date ends up in the image.
fn create_users(spec: &Spec, root: &Path) -> Result<()> {
    if spec.users.is_empty() {
        return Ok(());
    }
    let etc = root.join("etc");
    let mut passwd = fs::read_to_string(etc.join("passwd"))?;
    let mut group = fs::read_to_string(etc.join("group"))?;
    let mut shadow = fs::read_to_string(etc.join("shadow"))?;
    let mut gshadow = fs::read_to_string(etc.join("gshadow")).unwrap_or_default();
    let used: Vec<u32> = passwd
        .lines()
        .chain(group.lines())
        // A line without a numeric id (blank, a comment) takes no id.
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect();
    // A package's account (messagebus, systemd-network, …) of the same name: a second
    // line would make the name mean two accounts.
    let taken = |file: &str, name: &str| file.lines().any(|l| l.split(':').next() == Some(name));
    for user in &spec.users {
        for (file, what) in [(&passwd, "a user"), (&group, "a group")] {
            if taken(file, &user.name) {
                bail!(
                    "[[users]] `{}`: the image already has {what} of that name (made by one of its packages)\n  hint: name the user something else in {}",
                    user.name,
                    spec.path.display()
                );
            }
        }
    }
    let mut next = 1000;
    for user in &spec.users {
        while used.contains(&next) {
            next += 1;
        }
        let uid = next;
        next += 1;
        for g in &user.groups {
            group = add_member(&group, g, &user.name).with_context(|| {
                format!(
                    "user `{}`: group `{g}` does not exist in the image\n  hint: remove it from `groups` in {} or install the package that creates it",
                    user.name,
                    spec.path.display()
                )
            })?;
            gshadow = add_member(&gshadow, g, &user.name).unwrap_or(gshadow);
        }
        passwd.push_str(&format!(
            "{0}:x:{uid}:{uid}::/home/{0}:/bin/bash\n",
            user.name
        ));
        group.push_str(&format!("{}:x:{uid}:\n", user.name));
        // Without a hash the password is locked: keys (or an autologin) get in.
        let hash = user.password_hash.as_deref().unwrap_or("*");
        shadow.push_str(&format!("{}:{hash}::0:99999:7:::\n", user.name));
        gshadow.push_str(&format!("{}:!::\n", user.name));

        let home = root.join("var/home").join(&user.name);
        let ssh = home.join(".ssh");
        fs::create_dir_all(&ssh)?;
        let mut keys = fs::File::create(ssh.join("authorized_keys"))?;
        for k in &user.ssh_authorized_keys {
            writeln!(keys, "{k}")?;
        }
        fs::set_permissions(&home, fs::Permissions::from_mode(0o750))?;
        fs::set_permissions(&ssh, fs::Permissions::from_mode(0o700))?;
        fs::set_permissions(
            ssh.join("authorized_keys"),
            fs::Permissions::from_mode(0o600),
        )?;
        for p in [&home, &ssh, &ssh.join("authorized_keys")] {
            std::os::unix::fs::chown(p, Some(uid), Some(uid))?;
        }
    }
    fs::write(etc.join("passwd"), passwd)?;
    fs::write(etc.join("group"), group)?;
    fs::write(etc.join("shadow"), shadow)?;
    fs::write(etc.join("gshadow"), gshadow)?;
    sudo_without_password(spec, root)
}

/// Where the image has sudo: the users whose spec says `sudo-without-password` (members
/// of `sudo`) are not asked for a password. Everyone else is, as sudoers says: a
/// member without a password cannot use sudo, and nothing they run can either.
fn sudo_without_password(spec: &Spec, root: &Path) -> Result<()> {
    let dir = root.join("etc/sudoers.d");
    let users: Vec<&str> = spec
        .users
        .iter()
        .filter(|u| u.sudo_without_password)
        .map(|u| u.name.as_str())
        .collect();
    if users.is_empty() || !dir.is_dir() {
        return Ok(());
    }
    let mut text = "# DevOS (written by devos-build, see its image/customize.rs): the spec's\n\
        # users with `sudo-without-password = true`.\n"
        .to_owned();
    for user in users {
        text.push_str(&format!(
            "{user} {}\n",
            devos_agent::selftest::SUDO_WITHOUT_PASSWORD
        ));
    }
    let path = dir.join("devos-users");
    fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o440))?;
    Ok(())
}

/// Add `user` to `name` in a group(5)-style file; `None` if the group is missing.
fn add_member(file: &str, name: &str, user: &str) -> Option<String> {
    let mut found = false;
    let out = file
        .lines()
        .map(|l| {
            let mut f: Vec<&str> = l.split(':').collect();
            if f.first() == Some(&name) && f.len() == 4 {
                found = true;
                let members = if f[3].is_empty() {
                    user.to_owned()
                } else {
                    format!("{},{user}", f[3])
                };
                f[3] = "";
                return format!("{}{members}\n", f.join(":"));
            }
            format!("{l}\n")
        })
        .collect();
    found.then_some(out)
}

fn replace_with_symlink(path: &Path, target: &str) -> Result<()> {
    match path.symlink_metadata() {
        Ok(m) if m.is_dir() => fs::remove_dir(path)
            .with_context(|| format!("while replacing {} with a symlink", path.display()))?,
        Ok(_) => fs::remove_file(path)?,
        Err(_) => {}
    }
    symlink(target, path)?;
    Ok(())
}

/// Logs and caches with build-time timestamps that no image should carry (one left
/// behind would make two builds differ, so failing to remove it is an error).
fn remove_build_leftovers(root: &Path) -> Result<()> {
    for file in [
        "var/log/dpkg.log",
        "var/log/alternatives.log",
        "var/log/bootstrap.log",
        "var/cache/ldconfig/aux-cache",
        "var/lib/dpkg/status-old",
        "var/lib/dpkg/diversions-old",
    ] {
        remove::file_if_present(&root.join(file))?;
    }
    for dir in ["var/log/apt", "var/cache/apt/archives"] {
        let dir = root.join(dir);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
        };
        for e in entries {
            let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
            let kind = e
                .file_type()
                .with_context(|| format!("cannot read the type of {}", e.path().display()))?;
            if kind.is_file() {
                remove::file_if_present(&e.path())?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_with_a_link_out_of_the_image_or_a_fifo_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("etc")).unwrap();
        symlink("../usr/lib/os-release", dir.path().join("etc/os-release")).unwrap();
        let tree = crate::model::spec::ExtraTree {
            source: "t".into(),
            target: "/".into(),
            path: dir.path().to_path_buf(),
        };
        check_tree(&tree).unwrap();
        symlink("/etc/passwd", dir.path().join("etc/.updated")).unwrap();
        let e = format!("{:#}", check_tree(&tree).unwrap_err());
        assert!(
            e.contains("etc/.updated") && e.contains("outside the image"),
            "{e}"
        );
        fs::remove_file(dir.path().join("etc/.updated")).unwrap();
        devos_tests::mkfifo(&dir.path().join("etc/pipe"));
        let e = format!("{:#}", check_tree(&tree).unwrap_err());
        assert!(
            e.contains("etc/pipe is a FIFO") && e.contains("only files, directories and symlinks"),
            "{e}"
        );
    }

    #[test]
    fn units_are_taken_off_the_early_boot_path() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("usr/lib/systemd/system")).unwrap();
        fs::create_dir_all(r.join("etc/systemd/system/sysinit.target.wants")).unwrap();
        fs::write(
            r.join("usr/lib/systemd/system/systemd-resolved.service"),
            "[Unit]\nBefore=sysinit.target network.target nss-lookup.target\n\n[Install]\nWantedBy=sysinit.target\n",
        )
        .unwrap();
        symlink(
            "/lib/systemd/system/systemd-resolved.service",
            r.join("etc/systemd/system/sysinit.target.wants/systemd-resolved.service"),
        )
        .unwrap();
        reorder_units(r).unwrap();
        let unit =
            fs::read_to_string(r.join("etc/systemd/system/systemd-resolved.service")).unwrap();
        assert!(
            unit.contains("\nBefore=network.target nss-lookup.target\n"),
            "{unit}"
        );
        assert!(unit.contains("WantedBy=multi-user.target"), "{unit}");
        assert!(
            !r.join("etc/systemd/system/sysinit.target.wants/systemd-resolved.service")
                .exists()
        );
        assert!(
            r.join("etc/systemd/system/multi-user.target.wants/systemd-resolved.service")
                .symlink_metadata()
                .is_ok()
        );
    }

    /// Only users whose spec says so use sudo without a password; images without sudo
    /// get no rule.
    #[test]
    fn sudo_asks_no_password_only_of_users_the_spec_names() {
        let mut spec = crate::model::spec::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../images/devos-debian.toml"
        )))
        .unwrap();
        let user = |name: &str, hash: Option<&str>, nopasswd: bool| crate::model::spec::User {
            name: name.into(),
            groups: vec!["sudo".into()],
            ssh_authorized_keys: Vec::new(),
            password_hash: hash.map(str::to_owned),
            sudo_without_password: nopasswd,
        };
        spec.users = vec![
            user("dev", None, false),
            user("ops", Some("$y$j9T$salt$hash"), true),
            user("admin", None, true),
        ];
        let root = tempfile::tempdir().unwrap();
        let rule = root.path().join("etc/sudoers.d/devos-users");
        sudo_without_password(&spec, root.path()).unwrap();
        assert!(!rule.exists(), "an image without sudo got a rule");
        fs::create_dir_all(root.path().join("etc/sudoers.d")).unwrap();
        sudo_without_password(&spec, root.path()).unwrap();
        let text = fs::read_to_string(&rule).unwrap();
        let rules: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            rules,
            [
                "ops ALL=(ALL:ALL) NOPASSWD: ALL",
                "admin ALL=(ALL:ALL) NOPASSWD: ALL"
            ],
            "{text}"
        );
        assert_eq!(
            fs::metadata(&rule).unwrap().permissions().mode() & 0o7777,
            0o440
        );
        spec.users.truncate(1);
        fs::remove_file(&rule).unwrap();
        sudo_without_password(&spec, root.path()).unwrap();
        assert!(!rule.exists());
    }

    #[test]
    fn the_clock_is_set_from_ec2_s_time_service_then_the_distribution_s() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("etc/systemd")).unwrap();
        fs::write(
            r.join("etc/systemd/timesyncd.conf"),
            "[Time]\n#NTP=\n#FallbackNTP=0.debian.pool.ntp.org 1.debian.pool.ntp.org\n",
        )
        .unwrap();
        time_servers(r).unwrap();
        let conf =
            fs::read_to_string(r.join("etc/systemd/timesyncd.conf.d/00-devos.conf")).unwrap();
        assert!(
            conf.ends_with(
                "[Time]\nNTP=169.254.169.123 fd00:ec2::123 0.debian.pool.ntp.org 1.debian.pool.ntp.org\n"
            ),
            "{conf}"
        );
        // A package that names no fallback, or has no file: EC2's alone.
        fs::remove_file(r.join("etc/systemd/timesyncd.conf")).unwrap();
        time_servers(r).unwrap();
        let conf =
            fs::read_to_string(r.join("etc/systemd/timesyncd.conf.d/00-devos.conf")).unwrap();
        assert!(
            conf.ends_with("NTP=169.254.169.123 fd00:ec2::123\n"),
            "{conf}"
        );
    }

    #[test]
    fn add_member_appends_to_existing_members() {
        let group = "sudo:x:27:\nadm:x:4:syslog\n";
        let g = add_member(group, "sudo", "dev").unwrap();
        assert!(g.contains("sudo:x:27:dev\n"), "{g}");
        let g = add_member(&g, "adm", "dev").unwrap();
        assert!(g.contains("adm:x:4:syslog,dev\n"), "{g}");
        assert!(add_member(group, "wheel", "dev").is_none());
    }
}
