//! The `org.devos.Agent1` D-Bus interface: the object the daemon serves and a typed proxy
//! that clients (the `devos` CLI, the boot self-test, tests) call it through.

use std::path::PathBuf;

use crate::config::AgentConfig;

/// The object served at [`crate::OBJECT_PATH`].
pub struct Agent {
    os_release: PathBuf,
}

impl Agent {
    pub fn new(config: &AgentConfig) -> Self {
        Self {
            os_release: config.os_release.clone(),
        }
    }
}

#[zbus::interface(name = "org.devos.Agent1")]
impl Agent {
    /// Liveness check: always answers `pong`.
    async fn ping(&self) -> String {
        "pong".to_owned()
    }

    /// The image version (`IMAGE_VERSION` in os-release) this agent runs in.
    async fn version(&self) -> zbus::fdo::Result<String> {
        crate::os_release::image_version(&self.os_release).map_err(zbus::fdo::Error::Failed)
    }
}

#[zbus::proxy(
    interface = "org.devos.Agent1",
    default_service = "org.devos.Agent1",
    default_path = "/org/devos/Agent1"
)]
pub trait Agent1 {
    fn ping(&self) -> zbus::Result<String>;
    fn version(&self) -> zbus::Result<String>;
}

/// Connect to the system bus, own [`crate::BUS_NAME`] and serve the agent until
/// `shutdown` resolves. `DBUS_SYSTEM_BUS_ADDRESS` selects another bus (tests do).
pub async fn serve(
    config: &AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> zbus::Result<()> {
    let conn = zbus::connection::Builder::system()?
        .serve_at(crate::OBJECT_PATH, Agent::new(config))?
        .name(crate::BUS_NAME)?
        .build()
        .await?;
    tracing::info!(name = crate::BUS_NAME, "serving on the system bus");
    shutdown.await;
    tracing::info!("shutting down");
    conn.release_name(crate::BUS_NAME).await.ok();
    Ok(())
}
