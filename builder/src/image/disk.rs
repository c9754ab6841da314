//! The `disk` stage: a GPT disk image made from the customized tree without loop
//! devices or mounts — an ESP (FAT, mkfs.vfat + mtools) with systemd-boot, the kernel
//! and initrd; a read-only root (mkfs.ext4 -d or mkfs.erofs); a writable ext4 data
//! partition for /var. Partitions are built as files and copied in at their offsets.
//!
//! With `[disk] verity = true` the root gets a dm-verity hash partition (veritysetup
//! on the file), the kernel, initrd and a command line carrying the root hash become
//! one unified kernel image (the tree's own ukify and systemd-stub), and the disk has
//! two root slots (A holds this version, B is empty for an update), each partition
//! labelled `NAME_VERSION` as systemd-sysupdate expects. The root and hash partitions'
//! UUIDs are the two halves of the root hash (the Discoverable Partitions
//! Specification), which is how systemd in the initrd finds them.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::image::identity::Identity;
use crate::image::secure_boot::{self, Signer};
use crate::model::spec::{RootFs, Spec};
use crate::support::cmd;

const MIB: u64 = 1 << 20;
/// GPT partition type GUIDs (Discoverable Partitions Specification).
const TYPE_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const TYPE_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
const TYPE_VAR: &str = "4D21B016-B534-45C2-A9FB-5C16E091FD2D";
const TYPE_ROOT_VERITY_X86_64: &str = "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5";
/// What systemd-sysupdate calls a slot that holds nothing yet.
const EMPTY_SLOT: &str = "_empty";
/// GPT attribute bit 60: the partition is read-only.
const ATTR_READ_ONLY: &str = "GUID:60";
/// The writable partition never gets less than this.
const MIN_VAR: u64 = 256 * MIB;

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Partition {
    pub(crate) label: String,
    pub(crate) filesystem: String,
    pub(crate) offset: u64,
    pub(crate) size: u64,
}

/// Find the single path matching `pattern` (a `*` is allowed in the last component).
/// `None` also when the directory cannot be listed: callers then say what is missing.
pub(crate) fn find_one(root: &Path, pattern: &str) -> Option<PathBuf> {
    let full = root.join(pattern);
    let name = full.file_name()?.to_str()?.to_owned();
    let Some((prefix, suffix)) = name.split_once('*') else {
        return full.exists().then_some(full);
    };
    let mut found: Vec<PathBuf> = fs::read_dir(full.parent()?)
        .ok()?
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with(prefix) && n.ends_with(suffix) && n.len() >= prefix.len() + suffix.len()
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found.pop()
}

/// What the disk stage made.
#[derive(Debug)]
pub(crate) struct Disk {
    pub(crate) partitions: Vec<Partition>,
    /// The kernel command line the image boots with.
    pub(crate) cmdline: String,
    /// The dm-verity root hash (hex), for a verified root.
    pub(crate) root_hash: Option<String>,
    /// For a verified root: the root and hash images and the UKI, kept in `work` for
    /// the update bundle.
    pub(crate) bundle: Option<Bundle>,
}

/// One version's update: what systemd-sysupdate writes into a slot and the ESP.
#[derive(Debug)]
pub(crate) struct Bundle {
    pub(crate) root: PathBuf,
    pub(crate) verity: PathBuf,
    pub(crate) uki: PathBuf,
    /// The partition UUIDs of the root and hash partitions (the root hash's halves).
    pub(crate) root_uuid: String,
    pub(crate) verity_uuid: String,
}

/// Build the disk image `raw` from the customized tree `root`. `work` holds the
/// partition images while they are made. The tree's /var is moved out (it becomes
/// the data partition) and left empty as the mount point. `ukify`: the tree's
/// archive's ukify, needed for a verified root; `signer`: the Secure Boot key that
/// signs the boot chain (`[disk] secure-boot`).
pub(crate) fn build(
    spec: &Spec,
    id: &Identity,
    root: &Path,
    work: &Path,
    raw: &Path,
    ukify: Option<&Path>,
    signer: Option<&Signer>,
) -> Result<Disk> {
    let (kernel, initrd) = kernel_and_initrd(spec, root)?;
    if spec.verity {
        check_verity_initrd(spec, root)?;
    }
    let var_tree = move_var_out(id, root, work)?;

    let root_img = work.join("root.img");
    let root_size = make_root(spec, id, root, &root_img)?;
    let verity = if spec.verity {
        Some(make_verity(id, &root_img, work)?)
    } else {
        None
    };
    let root_hash = verity.as_ref().map(|(_, _, hash)| hash.clone());
    let cmdline = kernel_cmdline(spec, &id.root_partuuid, root_hash.as_deref());

    let esp = work.join("esp.img");
    let boot = match &verity {
        Some(_) => {
            let ukify = ukify.context("internal error: a verified root needs ukify")?;
            let uki = work.join(uki_name(spec, id));
            make_uki(id, root, &kernel, initrd.as_deref(), &cmdline, ukify, &uki)?;
            // Signed before the update bundle takes it: an update's kernel must start
            // on machines that enrolled this key.
            if let Some(signer) = signer {
                signer.sign_pe(&uki)?;
            }
            Boot::Uki(uki)
        }
        None => Boot::Entry {
            kernel,
            initrd,
            cmdline: cmdline.clone(),
        },
    };
    let esp_size = make_esp(spec, id, root, &boot, signer, &esp)?;

    let mut images = vec![Image {
        file: Some(esp),
        size: esp_size,
        label: "esp".into(),
        filesystem: "vfat".into(),
        type_guid: TYPE_ESP,
        uuid: id.esp_partuuid.clone(),
        attrs: "",
        keep: false,
    }];
    images.extend(root_slots(
        spec,
        id,
        (root_img, root_size),
        verity.as_ref(),
    )?);
    // Layout: 1 MiB for the GPT, the partitions above, var, 1 MiB for the backup GPT.
    let fixed = MIB + images.iter().map(|i| i.size).sum::<u64>() + MIB;
    let var_img = work.join("var.img");
    let var_size = make_var(spec, id, &var_tree, fixed, &var_img)?;
    images.push(Image {
        file: Some(var_img),
        size: var_size,
        label: "devos-var".into(),
        filesystem: "ext4".into(),
        type_guid: TYPE_VAR,
        uuid: id.var_partuuid.clone(),
        attrs: "",
        keep: false,
    });
    let parts = write_disk(id, raw, fixed + var_size, &images)?;
    let bundle = match (verity, boot) {
        (Some((verity, _, hash)), Boot::Uki(uki)) => {
            let (root_uuid, verity_uuid) = root_hash_uuids(&hash);
            Some(Bundle {
                root: work.join("root.img"),
                verity,
                uki,
                root_uuid,
                verity_uuid,
            })
        }
        _ => None,
    };
    Ok(Disk {
        partitions: parts,
        cmdline,
        root_hash,
        bundle,
    })
}

/// How the ESP starts the kernel.
enum Boot {
    /// A unified kernel image (kernel, initrd, command line, os-release in one file).
    Uki(PathBuf),
    /// A Type #1 loader entry naming the kernel and initrd.
    Entry {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

/// One partition to be: its image (`None`: left empty), size, GPT name, type and ids.
struct Image {
    file: Option<PathBuf>,
    size: u64,
    label: String,
    filesystem: String,
    type_guid: &'static str,
    uuid: String,
    attrs: &'static str,
    /// Left in place after it is copied in (the update bundle takes it).
    keep: bool,
}

/// The root partition(s): one plain root, or for a verified root the two slots, A
/// with this version's root and hash tree and B empty, each sized for growth.
fn root_slots(
    spec: &Spec,
    id: &Identity,
    (root_img, root_size): (PathBuf, u64),
    verity: Option<&(PathBuf, u64, String)>,
) -> Result<Vec<Image>> {
    let fs_name = root_fs_name(spec.root_fs).to_owned();
    let Some((hash_img, hash_size, root_hash)) = verity else {
        return Ok(vec![Image {
            file: Some(root_img),
            size: root_size,
            label: "devos-root".into(),
            filesystem: fs_name,
            type_guid: TYPE_ROOT_X86_64,
            uuid: id.root_partuuid.clone(),
            attrs: ATTR_READ_ONLY,
            keep: false,
        }]);
    };
    let label = slot_label(spec, &id.version);
    let (root_slot, hash_slot) = slot_sizes(root_size, *hash_size);
    let (data_uuid, hash_uuid) = root_hash_uuids(root_hash);
    let slot = |file: Option<PathBuf>, size, label: &str, fs: &str, ty, uuid: String| Image {
        file,
        size,
        label: label.to_owned(),
        filesystem: fs.to_owned(),
        type_guid: ty,
        uuid,
        attrs: "",
        keep: true,
    };
    Ok(vec![
        Image {
            attrs: ATTR_READ_ONLY,
            ..slot(
                Some(root_img),
                root_slot,
                &label,
                &fs_name,
                TYPE_ROOT_X86_64,
                data_uuid,
            )
        },
        slot(
            Some(hash_img.clone()),
            hash_slot,
            &label,
            "verity",
            TYPE_ROOT_VERITY_X86_64,
            hash_uuid,
        ),
        slot(
            None,
            root_slot,
            EMPTY_SLOT,
            "",
            TYPE_ROOT_X86_64,
            id.root_b_partuuid.clone(),
        ),
        slot(
            None,
            hash_slot,
            EMPTY_SLOT,
            "",
            TYPE_ROOT_VERITY_X86_64,
            id.verity_b_partuuid.clone(),
        ),
    ])
}

/// Slot sizes for a root of `root` bytes and its hash tree of `hash` bytes: room for
/// later versions to be half as large again, in whole 64 MiB (root) and MiB (hash).
fn slot_sizes(root: u64, hash: u64) -> (u64, u64) {
    let root_slot = (root * 3 / 2).div_ceil(64 * MIB) * 64 * MIB;
    // The hash tree of SHA-256 over 4 KiB blocks is about 1/127 of the data.
    let hash_slot = (root_slot / 100).max(hash * 3 / 2).div_ceil(MIB) * MIB;
    (root_slot, hash_slot)
}

/// `NAME_VERSION`, the partition name systemd-sysupdate matches a slot's version by,
/// for the built `version`. The spec's check (`spec::check_slot_name`) made sure a GPT
/// holds it.
pub(crate) fn slot_label(spec: &Spec, version: &str) -> String {
    crate::image::sysupdate::stem(&spec.name, version)
}

/// The UKI's file name on the ESP: `NAME_VERSION.efi`, which systemd-boot sorts by
/// version and systemd-sysupdate matches.
pub(crate) fn uki_name(spec: &Spec, id: &Identity) -> String {
    format!(
        "{}.efi",
        crate::image::sysupdate::stem(&spec.name, &id.version)
    )
}

/// The data and hash partition UUIDs of a root hash: its first and last 128 bits.
fn root_hash_uuids(root_hash: &str) -> (String, String) {
    (
        crate::image::identity::uuid_text(&root_hash[..32]),
        crate::image::identity::uuid_text(&root_hash[32..64]),
    )
}

/// The dm-verity hash tree of `root_img`, from veritysetup on the file with a salt
/// and UUID derived from the build id (so the same root gives the same bytes): the
/// hash image, its size in whole MiB, and the root hash in hex.
fn make_verity(id: &Identity, root_img: &Path, work: &Path) -> Result<(PathBuf, u64, String)> {
    let hash_img = work.join("root.verity");
    let hash_file = work.join("root.roothash");
    cmd::run(
        Command::new("veritysetup")
            .args(["format", "--hash=sha256"])
            .args(["--data-block-size=4096", "--hash-block-size=4096"])
            .arg(format!("--salt={}", id.verity_salt))
            .arg(format!("--uuid={}", id.verity_uuid))
            .arg(format!("--root-hash-file={}", hash_file.display()))
            .arg(root_img)
            .arg(&hash_img),
    )
    .context("while making the root's dm-verity hash tree")?;
    let root_hash = fs::read_to_string(&hash_file)?.trim().to_owned();
    fs::remove_file(&hash_file)?;
    if root_hash.len() != 64 || !root_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("veritysetup wrote no SHA-256 root hash ({root_hash:?})");
    }
    let size = fs::metadata(&hash_img)?.len().div_ceil(MIB) * MIB;
    fs::OpenOptions::new()
        .write(true)
        .open(&hash_img)?
        .set_len(size)?;
    Ok((hash_img, size, root_hash))
}

/// A verified root is opened by systemd in the initrd: the tree needs systemd's
/// veritysetup and an initrd generator that puts it there (dracut).
fn check_verity_initrd(spec: &Spec, root: &Path) -> Result<()> {
    let needs = [
        (
            "usr/lib/systemd/systemd-veritysetup",
            "systemd-cryptsetup",
            "systemd's veritysetup",
        ),
        ("usr/bin/dracut", "dracut", "dracut (systemd in the initrd)"),
        (
            "usr/lib/systemd/boot/efi/linuxx64.efi.stub",
            "systemd-boot-efi",
            "systemd-stub (the unified kernel image)",
        ),
    ];
    for (file, package, what) in needs {
        if fs::symlink_metadata(root.join(file)).is_err() {
            bail!(
                "`[disk] verity = true` in {} needs {what}, but the tree has no /{file}\n  hint: add `{package}` to `[packages] include` (and `dracut` in place of `initramfs-tools`)",
                spec.path.display()
            );
        }
    }
    Ok(())
}

/// The unified kernel image `out`: the tree's systemd-stub with the kernel, initrd,
/// command line and os-release, assembled by ukify (from the tree's own archive, run
/// by the host's python3; reproducible with SOURCE_DATE_EPOCH).
fn make_uki(
    id: &Identity,
    root: &Path,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    ukify: &Path,
    out: &Path,
) -> Result<()> {
    let os_release = root.join("usr/lib/os-release");
    // Read from the host: the file itself, never a link that could lead out of the tree.
    if !fs::symlink_metadata(&os_release).is_ok_and(|m| m.is_file()) {
        bail!("{} is not a regular file", os_release.display());
    }
    // Debian's python3, which has python3-pefile (not whichever python3 is first in PATH).
    let mut c = Command::new("/usr/bin/python3");
    c.arg(ukify)
        .arg("build")
        .arg(format!("--linux={}", kernel.display()))
        .arg(format!(
            "--stub={}",
            root.join("usr/lib/systemd/boot/efi/linuxx64.efi.stub")
                .display()
        ))
        .arg(format!("--cmdline={cmdline}"))
        .arg(format!("--os-release=@{}", os_release.display()))
        .arg(format!("--output={}", out.display()))
        .env("SOURCE_DATE_EPOCH", id.source_date_epoch.to_string());
    if let Some(initrd) = initrd {
        c.arg(format!("--initrd={}", initrd.display()));
    }
    if let Some(kver) = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
    {
        c.arg(format!("--uname={kver}"));
    }
    cmd::run(&mut c).context("while making the unified kernel image with ukify")?;
    Ok(())
}

/// The /var image: the disk left after `fixed`, at least twice its content; its size.
fn make_var(
    spec: &Spec,
    id: &Identity,
    var_tree: &Path,
    fixed: u64,
    var_img: &Path,
) -> Result<u64> {
    let var_content = tree_size(var_tree)?;
    let var_needed = (var_content.bytes * 2).max(MIN_VAR);
    if spec.disk_size < fixed + var_needed {
        bail!(
            "disk size {} MiB in {} is too small: the ESP and root need {} MiB and /var at least {} MiB\n  hint: set `[disk] size = \"{}M\"` or more",
            spec.disk_size / MIB,
            spec.path.display(),
            (fixed) / MIB,
            var_needed / MIB,
            (fixed + var_needed).div_ceil(MIB)
        );
    }
    let var_size = (spec.disk_size - fixed) / MIB * MIB;
    mkfs_ext4(
        var_tree,
        &var_content,
        var_img,
        var_size,
        "devos-var",
        &id.var_fs_uuid,
        id,
        true,
    )?;
    Ok(var_size)
}

/// The kernel in /boot, and its initrd unless the spec boots without one (then the
/// kernel must be able to find the root by itself).
fn kernel_and_initrd(spec: &Spec, root: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let kernel = find_one(root, "boot/vmlinuz-*").context("no kernel in /boot")?;
    let kver = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    // The files themselves, never a symlink (read from the host, a link could lead
    // out of the image).
    let regular = |p: &Path| fs::symlink_metadata(p).is_ok_and(|m| m.is_file());
    if !regular(&kernel) {
        bail!("{} is not a regular file", kernel.display());
    }
    let initrd = root.join(format!("boot/initrd.img-{kver}"));
    let initrd = if spec.initrd {
        if !regular(&initrd) {
            bail!(
                "the kernel {kver} has no initrd ({})\n  hint: add `initramfs-tools` (or `dracut`) to `[packages] include` in {}",
                initrd.display(),
                spec.path.display()
            );
        }
        Some(initrd)
    } else {
        check_direct_boot(spec, root, &kver)?;
        None
    };
    Ok((kernel, initrd))
}

/// Move the tree's /var out into `work` (it becomes its own partition), leaving an
/// empty mount point with the image's times.
fn move_var_out(id: &Identity, root: &Path, work: &Path) -> Result<PathBuf> {
    let var_tree = work.join("var-tree");
    fs::rename(root.join("var"), &var_tree)?;
    fs::create_dir(root.join("var"))?;
    fs::set_permissions(root.join("var"), fs::Permissions::from_mode(0o755))?;
    // Units that start before /var is mounted (systemd 257's `PrivateTmp=disconnected`,
    // e.g. systemd-resolved) mount their own /var/tmp, which needs a place to go on the
    // read-only root.
    fs::create_dir(root.join("var/tmp"))?;
    fs::set_permissions(root.join("var/tmp"), fs::Permissions::from_mode(0o1777))?;
    // The new mount points and the root they changed keep the image's times.
    let epoch = filetime::FileTime::from_unix_time(
        i64::try_from(id.source_date_epoch).unwrap_or(i64::MAX),
        0,
    );
    for dir in [root.join("var/tmp"), root.join("var"), root.to_path_buf()] {
        filetime::set_file_times(&dir, epoch, epoch)?;
    }
    Ok(var_tree)
}

/// A new sparse file of `size` bytes: the disk, or one of its partitions. A size the
/// output directory's filesystem cannot hold in one file is said against `[disk] size`.
fn sparse_file(path: &Path, size: u64) -> Result<fs::File> {
    let file =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    match file.set_len(size) {
        Ok(()) => Ok(file),
        Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => bail!(
            "cannot make {} {size} bytes long: {e}\n  hint: `[disk] size` is more than the output directory's filesystem holds in one file (ext4: under 16 TiB); choose a smaller size, or build onto another filesystem",
            path.display()
        ),
        Err(e) => {
            Err(e).with_context(|| format!("cannot make {} {size} bytes long", path.display()))
        }
    }
}

/// A sparse disk of `total` bytes with a GPT naming `images` one after the other from
/// 1 MiB, each copied in at its offset (and its file removed); where they went.
fn write_disk(id: &Identity, raw: &Path, total: u64, images: &[Image]) -> Result<Vec<Partition>> {
    drop(sparse_file(raw, total)?);
    let mut script = format!(
        "label: gpt\nlabel-id: {}\nunit: sectors\nfirst-lba: 2048\nsector-size: 512\n\n",
        id.disk_guid
    );
    let mut parts = Vec::new();
    let mut offset = MIB;
    for i in images {
        script.push_str(&format!(
            "start={}, size={}, type={}, uuid={}, name=\"{}\"{}\n",
            offset / 512,
            i.size / 512,
            i.type_guid,
            i.uuid,
            i.label,
            if i.attrs.is_empty() {
                String::new()
            } else {
                format!(", attrs=\"{}\"", i.attrs)
            }
        ));
        parts.push(Partition {
            label: i.label.clone(),
            filesystem: i.filesystem.clone(),
            offset,
            size: i.size,
        });
        offset += i.size;
    }
    cmd::run_with_input(
        Command::new("sfdisk")
            .args(["--quiet", "--no-reread", "--no-tell-kernel"])
            .arg(raw),
        Some(script.as_bytes()),
    )
    .context("while writing the partition table")?;

    let mut disk = fs::OpenOptions::new().write(true).open(raw)?;
    for (i, p) in images.iter().zip(&parts) {
        if let Some(file) = &i.file {
            copy_sparse(file, &mut disk, p.offset, p.size)?;
            if !i.keep {
                fs::remove_file(file)?;
            }
        }
    }
    Ok(parts)
}

fn root_fs_name(fs: RootFs) -> &'static str {
    match fs {
        RootFs::Ext4 => "ext4",
        RootFs::Erofs => "erofs",
    }
}

/// The kernel module with the x86 SHA-256 code (SSSE3, AVX, AVX2, SHA-NI) that the
/// verified root's hash tree is checked with.
pub(crate) const VERITY_HASH_MODULE: &str = "sha256_ssse3";

/// The kernel command line: where root is, read-only, then the spec's own arguments.
/// A verified root is the device systemd's veritysetup makes from the partitions the
/// root hash names. An updatable image reboots after a kernel panic (into its next
/// try, when the panic was a version on trial's); the spec's own `panic=`, later on
/// the line, wins.
pub(crate) fn kernel_cmdline(spec: &Spec, root_partuuid: &str, root_hash: Option<&str>) -> String {
    let root = match root_hash {
        // dm-verity takes the best SHA-256 the kernel has when the root is opened, and
        // keeps it: without this the built-in generic C code hashes every block read
        // from the root for as long as the machine runs, where the x86 module would use
        // SHA-NI or AVX2 (it is in the initrd; systemd-modules-load loads it first).
        Some(hash) => {
            format!("roothash={hash} root=/dev/mapper/root rd.modules_load={VERITY_HASH_MODULE}")
        }
        None => format!("root=PARTUUID={root_partuuid}"),
    };
    let mut line = format!("{root} ro rootfstype={}", root_fs_name(spec.root_fs));
    if spec.update.is_some() {
        line.push_str(&format!(
            " panic={}",
            crate::image::sysupdate::PANIC_REBOOT_SECONDS
        ));
    }
    if !spec.kernel_cmdline.is_empty() {
        line.push(' ');
        line.push_str(&spec.kernel_cmdline);
    }
    line
}

/// `[system] initrd = false`: the kernel must mount the root by itself, so the root
/// filesystem and a disk driver must be built in (`=y` in its config), not modules.
fn check_direct_boot(spec: &Spec, root: &Path, kver: &str) -> Result<()> {
    let config_path = root.join(format!("boot/config-{kver}"));
    let config = fs::read_to_string(&config_path).with_context(|| {
        format!(
            "[system] initrd = false in {}: cannot read the kernel's config {} to check it can boot without one",
            spec.path.display(),
            config_path.display()
        )
    })?;
    let built_in = |option: &str| config.lines().any(|l| l == format!("{option}=y"));
    let (fs_option, fs) = match spec.root_fs {
        RootFs::Ext4 => ("CONFIG_EXT4_FS", "ext4"),
        RootFs::Erofs => ("CONFIG_EROFS_FS", "erofs"),
    };
    if !built_in(fs_option) {
        bail!(
            "[system] initrd = false in {}, but the kernel {kver} has {fs} as a module ({fs_option} is not =y), so it cannot mount the root without an initramfs\n  hint: set `initrd = true`, or `[disk] root-fs = \"ext4\"` if its ext4 is built in",
            spec.path.display()
        );
    }
    if !built_in("CONFIG_BLK_DEV_NVME") {
        bail!(
            "[system] initrd = false in {}, but the kernel {kver} has no built-in NVMe driver (CONFIG_BLK_DEV_NVME), the disk DevOS images boot from on EC2 and in devos-build's QEMU\n  hint: set `initrd = true`",
            spec.path.display()
        );
    }
    Ok(())
}

/// The ESP image: systemd-boot and the unified kernel image, or the kernel, initrd
/// and one loader entry; with `signer`, systemd-boot signed and the variables it
/// enrolls in setup mode; its size.
fn make_esp(
    spec: &Spec,
    id: &Identity,
    root: &Path,
    boot: &Boot,
    signer: Option<&Signer>,
    esp: &Path,
) -> Result<u64> {
    let staging = esp.with_extension("d");
    let loader_conf = staging.join("loader/loader.conf");
    fs::create_dir_all(staging.join("loader/entries"))?;
    let mut efi = root.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    let mut dirs = vec!["::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"];
    let mut enroll = String::new();
    let mut copies = Vec::new();
    if let Some(signer) = signer {
        let signed = staging.join("BOOTX64.EFI");
        fs::copy(&efi, &signed).with_context(|| format!("cannot copy {}", efi.display()))?;
        signer.sign_pe(&signed)?;
        efi = signed;
        dirs.extend(["::/loader/keys", "::/loader/keys/auto"]);
        for auth in signer.enrollment(&staging.join(secure_boot::ESP_KEYS_DIR))? {
            let name = auth
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            copies.push((auth, format!("::/{}/{name}", secure_boot::ESP_KEYS_DIR)));
        }
        enroll.push_str(secure_boot::LOADER_CONF);
    }
    copies.push((efi, "::/EFI/BOOT/BOOTX64.EFI".to_owned()));
    copies.push((loader_conf.clone(), "::/loader/loader.conf".to_owned()));
    match boot {
        Boot::Uki(uki) => {
            // No `default`: systemd-boot starts the newest version it finds in
            // EFI/Linux (and, with boot counting, the newest that has tries left).
            fs::write(
                &loader_conf,
                format!("timeout 0\neditor no\nconsole-mode keep\n{enroll}"),
            )?;
            dirs.push("::/EFI/Linux");
            copies.push((uki.clone(), format!("::/EFI/Linux/{}", uki_name(spec, id))));
        }
        Boot::Entry {
            kernel,
            initrd,
            cmdline,
        } => {
            fs::write(
                &loader_conf,
                "default devos.conf\ntimeout 0\neditor no\nconsole-mode keep\n",
            )?;
            let entry = staging.join("loader/entries/devos.conf");
            fs::write(&entry, loader_entry(spec, id, initrd.is_some(), cmdline))?;
            dirs.push("::/devos");
            copies.push((kernel.clone(), "::/devos/vmlinuz".to_owned()));
            if let Some(i) = initrd {
                copies.push((i.clone(), "::/devos/initrd.img".to_owned()));
            }
            copies.push((entry, "::/loader/entries/devos.conf".to_owned()));
        }
    }
    let size = esp_size(copies.iter().map(|(src, _)| src.as_path()))?;
    mkfs_vfat(id, esp, size)?;
    cmd::run(mtools(id, "mmd", esp).args(&dirs)).context("while filling the ESP")?;
    for (src, dest) in &copies {
        cmd::run(mtools(id, "mcopy", esp).arg(src).arg(dest)).context("while filling the ESP")?;
    }
    fs::remove_dir_all(&staging)?;
    Ok(size)
}

/// The ESP's size for `files`: twice theirs plus 16 MiB, in whole MiB, at least 64.
fn esp_size<'a>(files: impl Iterator<Item = &'a Path>) -> Result<u64> {
    let content = files
        .map(|p| fs::metadata(p).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;
    // FAT32 needs at least ~33 MiB; leave room for a second kernel on updates.
    Ok((content * 2 + 16 * MIB).max(64 * MIB).div_ceil(MIB) * MIB)
}

/// An empty FAT32 of `size` bytes in `esp`, the same bytes for the same identity.
fn mkfs_vfat(id: &Identity, esp: &Path, size: u64) -> Result<()> {
    cmd::run(
        Command::new("mkfs.vfat")
            .args([
                "-F",
                "32",
                "-n",
                "ESP",
                "-i",
                &id.esp_serial,
                "--invariant",
                "-C",
            ])
            .arg(esp)
            .arg((size / 1024).to_string()),
    )
    .context("while making the ESP")?;
    Ok(())
}

/// This version's Type #1 loader entry.
fn loader_entry(spec: &Spec, id: &Identity, has_initrd: bool, cmdline: &str) -> String {
    format!(
        "title {} {}\nversion {}\nlinux /devos/vmlinuz\n{}options {cmdline}\n",
        spec.name,
        id.version,
        id.version,
        if has_initrd {
            "initrd /devos/initrd.img\n"
        } else {
            ""
        },
    )
}

/// An mtools `program` on `esp`; mtools stamps what it writes with SOURCE_DATE_EPOCH.
fn mtools(id: &Identity, program: &str, esp: &Path) -> Command {
    let mut c = Command::new(program);
    c.env("MTOOLS_SKIP_CHECK", "1")
        .env("SOURCE_DATE_EPOCH", id.source_date_epoch.to_string())
        .arg("-i")
        .arg(esp);
    c
}

fn make_root(spec: &Spec, id: &Identity, root: &Path, img: &Path) -> Result<u64> {
    match spec.root_fs {
        RootFs::Ext4 => {
            let t = tree_size(root)?;
            // Block-rounded content, inode tables and ext4 metadata, with headroom;
            // the root is read-only, so it is sized to what it holds.
            let size = ((t.bytes + t.entries * 256) * 115 / 100 + 48 * MIB).div_ceil(MIB) * MIB;
            mkfs_ext4(
                root,
                &t,
                img,
                size,
                "devos-root",
                &id.root_fs_uuid,
                id,
                false,
            )?;
            Ok(size)
        }
        RootFs::Erofs => {
            cmd::run(
                // No label (`-L` needs erofs-utils 1.6; bookworm has 1.5): the root is
                // found by its partition UUID. lz4, not lz4hc: the default root is 7%
                // larger (151 instead of 145 MB) and made in a tenth of the time (lz4hc
                // was most of the disk stage); both read back with the same decoder.
                // Owners and groups as the tree has them (`root:shadow` for
                // /etc/shadow and the setgid helpers that read it, ...).
                Command::new("mkfs.erofs")
                    .args(["-zlz4", "-U", &id.root_fs_uuid])
                    .arg(format!("-T{}", id.source_date_epoch))
                    .arg(img)
                    .arg(root),
            )
            .context("while making the erofs root")?;
            let len = fs::metadata(img)?.len().div_ceil(MIB) * MIB;
            fs::OpenOptions::new().write(true).open(img)?.set_len(len)?;
            Ok(len)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn mkfs_ext4(
    tree: &Path,
    content: &TreeSize,
    img: &Path,
    size: u64,
    label: &str,
    uuid: &str,
    id: &Identity,
    journal: bool,
) -> Result<()> {
    drop(sparse_file(img, size)?);
    let inodes = (content.entries * 5 / 4 + 4096).max(size / 16384);
    let mut c = Command::new("mkfs.ext4");
    // The writable /var (the one with a journal) keeps ext4's usual 5% for root: the
    // homes live on it (/home is /var/home), and a user who fills theirs must not leave
    // the system's services (the journal, the agent's audit log) without room. The
    // read-only root needs none.
    let reserved = if journal { "5" } else { "0" };
    // mke2fs -d adds directory entries in strcoll order: make that the same everywhere.
    c.env("LC_ALL", "C")
        .env("E2FSPROGS_FAKE_TIME", id.source_date_epoch.to_string())
        .args([
            "-q", "-F", "-b", "4096", "-m", reserved, "-L", label, "-U", uuid,
        ])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-E")
        .arg(format!(
            "root_owner=0:0,hash_seed={uuid},lazy_itable_init=1,nodiscard"
        ))
        .arg("-O")
        .arg(if journal {
            "has_journal"
        } else {
            "^has_journal"
        })
        .arg("-d")
        .arg(tree)
        .arg(img);
    cmd::run(&mut c).with_context(|| format!("while making the {label} filesystem"))?;
    set_change_times(tree, img, id.source_date_epoch)
        .with_context(|| format!("while fixing the inode times of the {label} filesystem"))?;
    // Every write through libext2fs adds to the superblock's lifetime-writes counter
    // (s_kbytes_written), and how much mke2fs writes depends on the source tree's
    // layout on the build host (a tree restored from the cache is not laid out like a
    // fresh one), not on its contents. Zero it in a session that writes nothing before
    // closing, and close with -a so the backup superblocks say the same.
    debugfs(
        img,
        "ssv kbytes_written 0\nclose -a\n",
        id.source_date_epoch,
    )
    .with_context(|| format!("while pinning the {label} filesystem's write counter"))
}

/// mke2fs -d copies each file's ctime, which is when the build wrote it and cannot be
/// set from user space, and its atime, which mke2fs's own reading just bumped. Set both
/// to SOURCE_DATE_EPOCH on every inode with debugfs.
fn set_change_times(tree: &Path, img: &Path, epoch: u64) -> Result<()> {
    let stamp = debugfs_time(epoch);
    let mut script = String::new();
    let mut bad = None;
    crate::image::files::walk(tree, &mut |path, _| {
        let rel = path.strip_prefix(tree).unwrap_or(path).to_string_lossy();
        if rel.contains(['"', '\n']) {
            bad = Some(rel.into_owned());
        } else {
            // atime too: mke2fs reading the file bumped it (relatime) after it was set.
            for field in ["ctime", "atime"] {
                script.push_str(&format!("sif \"/{rel}\" {field} {stamp}\n"));
            }
        }
        Ok(())
    })?;
    if let Some(name) = bad {
        bail!(
            "the file name {name:?} cannot be given to debugfs (it has a quote or newline); rename it in the image"
        );
    }
    debugfs(img, &script, epoch)
}

/// Run a debugfs script read-write on `img` at time `epoch`; debugfs reports
/// per-command errors on stderr but still exits 0, so any such line is an error.
fn debugfs(img: &Path, script: &str, epoch: u64) -> Result<()> {
    let file = img.with_extension("debugfs");
    fs::write(&file, script)?;
    let out = cmd::run(
        Command::new("debugfs")
            // Also the superblock's last write time.
            .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
            .arg("-w")
            .arg("-f")
            .arg(&file)
            .arg(img),
    );
    // The script is scratch next to the image; the image is what matters.
    fs::remove_file(&file).ok();
    let out = out?;
    let errors: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("debugfs "))
        .map(str::to_owned)
        .collect();
    if !errors.is_empty() {
        bail!("debugfs failed: {}", errors.join("; "));
    }
    Ok(())
}

/// A Unix time as debugfs's `YYYYMMDDHHMMSS` (UTC); a time past year 9999, which
/// neither the spec nor SOURCE_DATE_EPOCH may give, gives the epoch's.
pub(crate) fn debugfs_time(epoch: u64) -> String {
    let t = i64::try_from(epoch)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

struct TreeSize {
    /// Bytes in 4 KiB blocks the files and directories take.
    pub(crate) bytes: u64,
    pub(crate) entries: u64,
}

fn tree_size(root: &Path) -> std::io::Result<TreeSize> {
    let mut t = TreeSize {
        bytes: 0,
        entries: 0,
    };
    for entry in walkdir::WalkDir::new(root).min_depth(1) {
        let meta = entry?.metadata()?;
        t.entries += 1;
        let len = if meta.is_symlink() && meta.len() < 60 {
            0
        } else {
            meta.len()
        };
        t.bytes += len.div_ceil(4096) * 4096;
    }
    Ok(t)
}

/// Copy a partition image into the disk at its offset, checking that it fits.
fn copy_sparse(img: &Path, disk: &mut fs::File, offset: u64, limit: u64) -> Result<()> {
    let len = fs::metadata(img)?.len();
    if len > limit {
        bail!(
            "internal error: {} ({len} bytes) does not fit its partition ({limit} bytes)",
            img.display()
        );
    }
    crate::image::files::copy_sparse(img, disk, offset, None)?;
    Ok(())
}

impl From<Partition> for crate::model::manifest::PartitionInfo {
    fn from(p: Partition) -> Self {
        Self {
            label: p.label,
            filesystem: p.filesystem,
            offset: p.offset,
            size: p.size,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn debugfs_times() {
        assert_eq!(super::debugfs_time(0), "19700101000000");
        assert_eq!(super::debugfs_time(1_700_000_000), "20231114221320");
        assert_eq!(super::debugfs_time(951_782_400), "20000229000000");
    }

    #[test]
    fn an_updatable_image_reboots_after_a_kernel_panic_unless_its_spec_says_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        // A public key packet (whole, if tiny) is all the spec checks.
        std::fs::write(dir.path().join("update.pgp"), [0x99, 0x00, 0x01, 0x04]).unwrap();
        let path = dir.path().join("x.toml");
        let default = include_str!("../../../images/devos-debian.toml");
        let spec = |text: &str| crate::model::spec::parse(&path, text).unwrap();
        let update = "\n[update]\nurl = \"https://u.example/\"\nkey = \"update.pgp\"\n";
        let line = super::kernel_cmdline(&spec(&format!("{default}{update}")), "p", Some("h"));
        assert!(
            line.contains(" ro rootfstype=erofs panic=10 console="),
            "{line}"
        );
        let line = super::kernel_cmdline(&spec(default), "p", Some("h"));
        assert!(!line.contains("panic="), "{line}");
        assert!(
            line.starts_with("roothash=h root=/dev/mapper/root rd.modules_load=sha256_ssse3 ro "),
            "{line}"
        );
        // The spec's own `panic=` comes later on the line, and the kernel takes the last.
        let own = format!("{default}{update}").replace("quiet ", "quiet panic=0 ");
        let line = super::kernel_cmdline(&spec(&own), "p", Some("h"));
        assert!(
            line.ends_with("quiet panic=0 systemd.show_status=error"),
            "{line}"
        );
        assert!(line.contains("panic=10"), "{line}");
    }

    #[test]
    fn booting_without_an_initrd_needs_the_root_fs_and_nvme_built_in() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("boot")).unwrap();
        let config = root.path().join("boot/config-6.1.0-cloud");
        let spec = |fs: &str| {
            let text = include_str!("../../../images/devos-debian-bookworm.toml")
                .replace("root-fs = \"ext4\"", &format!("root-fs = \"{fs}\""));
            crate::model::spec::parse(std::path::Path::new("images/x.toml"), &text).unwrap()
        };
        let check = |fs: &str| super::check_direct_boot(&spec(fs), root.path(), "6.1.0-cloud");
        let err = check("ext4").unwrap_err().to_string();
        assert!(err.contains("cannot read the kernel's config"), "{err}");
        std::fs::write(
            &config,
            "CONFIG_EXT4_FS=y\nCONFIG_EROFS_FS=m\nCONFIG_BLK_DEV_NVME=y\n",
        )
        .unwrap();
        check("ext4").unwrap();
        let err = check("erofs").unwrap_err().to_string();
        assert!(
            err.contains("[system] initrd = false in images/x.toml, but the kernel 6.1.0-cloud has erofs as a module"),
            "{err}"
        );
        std::fs::write(&config, "CONFIG_EXT4_FS=y\nCONFIG_BLK_DEV_NVME=m\n").unwrap();
        let err = check("ext4").unwrap_err().to_string();
        assert!(err.contains("no built-in NVMe driver"), "{err}");
    }
}
