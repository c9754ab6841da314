//! The `disk` stage: a GPT disk image made from the customized tree without loop
//! devices or mounts — an ESP (FAT, mkfs.vfat + mtools) with systemd-boot, the kernel
//! and initrd; a read-only root (mkfs.ext4 -d or mkfs.erofs); a writable ext4 data
//! partition for /var. Partitions are built as files and copied in at their offsets.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::image::identity::Identity;
use crate::model::spec::{RootFs, Spec};
use crate::support::cmd;

const MIB: u64 = 1 << 20;
/// GPT partition type GUIDs (Discoverable Partitions Specification).
const TYPE_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const TYPE_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
const TYPE_VAR: &str = "4D21B016-B534-45C2-A9FB-5C16E091FD2D";
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

/// Build the disk image `raw` from the customized tree `root`. `work` holds the
/// partition images while they are made. The tree's /var is moved out (it becomes
/// the data partition) and left empty as the mount point.
pub(crate) fn build(
    spec: &Spec,
    id: &Identity,
    root: &Path,
    work: &Path,
    raw: &Path,
) -> Result<Vec<Partition>> {
    let (kernel, initrd) = kernel_and_initrd(spec, root)?;
    let var_tree = move_var_out(id, root, work)?;

    let esp = work.join("esp.img");
    let esp_size = make_esp(spec, id, root, &kernel, initrd.as_deref(), &esp)?;
    let root_img = work.join("root.img");
    let root_size = make_root(spec, id, root, &root_img)?;

    // Layout: 1 MiB for the GPT, ESP, root, var, 1 MiB for the backup GPT.
    let fixed = MIB + esp_size + root_size + MIB;
    let var_img = work.join("var.img");
    let var_size = make_var(spec, id, &var_tree, fixed, &var_img)?;

    let parts = slots(
        spec,
        id,
        (esp, esp_size),
        (root_img, root_size),
        (var_img, var_size),
    );
    write_disk(id, raw, fixed + var_size, &parts)?;
    Ok(parts.into_iter().map(|(_, p, ..)| p).collect())
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

/// The ESP, root and /var images laid out after the GPT, each with its GPT type and ids.
fn slots<'a>(
    spec: &Spec,
    id: &'a Identity,
    (esp, esp_size): (PathBuf, u64),
    (root_img, root_size): (PathBuf, u64),
    (var_img, var_size): (PathBuf, u64),
) -> Vec<Slot<'a>> {
    vec![
        (
            esp,
            Partition {
                label: "esp".into(),
                filesystem: "vfat".into(),
                offset: MIB,
                size: esp_size,
            },
            TYPE_ESP,
            id.esp_partuuid.as_str(),
            "",
        ),
        (
            root_img,
            Partition {
                label: "devos-root".into(),
                filesystem: root_fs_name(spec.root_fs).into(),
                offset: MIB + esp_size,
                size: root_size,
            },
            TYPE_ROOT_X86_64,
            id.root_partuuid.as_str(),
            ATTR_READ_ONLY,
        ),
        (
            var_img,
            Partition {
                label: "devos-var".into(),
                filesystem: "ext4".into(),
                offset: MIB + esp_size + root_size,
                size: var_size,
            },
            TYPE_VAR,
            id.var_partuuid.as_str(),
            "",
        ),
    ]
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
    // The new mount point and the root it changed keep the image's times.
    let epoch = filetime::FileTime::from_unix_time(
        i64::try_from(id.source_date_epoch).unwrap_or(i64::MAX),
        0,
    );
    for dir in [root.join("var"), root.to_path_buf()] {
        filetime::set_file_times(&dir, epoch, epoch)?;
    }
    Ok(var_tree)
}

/// One partition: its image, where it goes, its GPT type, PARTUUID and attributes.
type Slot<'a> = (PathBuf, Partition, &'static str, &'a str, &'static str);

/// A sparse disk of `total` bytes with a GPT naming `parts`, each copied in at its
/// offset (and its image removed).
fn write_disk(id: &Identity, raw: &Path, total: u64, parts: &[Slot<'_>]) -> Result<()> {
    let file = fs::File::create(raw)?;
    file.set_len(total)?;
    drop(file);
    let mut script = format!(
        "label: gpt\nlabel-id: {}\nunit: sectors\nfirst-lba: 2048\nsector-size: 512\n\n",
        id.disk_guid
    );
    for (_, p, ty, uuid, attrs) in parts {
        script.push_str(&format!(
            "start={}, size={}, type={ty}, uuid={uuid}, name=\"{}\"{}\n",
            p.offset / 512,
            p.size / 512,
            p.label,
            if attrs.is_empty() {
                String::new()
            } else {
                format!(", attrs=\"{attrs}\"")
            }
        ));
    }
    cmd::run_with_input(
        Command::new("sfdisk")
            .args(["--quiet", "--no-reread", "--no-tell-kernel"])
            .arg(raw),
        Some(script.as_bytes()),
    )
    .context("while writing the partition table")?;

    let mut disk = fs::OpenOptions::new().write(true).open(raw)?;
    for (img, p, ..) in parts {
        copy_sparse(img, &mut disk, p.offset, p.size)?;
        fs::remove_file(img)?;
    }
    Ok(())
}

fn root_fs_name(fs: RootFs) -> &'static str {
    match fs {
        RootFs::Ext4 => "ext4",
        RootFs::Erofs => "erofs",
    }
}

/// The kernel command line: where root is, read-only, then the spec's own arguments.
pub(crate) fn kernel_cmdline(spec: &Spec, id: &Identity) -> String {
    let mut line = format!(
        "root=PARTUUID={} ro rootfstype={}",
        id.root_partuuid,
        root_fs_name(spec.root_fs)
    );
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

/// The ESP image: systemd-boot, the kernel and initrd, one loader entry; its size.
fn make_esp(
    spec: &Spec,
    id: &Identity,
    root: &Path,
    kernel: &Path,
    initrd: Option<&Path>,
    esp: &Path,
) -> Result<u64> {
    let efi = root.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    let size = esp_size([Some(kernel), initrd, Some(efi.as_path())])?;
    mkfs_vfat(id, esp, size)?;

    let staging = esp.with_extension("d");
    let (loader_conf, entry) = loader_config(spec, id, initrd.is_some(), &staging)?;
    let dirs = [
        "::/EFI",
        "::/EFI/BOOT",
        "::/loader",
        "::/loader/entries",
        "::/devos",
    ];
    cmd::run(mtools(id, "mmd", esp).args(dirs)).context("while filling the ESP")?;
    let copies = [
        Some((efi.as_path(), "::/EFI/BOOT/BOOTX64.EFI")),
        Some((kernel, "::/devos/vmlinuz")),
        initrd.map(|i| (i, "::/devos/initrd.img")),
        Some((loader_conf.as_path(), "::/loader/loader.conf")),
        Some((entry.as_path(), "::/loader/entries/devos.conf")),
    ];
    for (src, dest) in copies.into_iter().flatten() {
        cmd::run(mtools(id, "mcopy", esp).arg(src).arg(dest)).context("while filling the ESP")?;
    }
    fs::remove_dir_all(&staging)?;
    Ok(size)
}

/// The ESP's size for `files`: twice theirs plus 16 MiB, in whole MiB, at least 64.
fn esp_size(files: [Option<&Path>; 3]) -> Result<u64> {
    let content = files
        .into_iter()
        .flatten()
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

/// systemd-boot's loader.conf and this version's entry, under `staging`; their paths.
fn loader_config(
    spec: &Spec,
    id: &Identity,
    has_initrd: bool,
    staging: &Path,
) -> Result<(PathBuf, PathBuf)> {
    let loader_conf = staging.join("loader/loader.conf");
    let entry = staging.join("loader/entries/devos.conf");
    fs::create_dir_all(staging.join("loader/entries"))?;
    fs::write(
        &loader_conf,
        "default devos.conf\ntimeout 0\neditor no\nconsole-mode keep\n",
    )?;
    fs::write(
        &entry,
        format!(
            "title {} {}\nversion {}\nlinux /devos/vmlinuz\n{}options {}\n",
            spec.name,
            id.version,
            id.version,
            if has_initrd {
                "initrd /devos/initrd.img\n"
            } else {
                ""
            },
            kernel_cmdline(spec, id)
        ),
    )?;
    Ok((loader_conf, entry))
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
                // found by its partition UUID.
                Command::new("mkfs.erofs")
                    .args(["-zlz4hc", "-U", &id.root_fs_uuid])
                    .arg(format!("-T{}", id.source_date_epoch))
                    .arg("--all-root")
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
    fs::File::create(img)?.set_len(size)?;
    let inodes = (content.entries * 5 / 4 + 4096).max(size / 16384);
    let mut c = Command::new("mkfs.ext4");
    // mke2fs -d adds directory entries in strcoll order: make that the same everywhere.
    c.env("LC_ALL", "C")
        .env("E2FSPROGS_FAKE_TIME", id.source_date_epoch.to_string())
        .args(["-q", "-F", "-b", "4096", "-m", "0", "-L", label, "-U", uuid])
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
    fn booting_without_an_initrd_needs_the_root_fs_and_nvme_built_in() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("boot")).unwrap();
        let config = root.path().join("boot/config-6.1.0-cloud");
        let spec = |fs: &str| {
            let text = include_str!("../../../images/devos-debian.toml")
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
