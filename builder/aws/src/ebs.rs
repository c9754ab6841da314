//! Raw disk image → EBS snapshot over the EBS direct APIs (StartSnapshot,
//! PutSnapshotBlock, CompleteSnapshot), the way coldsnap and NixOS' uploader do it:
//! no S3 bucket, no ImportSnapshot, no helper instance.
//!
//! The image is scanned once for blocks that are not all zero (a fresh snapshot reads
//! as zeros, so those are never sent). The rest go up through a pool of parallel
//! workers, each block with its SHA256; the snapshot is completed with the linear
//! aggregate of those checksums, which EBS verifies. Throttling and 5xx answers are
//! retried with backoff by the SDK's standard retry strategy.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::{ChecksumAggregationMethod, ChecksumAlgorithm, Tag};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures_util::{StreamExt, TryStreamExt, stream};
use sha2::{Digest, Sha256};

use crate::explain;

/// The EBS direct API block size.
pub const BLOCK: u64 = 512 * 1024;
const GIB: u64 = 1024 * 1024 * 1024;

/// What an upload did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Upload {
    pub snapshot_id: String,
    pub image_bytes: u64,
    pub volume_gib: u64,
    pub blocks_total: u64,
    pub blocks_sent: u64,
    pub bytes_sent: u64,
    pub seconds: f64,
}

/// Indices of the blocks of `path` that hold anything but zeros, and the sha256 of the
/// whole file (hex), in one read.
pub fn nonzero_blocks(path: &Path) -> Result<(u64, Vec<u64>, String)> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = file.metadata()?.len();
    let mut buf = vec![0u8; BLOCK as usize];
    let mut blocks = Vec::new();
    let mut whole = Sha256::new();
    for index in 0..size.div_ceil(BLOCK) {
        let data = read_block(&file, size, index, &mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let len = (size - index * BLOCK).min(BLOCK) as usize;
        whole.update(&data[..len]);
        if data.iter().any(|&b| b != 0) {
            blocks.push(index);
        }
    }
    let sha256 = whole
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((size, blocks, sha256))
}

/// Block `index` of a file of `size` bytes, zero-padded to [`BLOCK`].
fn read_block<'a>(file: &File, size: u64, index: u64, buf: &'a mut [u8]) -> Result<&'a [u8]> {
    let start = index * BLOCK;
    let len = (size - start).min(BLOCK) as usize;
    buf.fill(0);
    file.read_exact_at(&mut buf[..len], start)?;
    Ok(buf)
}

/// Start a snapshot sized for `path` (whole GiB) carrying `tags`; returns its id.
pub async fn start(
    ebs: &aws_sdk_ebs::Client,
    region: &str,
    path: &Path,
    description: &str,
    tags: &[(String, String)],
) -> Result<String> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    let snapshot = ebs
        .start_snapshot()
        .volume_size(size.div_ceil(GIB).max(1) as i64)
        .description(description)
        .set_tags(Some(
            tags.iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build())
                .collect(),
        ))
        .timeout(60)
        .send()
        .await
        .map_err(|e| explain("ebs:StartSnapshot", region, e))?;
    Ok(snapshot
        .snapshot_id()
        .context("StartSnapshot returned no snapshot id")?
        .to_owned())
}

/// Upload `path` into the started snapshot and complete it. The file must still have
/// the sha256 `expected` (checked in the same read that finds the blocks to send,
/// before any is sent). `progress(bytes, total)` is called once with 0 when the total
/// to send is known, then for every block sent.
#[allow(clippy::too_many_arguments)]
pub async fn upload(
    ebs: &aws_sdk_ebs::Client,
    region: &str,
    snapshot_id: &str,
    path: &Path,
    expected: &str,
    workers: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Upload> {
    let started = Instant::now();
    let (size, blocks, sha256) = nonzero_blocks(path)?;
    if sha256 != expected {
        bail!(
            "{} changed since it was built (sha256 {sha256}, recorded {expected}); nothing was uploaded",
            path.display()
        );
    }
    progress(0, blocks.len() as u64 * BLOCK);
    let mut digests = put_blocks(
        ebs,
        region,
        snapshot_id,
        path,
        size,
        &blocks,
        workers,
        progress,
    )
    .await
    .with_context(|| format!("upload to snapshot {snapshot_id} failed"))?;
    digests.sort_unstable_by_key(|(i, _)| *i);
    let mut linear = Sha256::new();
    for (_, d) in &digests {
        linear.update(d);
    }
    ebs.complete_snapshot()
        .snapshot_id(snapshot_id)
        .changed_blocks_count(blocks.len() as i32)
        .checksum(B64.encode(linear.finalize()))
        .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
        .checksum_aggregation_method(ChecksumAggregationMethod::ChecksumAggregationLinear)
        .send()
        .await
        .map_err(|e| explain("ebs:CompleteSnapshot", region, e))
        .with_context(|| format!("cannot complete snapshot {snapshot_id}"))?;
    Ok(Upload {
        snapshot_id: snapshot_id.to_owned(),
        image_bytes: size,
        volume_gib: size.div_ceil(GIB).max(1),
        blocks_total: size.div_ceil(BLOCK),
        blocks_sent: blocks.len() as u64,
        bytes_sent: blocks.len() as u64 * BLOCK,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Send `blocks` with `workers` requests in flight; returns each block's SHA256.
#[allow(clippy::too_many_arguments)]
async fn put_blocks(
    ebs: &aws_sdk_ebs::Client,
    region: &str,
    snapshot_id: &str,
    path: &Path,
    size: u64,
    blocks: &[u64],
    workers: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Vec<(u64, [u8; 32])>> {
    let total = blocks.len() as u64 * BLOCK;
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let file = &file;
    stream::iter(blocks.iter().copied())
        .map(|index| async move {
            let mut buf = vec![0u8; BLOCK as usize];
            read_block(file, size, index, &mut buf)?;
            let digest: [u8; 32] = Sha256::digest(&buf).into();
            ebs.put_snapshot_block()
                .snapshot_id(snapshot_id)
                .block_index(index as i32)
                .data_length(BLOCK as i32)
                .checksum(B64.encode(digest))
                .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                .block_data(ByteStream::from(buf))
                .send()
                .await
                .map_err(|e| explain("ebs:PutSnapshotBlock", region, e))
                .with_context(|| format!("block {index} of {snapshot_id}"))?;
            progress(BLOCK, total);
            Ok::<_, anyhow::Error>((index, digest))
        })
        .buffer_unordered(workers.max(1))
        .try_collect()
        .await
}

/// Read a snapshot back through ListSnapshotBlocks/GetSnapshotBlock and compare it
/// with `path` block by block: blocks the snapshot holds must equal the file's, and
/// blocks it does not hold must be zeros in the file. Returns the number of blocks
/// compared; any difference is an error naming the first differing block.
pub async fn verify(
    ebs: &aws_sdk_ebs::Client,
    region: &str,
    snapshot_id: &str,
    path: &Path,
) -> Result<u64> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = file.metadata()?.len();
    let mut listed = Vec::new();
    let mut pages = ebs
        .list_snapshot_blocks()
        .snapshot_id(snapshot_id)
        .into_paginator()
        .send();
    while let Some(page) = pages
        .try_next()
        .await
        .map_err(|e| explain("ebs:ListSnapshotBlocks", region, e))?
    {
        for b in page.blocks() {
            if let (Some(i), Some(t)) = (b.block_index(), b.block_token()) {
                listed.push((i as u64, t.to_owned()));
            }
        }
    }
    listed.sort_unstable();
    let mut buf = vec![0u8; BLOCK as usize];
    let mut held = listed.iter().peekable();
    for index in 0..size.div_ceil(BLOCK) {
        let expected = read_block(&file, size, index, &mut buf)?;
        let actual = match held.next_if(|b| b.0 == index) {
            Some((_, token)) => {
                let block = ebs
                    .get_snapshot_block()
                    .snapshot_id(snapshot_id)
                    .block_index(index as i32)
                    .block_token(token)
                    .send()
                    .await
                    .map_err(|e| explain("ebs:GetSnapshotBlock", region, e))?;
                block
                    .block_data
                    .collect()
                    .await
                    .with_context(|| format!("cannot read block {index} of {snapshot_id}"))?
                    .into_bytes()
                    .to_vec()
            }
            None => vec![0u8; BLOCK as usize],
        };
        if actual != expected {
            bail!(
                "snapshot {snapshot_id} differs from {} at block {index} (byte offset {})",
                path.display(),
                index * BLOCK
            );
        }
    }
    if let Some((i, _)) = held.next() {
        bail!(
            "snapshot {snapshot_id} holds block {i}, beyond the end of {}",
            path.display()
        );
    }
    Ok(size.div_ceil(BLOCK))
}
