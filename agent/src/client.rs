//! Typed proxies for the agent's D-Bus interfaces, used by the `devos` CLI, the boot
//! self-test and the tests.

/// `org.devos.Agent1`; see docs/agent-api.md.
#[zbus::proxy(
    interface = "org.devos.Agent1",
    default_service = "org.devos.Agent1",
    default_path = "/org/devos/Agent1"
)]
pub trait Agent1 {
    fn ping(&self) -> zbus::Result<String>;
    fn version(&self) -> zbus::Result<String>;
    fn submit(&self, text: &str, cwd: &str) -> zbus::Result<String>;
    fn submit_to_model(&self, text: &str, cwd: &str, model: &str) -> zbus::Result<String>;
    #[zbus(name = "Continue")]
    fn continue_(&self, id: &str, text: &str) -> zbus::Result<String>;
    fn usage(&self, since: &str) -> zbus::Result<String>;
    fn get(&self, id: &str) -> zbus::Result<String>;
    fn list(&self) -> zbus::Result<String>;
    fn history(&self, limit: u32) -> zbus::Result<String>;
    fn approve(
        &self,
        id: &str,
        action: u32,
        remember: &str,
        command_prefix: &[&str],
        path_prefix: &str,
    ) -> zbus::Result<()>;
    fn deny(
        &self,
        id: &str,
        action: u32,
        remember: &str,
        command_prefix: &[&str],
        path_prefix: &str,
    ) -> zbus::Result<()>;
    fn cancel(&self, id: &str) -> zbus::Result<()>;
    fn rules(&self) -> zbus::Result<String>;
    fn add_rule(
        &self,
        decision: &str,
        lifetime: &str,
        command_prefix: &[&str],
        path_prefix: &str,
    ) -> zbus::Result<i64>;
    fn remove_rule(&self, id: i64) -> zbus::Result<()>;
    fn verify_audit(&self) -> zbus::Result<String>;
    fn verify_audit_since_last(&self) -> zbus::Result<String>;
    fn status(&self) -> zbus::Result<String>;

    #[zbus(signal)]
    fn request_changed(&self, id: &str, state: &str) -> zbus::Result<()>;
    #[zbus(signal)]
    fn approval_needed(
        &self,
        id: &str,
        action: u32,
        risk: &str,
        description: &str,
        origin: &str,
    ) -> zbus::Result<()>;
    #[zbus(signal)]
    fn action_output(&self, id: &str, action: u32, data: &str) -> zbus::Result<()>;
    #[zbus(signal)]
    fn model_output(&self, id: &str, text: &str) -> zbus::Result<()>;
}

/// `org.devos.Agent1.Context`: the caller's context index; see docs/agent-api.md.
#[zbus::proxy(
    interface = "org.devos.Agent1.Context",
    default_service = "org.devos.Agent1",
    default_path = "/org/devos/Agent1"
)]
pub trait Context {
    fn add_project(&self, path: &str, text: bool) -> zbus::Result<String>;
    fn remove_project(&self, path: &str) -> zbus::Result<()>;
    fn projects(&self) -> zbus::Result<String>;
    fn find(&self, query: &str, limit: u32) -> zbus::Result<String>;
    fn find_text(&self, query: &str, limit: u32) -> zbus::Result<String>;
    fn recent(&self, since: &str, limit: u32) -> zbus::Result<String>;
    fn git_state(&self, project: &str) -> zbus::Result<String>;
    fn processes(&self) -> zbus::Result<String>;
    fn status(&self) -> zbus::Result<String>;
}

/// `org.devos.Agent1.Admin`: root only.
#[zbus::proxy(
    interface = "org.devos.Agent1.Admin",
    default_service = "org.devos.Agent1",
    default_path = "/org/devos/Agent1"
)]
pub trait Admin {
    fn reload_config(&self) -> zbus::Result<()>;
    fn update(&self, action: &str) -> zbus::Result<String>;
}
