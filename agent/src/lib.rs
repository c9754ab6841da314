//! The DevOS agent: a developer assistant that runs as a D-Bus system service.
//!
//! This crate is both the daemon (`devos-agent`) and the schema of its configuration,
//! which the image builder uses to validate an image spec's `[agent.config]`.

pub mod accounts;
#[cfg(feature = "daemon")]
pub mod action;
#[cfg(feature = "daemon")]
pub mod approval;
#[cfg(feature = "daemon")]
pub mod audit;
pub mod bootloader;
#[cfg(feature = "daemon")]
pub mod caller;
#[cfg(feature = "daemon")]
pub mod cli;
#[cfg(feature = "daemon")]
pub mod client;
pub mod config;
#[cfg(feature = "daemon")]
pub mod context;
#[cfg(feature = "daemon")]
pub mod gitrepo;
pub mod inplace;
#[cfg(feature = "daemon")]
pub mod model;
pub mod os_release;
#[cfg(feature = "daemon")]
pub mod planner;
#[cfg(feature = "daemon")]
pub mod request;
pub mod risk;
pub mod stdout;
#[cfg(feature = "daemon")]
pub mod store;

pub mod update;

#[cfg(feature = "daemon")]
pub mod ec2;
#[cfg(feature = "daemon")]
pub mod executor;
#[cfg(feature = "daemon")]
pub mod health;
#[cfg(feature = "daemon")]
pub mod sandbox;
#[cfg(feature = "daemon")]
pub mod selftest;
#[cfg(feature = "daemon")]
pub mod service;

/// The Debian packages the agent needs at run time: the system bus, bubblewrap,
/// which builds every action's sandbox, and the CA certificates its HTTPS calls to
/// AWS (Bedrock, CloudFormation) verify against, and the SQLite library its state
/// lives in (linked from Debian, not compiled in). Images with the agent get them; the
/// agent's package depends on them.
pub const PACKAGE_DEPENDS: &[&str] = &["dbus", "bubblewrap", "ca-certificates", "libsqlite3-0"];

/// The well-known bus name the agent owns on the system bus.
pub const BUS_NAME: &str = "org.devos.Agent1";
/// The object path of the agent's main object.
pub const OBJECT_PATH: &str = "/org/devos/Agent1";
/// The D-Bus interface of the agent's main object.
pub const INTERFACE: &str = "org.devos.Agent1";
