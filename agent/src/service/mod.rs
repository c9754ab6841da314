//! The agent's D-Bus service: the shared state ([`shared`]), the `org.devos.Agent1`
//! interfaces ([`agent`]), decisions and remembered rules ([`rules`]), the task that
//! carries out a request ([`runner`]) and the EC2 health signal ([`health`]).

use std::path::Path;

use crate::config::AgentConfig;

mod agent;
mod health;
mod rules;
mod runner;
mod shared;

pub use agent::{Admin, Agent};
pub use shared::Shared;

/// Connect to the system bus, own [`crate::BUS_NAME`] and serve the agent until
/// `shutdown` resolves. `DBUS_SYSTEM_BUS_ADDRESS` selects another bus (tests do).
pub async fn serve(
    config_path: &Path,
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let shared = Shared::open(config_path, config)?;
    let conn = zbus::connection::Builder::system()?
        .serve_at(
            crate::OBJECT_PATH,
            Agent {
                shared: shared.clone(),
            },
        )?
        .serve_at(
            crate::OBJECT_PATH,
            Admin {
                shared: shared.clone(),
            },
        )?
        .name(crate::BUS_NAME)?
        .build()
        .await?;
    let _ = shared.conn.set(conn.clone());
    tracing::info!(name = crate::BUS_NAME, "serving on the system bus");
    tokio::spawn(health::signal(shared.clone(), conn.clone()));
    shutdown.await;
    tracing::info!("shutting down");
    conn.release_name(crate::BUS_NAME).await.ok();
    let _ = shared.audit("agent.stopped", None, None, None, serde_json::json!({}));
    let _ = shared::lock(&shared.audit).checkpoint();
    Ok(())
}
