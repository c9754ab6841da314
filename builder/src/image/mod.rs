//! Layer 3, the stages that shape an image's bytes: resolve (package set and
//! identity), rootfs, customize, disk and convert, and the file helpers they use.
//!
//! Every file of this folder is hashed into the build id (see
//! [`identity::SHAPING_SOURCES`]): code here decides what the image holds. What the
//! stages take from elsewhere is an input of its own (the spec's values, the package
//! set, the agent package and its rendered configuration, the host tools); code
//! elsewhere only runs, records or ships what is built.

pub(crate) mod access;
pub(crate) mod apt;
pub(crate) mod convert;
pub(crate) mod customize;
pub(crate) mod disk;
pub(crate) mod files;
pub(crate) mod identity;
pub(crate) mod rootfs;
pub(crate) mod secure_boot;
pub(crate) mod sysupdate;

use anyhow::Result;

use crate::model::spec::{Distro, Spec};

/// What the stages would refuse later that the spec already shows, checked by the
/// stages' own functions for `image validate`: a `[base] keyring` missing on this host.
pub(crate) fn check_spec(spec: &Spec) -> Result<()> {
    if spec.distro != Distro::Nixos && spec.keyring.is_some() {
        rootfs::preflight(spec)?;
    }
    Ok(())
}
