//! The DevOS agent: a developer assistant that runs as a D-Bus system service.
//!
//! This crate is both the daemon (`devos-agent`) and the schema of its configuration,
//! which the image builder uses to validate an image spec's `[agent.config]`.

pub mod action;
#[cfg(feature = "daemon")]
pub mod approval;
#[cfg(feature = "daemon")]
pub mod audit;
#[cfg(feature = "daemon")]
pub mod cli;
#[cfg(feature = "daemon")]
pub mod client;
pub mod config;
pub mod os_release;
pub mod planner;
pub mod request;
pub mod risk;
#[cfg(feature = "daemon")]
pub mod store;

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

/// The well-known bus name the agent owns on the system bus.
pub const BUS_NAME: &str = "org.devos.Agent1";
/// The object path of the agent's main object.
pub const OBJECT_PATH: &str = "/org/devos/Agent1";
/// The D-Bus interface of the agent's main object.
pub const INTERFACE: &str = "org.devos.Agent1";
