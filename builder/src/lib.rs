//! devos-build: turn a declarative image spec into versioned, bootable, tested images.
//!
//! The pipeline is a flat list of named stages (see [`build::STAGES`]); each module
//! below is one stage or one concern. The binary is a thin wrapper over [`cli::run`].

pub mod agent_pkg;
pub mod apt;
pub mod boottest;
pub mod build;
pub mod cache;
pub mod cli;
pub mod cmd;
pub mod convert;
pub mod customize;
pub mod digest;
pub mod disk;
pub mod doctor;
pub mod fleet;
pub mod identity;
pub mod inventory;
pub mod packer;
pub mod publish;
pub mod qemu;
pub mod registry;
pub mod repro;
pub mod rootfs;
pub mod settings;
pub mod spec;
pub mod ui;
