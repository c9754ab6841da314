//! The agent's D-Bus service: the shared state ([`shared`]), the `org.devos.Agent1`
//! interfaces ([`agent`]), decisions and remembered rules ([`rules`]), the task that
//! carries out a request ([`runner`]), the conversation with the model that carries
//! out what the local rules cannot plan ([`converse`]) and what it may spend
//! ([`budget`]), the context engine's interface and watchers ([`context`]), and the
//! EC2 health signal ([`health`]).

use std::path::Path;

use crate::config::AgentConfig;

mod agent;
mod budget;
mod context;
mod converse;
mod health;
mod inplace;
mod rules;
mod runner;
mod shared;
mod watchdog;

pub use agent::{Admin, Agent};
pub use context::{Context, parse_since};
pub use shared::Shared;

/// Resolves when the agent no longer owns its name on the bus (the bus daemon
/// dropped its connection, or another owner took the name).
async fn still_on_the_bus(conn: &zbus::Connection) -> anyhow::Error {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let owner = async {
            let dbus = zbus::fdo::DBusProxy::new(conn).await?;
            let name = zbus::names::BusName::try_from(crate::BUS_NAME)?;
            Ok::<_, zbus::Error>(dbus.get_name_owner(name).await?.to_string())
        };
        match (owner.await, conn.unique_name()) {
            (Ok(owner), Some(me)) if owner == me.as_str() => {}
            (Ok(owner), _) => {
                return anyhow::anyhow!("{} is now owned by {owner}", crate::BUS_NAME);
            }
            (Err(e), _) => return anyhow::anyhow!("lost the system bus: {e}"),
        }
    }
}

/// Connect to the system bus, own [`crate::BUS_NAME`] and serve the agent until
/// `shutdown` resolves. `DBUS_SYSTEM_BUS_ADDRESS` selects another bus (tests do).
pub async fn serve(
    config_path: &Path,
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    config.policy.warn_of_movable_deny_places();
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
        .serve_at(
            crate::OBJECT_PATH,
            Context {
                shared: shared.clone(),
            },
        )?
        .name(crate::BUS_NAME)?
        .build()
        .await?;
    // (Set once: `serve` runs once per `Shared`.)
    let _ = shared.conn.set(conn.clone());
    tracing::info!(name = crate::BUS_NAME, "serving on the system bus");
    tokio::spawn(watchdog::feed());
    tokio::spawn(health::signal(shared.clone(), conn.clone()));
    tokio::spawn(inplace::follow(shared.clone(), conn.clone()));
    {
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || context::Engine::resume(&shared));
    }
    let lost = tokio::select! {
        () = shutdown => None,
        e = still_on_the_bus(&conn) => Some(e),
    };
    if let Some(e) = lost {
        // An agent nobody can reach is no agent: exit, and let systemd start a new one.
        // (`audit` logs a failed append; the agent exits either way.)
        let _ = shared.audit(
            "agent.lost-bus",
            None,
            None,
            None,
            serde_json::json!({ "error": e.to_string() }),
        );
        return Err(e);
    }
    tracing::info!("shutting down");
    // (The bus releases the name with the connection anyway.)
    conn.release_name(crate::BUS_NAME).await.ok();
    // (`audit` logs a failed append; the agent stops either way.)
    let _ = shared.audit("agent.stopped", None, None, None, serde_json::json!({}));
    if let Err(e) = shared::lock(&shared.audit).checkpoint() {
        tracing::error!("audit checkpoint at shutdown failed: {e}");
    }
    Ok(())
}
