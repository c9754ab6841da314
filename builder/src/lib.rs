//! devos-build: turn a declarative image spec into versioned, bootable, tested images.
//!
//! The folders are the pipeline, in layers; a module uses only its own layer and the
//! ones before it (`tests/layers.rs` checks every `crate::` path against this order):
//!
//! | layer | module | what |
//! |---|---|---|
//! | 0 | [`support`] | commands, digests, work directories, time, progress |
//! | 1 | [`model`] | the spec, the builder's settings, the manifest |
//! | 2 | [`store`] | the stage cache and the image registry |
//! | 3 | `image` | the stages that shape the image's bytes (hashed into the build id) |
//! | 4 | `nixos` | NixOS images: the spec as a NixOS module, and Nix as a tool |
//! | 5 | `update` | A/B updates: signed bundles and feeds, the signing key |
//! | 6 | [`build`] | the pipeline that runs them and registers the version |
//! | 7 | [`boottest`] | boot tests and local boots under QEMU |
//! | 8 | `inventory` | list, show, diff, verify, gc and export of registered versions |
//! | 9 | `publish` | AMIs (EBS direct or Packer), promotion, verification, update feeds |
//! | 10 | `fleet` | CloudFormation stacks rolled forward and back, health-gated |
//! | 11 | [`cli`] | the command line |
//!
//! The binary is a thin wrapper over [`cli::run`]. Everything else is `pub(crate)`
//! unless the binary or an integration test reaches it.

pub mod support;

pub mod model;

pub mod store;

pub(crate) mod image;

pub(crate) mod nixos;

pub(crate) mod update;

pub mod build;

pub mod boottest;

pub(crate) mod inventory;

pub(crate) mod publish;

pub(crate) mod fleet;

pub mod cli;
