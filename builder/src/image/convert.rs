//! The `convert` stage: the raw disk into the other formats the spec asks for, with
//! qemu-img. qcow2 is compressed with zstd. VMDK is streamOptimized (what vSphere and AWS import take); VHD is fixed
//! and keeps the raw size, which is whole MiB as Azure requires.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::model::spec::Format;
use crate::support::cmd;

pub(crate) fn convert(raw: &Path, format: Format, out: &Path) -> Result<()> {
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
    Ok(())
}
