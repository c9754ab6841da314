//! The `convert` stage: the raw disk into the other formats the spec asks for, with
//! qemu-img. qcow2 is compressed with zstd. VMDK is streamOptimized (what vSphere and
//! AWS import take); VHD is fixed and keeps the raw size, which must be whole MiB as
//! Azure requires. Every format is reproducible: qemu-img puts a random content id in a
//! VMDK and a creation time and random UUID in a VHD footer, so those are replaced by
//! values derived from the raw image (and the VMDK names its final file, not the
//! temporary one it was written to).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::model::spec::Format;
use crate::support::cmd;

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

/// Convert `raw` to `format` at `out`. A caller that writes to a temporary
/// `.NAME.partial` and renames it to NAME gets a VMDK that names NAME.
pub(crate) fn convert(raw: &Path, format: Format, out: &Path) -> Result<()> {
    if format == Format::Raw {
        return Ok(());
    }
    let size = std::fs::metadata(raw)
        .with_context(|| format!("cannot read {}", raw.display()))?
        .len();
    if format == Format::Vhd && size % MIB != 0 {
        bail!(
            "{} is {size} bytes, not a whole number of MiB, which Azure requires of a VHD\n  hint: set `[disk] size` in the spec to whole MiB and build again",
            raw.display()
        );
    }
    let mut c = Command::new("qemu-img");
    c.args(["convert", "-f", "raw"]);
    match format {
        Format::Raw => return Ok(()),
        // zstd: ten times faster than zlib and smaller; readable by QEMU 5.1 and later.
        // Parallel compression, but in-order writes (no `-W`): out-of-order writes
        // place clusters differently on every run, and the image must be reproducible.
        Format::Qcow2 => c.args([
            "-O",
            "qcow2",
            "-c",
            "-m",
            "4",
            "-o",
            "compression_type=zstd",
        ]),
        Format::Vmdk => c.args(["-O", "vmdk", "-o", "subformat=streamOptimized"]),
        Format::Vhd => c.args(["-O", "vpc", "-o", "subformat=fixed,force_size=on"]),
    };
    c.arg(raw).arg(out);
    cmd::run(&mut c).with_context(|| format!("while converting to {}", format.extension()))?;
    let pinned = match format {
        Format::Vmdk => pin_vmdk(out, &Pins::of(raw, size)?, &final_name(out)),
        Format::Vhd => pin_vhd(out, &Pins::of(raw, size)?),
        Format::Raw | Format::Qcow2 => Ok(()),
    };
    pinned.with_context(|| {
        format!(
            "while making the {} at {} reproducible",
            format.extension(),
            out.display()
        )
    })
}

/// The identifiers qemu-img would pick at random, derived from the raw image instead:
/// from its size and first MiB (the GPT, whose GUIDs DevOS derives from the build id),
/// so the same image always gets the same ones and another build other ones.
struct Pins {
    /// The VMDK content id (CID).
    cid: u32,
    /// The VHD footer's unique id.
    uuid: [u8; 16],
}

impl Pins {
    fn of(raw: &Path, size: u64) -> Result<Pins> {
        let mut head = Vec::new();
        File::open(raw)
            .with_context(|| format!("cannot open {}", raw.display()))?
            .take(MIB)
            .read_to_end(&mut head)
            .with_context(|| format!("cannot read {}", raw.display()))?;
        let digest = Sha256::new()
            .chain_update(b"devos convert ids\0")
            .chain_update(size.to_le_bytes())
            .chain_update(&head)
            .finalize();
        let mut cid = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]);
        // 0xffffffff means "no parent" in a parentCID; keep clear of it.
        if cid >= 0xffff_fffe {
            cid &= 0x7fff_ffff;
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&digest[4..20]);
        // An RFC 9562 version 8 (custom) UUID.
        uuid[6] = (uuid[6] & 0x0f) | 0x80;
        uuid[8] = (uuid[8] & 0x3f) | 0x80;
        Ok(Pins { cid, uuid })
    }
}

/// The name a file written at `out` ends up with: NAME for a temporary `.NAME.partial`.
fn final_name(out: &Path) -> String {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match name
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(".partial"))
    {
        Some(n) if !n.is_empty() => n.to_owned(),
        _ => name,
    };
    // The descriptor quotes it: no quotes or line breaks inside.
    name.chars()
        .map(|c| if c == '"' || c.is_control() { '_' } else { c })
        .collect()
}

/// Rewrite the embedded descriptor of the VMDK at `path`: the content id from `pins`
/// and the extent's file name `name`, in place (its space is fixed and zero-padded).
fn pin_vmdk(path: &Path, pins: &Pins, name: &str) -> Result<()> {
    let f = File::options().read(true).write(true).open(path)?;
    let mut header = [0u8; 512];
    f.read_exact_at(&mut header, 0)?;
    if &header[0..4] != b"KDMV" {
        bail!("not a sparse VMDK (no KDMV magic)");
    }
    let field = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let (offset, sectors) = (field(28), field(36));
    let len = usize::try_from(sectors * SECTOR).context("descriptor too large")?;
    if offset == 0 || len == 0 || len > 1 << 20 {
        bail!("no embedded descriptor (offset {offset}, {sectors} sectors)");
    }
    let mut area = vec![0u8; len];
    f.read_exact_at(&mut area, offset * SECTOR)?;
    let end = area.iter().position(|&b| b == 0).unwrap_or(len);
    let text = std::str::from_utf8(&area[..end]).context("the descriptor is not UTF-8")?;
    let text = pinned_descriptor(text, pins.cid, name)?;
    if text.len() > len {
        bail!(
            "the descriptor naming {name:?} needs {} bytes, the VMDK has room for {len}",
            text.len()
        );
    }
    area.fill(0);
    area[..text.len()].copy_from_slice(text.as_bytes());
    f.write_all_at(&area, offset * SECTOR)?;
    Ok(())
}

/// `text` with its `CID=` line set to `cid` and its one extent naming `name`.
fn pinned_descriptor(text: &str, cid: u32, name: &str) -> Result<String> {
    let (mut cids, mut extents) = (0, 0);
    let mut out = String::with_capacity(text.len() + name.len());
    for line in text.split_inclusive('\n') {
        let (body, eol) = match line.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (line, ""),
        };
        let is_extent = ["RW ", "RDONLY ", "NOACCESS "]
            .iter()
            .any(|a| body.starts_with(a));
        if body.starts_with("CID=") {
            cids += 1;
            out.push_str(&format!("CID={cid:08x}{eol}"));
        } else if let (true, Some(open), Some(close)) = (is_extent, body.find('"'), body.rfind('"'))
            && open < close
        {
            extents += 1;
            out.push_str(&format!(
                "{}\"{name}\"{}{eol}",
                &body[..open],
                &body[close + 1..]
            ));
        } else {
            out.push_str(line);
        }
    }
    if cids != 1 || extents != 1 {
        bail!(
            "expected one CID line and one extent in qemu-img's descriptor, found {cids} and {extents}:\n{text}"
        );
    }
    Ok(out)
}

/// The VHD footer's checksum: the ones' complement of the sum of its bytes, with the
/// checksum field (bytes 64..68) counted as zero.
fn vhd_checksum(footer: &[u8; 512]) -> u32 {
    let sum = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |s, (_, &b)| s.wrapping_add(u32::from(b)));
    !sum
}

/// Set the fixed VHD's footer (its last 512 bytes, its only metadata) to the time
/// stamp 0 (2000-01-01, the VHD epoch) and the unique id from `pins`, and checksum it.
fn pin_vhd(path: &Path, pins: &Pins) -> Result<()> {
    let mut f = File::options().read(true).write(true).open(path)?;
    let at = f.seek(SeekFrom::End(-(SECTOR as i64)))?;
    let mut footer = [0u8; 512];
    f.read_exact(&mut footer)?;
    if &footer[0..8] != b"conectix" {
        bail!("no VHD footer (no conectix cookie)");
    }
    let disk_type = u32::from_be_bytes([footer[60], footer[61], footer[62], footer[63]]);
    if disk_type != 2 {
        bail!("the VHD is of disk type {disk_type}, not fixed (2)");
    }
    footer[24..28].fill(0);
    footer[68..84].copy_from_slice(&pins.uuid);
    let sum = vhd_checksum(&footer);
    footer[64..68].copy_from_slice(&sum.to_be_bytes());
    f.seek(SeekFrom::Start(at))?;
    f.write_all(&footer)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small disk with data in its first MiB (a stand-in for the GPT) and further on.
    fn raw_disk(dir: &Path, name: &str, seed: u8) -> std::path::PathBuf {
        let path = dir.join(name);
        let f = File::create(&path).unwrap();
        f.set_len(4 * MIB).unwrap();
        f.write_all_at(&[seed; 4096], 512).unwrap();
        f.write_all_at(b"DevOS root", 2 * MIB + 12345).unwrap();
        path
    }

    fn same_content(raw: &Path, format: &str, image: &Path) {
        let out = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", format])
            .arg(raw)
            .arg(image)
            .output()
            .expect("qemu-img is needed for this test (apt-get install qemu-utils)");
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn descriptor(vmdk: &Path) -> String {
        let bytes = std::fs::read(vmdk).unwrap();
        String::from_utf8_lossy(&bytes[512..512 + 20 * 512])
            .trim_end_matches('\0')
            .to_owned()
    }

    #[test]
    fn vmdk_and_vhd_are_reproducible_and_still_hold_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let raw = raw_disk(dir.path(), "disk.raw", 1);
        for format in [Format::Vmdk, Format::Vhd] {
            let ext = format.extension();
            // As the build writes it (its final name in a staging directory) and as
            // `image export` does (a temporary name, renamed after).
            let (a, b) = (dir.path().join("a"), dir.path().join("b"));
            std::fs::create_dir_all(&a).unwrap();
            std::fs::create_dir_all(&b).unwrap();
            let first = a.join(format!("img.{ext}"));
            let second = b.join(format!(".img.{ext}.partial"));
            convert(&raw, format, &first).unwrap();
            convert(&raw, format, &second).unwrap();
            assert!(
                std::fs::read(&first).unwrap() == std::fs::read(&second).unwrap(),
                "two conversions of the same disk to {ext} differ"
            );
            same_content(&raw, if ext == "vhd" { "vpc" } else { ext }, &second);
            let check = Command::new("qemu-img")
                .args(["check", "-f", if ext == "vhd" { "vpc" } else { ext }])
                .arg(&second)
                .output()
                .unwrap();
            // vpc has no checks ("does not support checks", exit 63); vmdk has.
            assert!(
                check.status.success() || ext == "vhd",
                "{}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let d = descriptor(&dir.path().join("b/.img.vmdk.partial"));
        assert!(d.contains("SPARSE \"img.vmdk\""), "{d}");
        assert!(d.contains("createType=\"streamOptimized\""), "{d}");
        let vhd = std::fs::read(dir.path().join("a/img.vhd")).unwrap();
        let footer: [u8; 512] = vhd[vhd.len() - 512..].try_into().unwrap();
        assert_eq!(vhd.len() as u64, 4 * MIB + 512);
        assert_eq!(&footer[0..8], b"conectix");
        assert_eq!(footer[60..64], 2u32.to_be_bytes(), "fixed");
        assert_eq!(footer[48..56], (4 * MIB).to_be_bytes(), "current size");
        assert_eq!(footer[64..68], vhd_checksum(&footer).to_be_bytes());
    }

    #[test]
    fn another_disk_gets_other_ids() {
        let dir = tempfile::tempdir().unwrap();
        let one = Pins::of(&raw_disk(dir.path(), "1.raw", 1), 4 * MIB).unwrap();
        let two = Pins::of(&raw_disk(dir.path(), "2.raw", 2), 4 * MIB).unwrap();
        assert_ne!(one.cid, two.cid);
        assert_ne!(one.uuid, two.uuid);
    }

    #[test]
    fn a_vhd_of_part_of_a_mib_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("odd.raw");
        File::create(&raw).unwrap().set_len(MIB + 512).unwrap();
        let e = convert(&raw, Format::Vhd, &dir.path().join("odd.vhd")).unwrap_err();
        assert!(e.to_string().contains("not a whole number of MiB"), "{e}");
    }

    #[test]
    fn descriptor_names_the_final_file() {
        assert_eq!(final_name(Path::new("/x/.a.vmdk.partial")), "a.vmdk");
        assert_eq!(final_name(Path::new("/x/a.vmdk")), "a.vmdk");
        assert_eq!(final_name(Path::new("/x/.hidden.vmdk")), ".hidden.vmdk");
        assert_eq!(final_name(Path::new("a\"b\n.vmdk")), "a_b_.vmdk");
        let text = "# Disk DescriptorFile\nversion=1\nCID=5b95ce2e\nparentCID=ffffffff\nRW 8 SPARSE \".x.partial\"\n";
        assert_eq!(
            pinned_descriptor(text, 0x1234, "x.vmdk").unwrap(),
            "# Disk DescriptorFile\nversion=1\nCID=00001234\nparentCID=ffffffff\nRW 8 SPARSE \"x.vmdk\"\n"
        );
        assert!(pinned_descriptor("version=1\n", 1, "x").is_err());
    }
}
