//! The EC2 health signal: check the agent and send the CloudFormation signal the
//! instance's user data asks for (see [`crate::health`]); logged and audited, never
//! fatal.

use std::sync::Arc;

use super::shared::Shared;
use crate::health::Unhealthy;

/// The agent's checks of itself: it owns its bus name, runs `expected` (if given),
/// and its audit chain verifies.
pub(super) async fn self_checks(
    shared: &Shared,
    conn: &zbus::Connection,
    expected: Option<&str>,
) -> Vec<crate::health::Check> {
    let config = shared.config();
    let owner = async {
        let dbus = zbus::fdo::DBusProxy::new(conn).await?;
        let name = zbus::names::BusName::try_from(crate::BUS_NAME)?;
        Ok::<_, zbus::Error>(dbus.get_name_owner(name).await?.to_string())
    };
    let bus = match (owner.await, conn.unique_name()) {
        (Ok(owner), Some(me)) if owner == me.as_str() => Ok(()),
        (Ok(owner), _) => Err(Unhealthy::NameTaken {
            name: crate::BUS_NAME,
            owner,
        }),
        (Err(source), _) => Err(Unhealthy::BusUnreachable {
            name: crate::BUS_NAME,
            source,
        }),
    };
    let audit = match shared
        .verify_audit(super::shared::Verify::SinceLast, None)
        .await
    {
        Ok(v) if v.ok => Ok(()),
        Ok(v) => Err(Unhealthy::AuditTampered(v.first_bad.map_or_else(
            || "the audit log does not verify".into(),
            |b| b.reason,
        ))),
        Err(e) => Err(Unhealthy::AuditUnverifiable(Box::new(e))),
    };
    vec![
        crate::health::Check {
            name: "bus-name",
            result: bus,
        },
        crate::health::version_check(expected, &config.os_release),
        crate::health::Check {
            name: "audit-chain",
            result: audit,
        },
    ]
}

pub(super) async fn signal(shared: Arc<Shared>, conn: zbus::Connection) {
    let config = shared.config();
    let marker = config.state_dir.join("health-signalled");
    // A machine an in-place rollout moved runs a newer version than its user data
    // (the stack's) names: that version is the one to check against.
    let running = crate::os_release::image_version(&config.os_release).ok();
    let moved_to =
        crate::inplace::Attempt::load(&config.state_dir.join(crate::inplace::ATTEMPT_FILE))
            .filter(|a| a.moved && Some(&a.version) == running.as_ref())
            .map(|a| a.version);
    let checks = async |request: &crate::health::Request| {
        let expected = moved_to.as_deref().or(request.version.as_deref());
        self_checks(&shared, &conn, expected).await
    };
    match crate::health::signal(&marker, checks).await {
        Ok(crate::health::Outcome::Sent {
            request,
            instance,
            status,
            reason,
        }) => {
            tracing::info!(stack = %request.stack, resource = %request.resource, %instance, status = %status.as_str(), "health signal sent");
            // (`audit` logs a failed append; the signal was sent either way.)
            let _ = shared.audit(
                "health.signalled",
                None,
                None,
                None,
                serde_json::json!({
                    "stack": request.stack, "resource": request.resource, "region": request.region,
                    "instance": instance, "status": status.as_str(), "reason": reason,
                }),
            );
        }
        Ok(crate::health::Outcome::AlreadySent) => {
            tracing::info!("health signal already sent in this boot");
            // (`audit` logs a failed append; nothing was sent either way.)
            let _ = shared.audit(
                "health.already-signalled",
                None,
                None,
                None,
                serde_json::json!({}),
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("health signal: {e:#}"),
    }
}
