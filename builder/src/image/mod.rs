//! Layer 3, the stages that shape an image's bytes: resolve (package set and
//! identity), rootfs, customize, disk and convert, and the file helpers they use.
//!
//! Every file of this folder is hashed into the build id (see
//! [`identity::SHAPING_SOURCES`]), and nothing outside it is: code here decides what
//! the image holds; code elsewhere only runs, records or ships it.

pub mod apt;
pub mod convert;
pub mod customize;
pub mod disk;
pub mod files;
pub mod identity;
pub mod rootfs;
