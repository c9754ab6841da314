//! What users may spend on the model: the budgets of `[budgets]` checked against the
//! ledger — and against the calls still in flight, each held at its worst-case cost
//! until it is on the ledger, so requests sent together cannot all slip under a
//! budget — and the `Usage` report.

use std::collections::HashMap;

use zbus::fdo;

use super::shared::{Shared, failed, lock};
use crate::caller::Caller;
use crate::config::AgentConfig;
use crate::model::bedrock::Usage;
use crate::model::conversation::Conversation;
use crate::store::Spent;

/// Model calls in flight, at their worst-case cost in USD.
#[derive(Default)]
pub(super) struct Held {
    by_uid: HashMap<u32, f64>,
    total: f64,
}

/// One call's hold on the budgets; released when dropped (after the call is on the
/// ledger, or did not happen).
pub(super) struct Hold<'a> {
    shared: &'a Shared,
    uid: u32,
    usd: f64,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut held = lock(&self.shared.held);
        if let Some(mine) = held.by_uid.get_mut(&self.uid) {
            *mine = (*mine - self.usd).max(0.0);
        }
        held.total = (held.total - self.usd).max(0.0);
    }
}

/// Whether a request of `uid` to `model` may start now: why not, with the figures.
pub(super) fn refusal(
    shared: &Shared,
    uid: u32,
    config: &AgentConfig,
    model: &str,
) -> fdo::Result<Option<String>> {
    let held = lock(&shared.held);
    refusal_with(shared, &held, uid, config, model)
}

/// Hold the worst-case cost of the next call of `uid` to `model` with `conversation`
/// against the budgets — or say why the call may not be made.
pub(super) fn hold<'a>(
    shared: &'a Shared,
    uid: u32,
    config: &AgentConfig,
    model: &str,
    conversation: &Conversation,
) -> fdo::Result<Result<Hold<'a>, String>> {
    let mut held = lock(&shared.held);
    if let Some(why) = refusal_with(shared, &held, uid, config, model)? {
        return Ok(Err(why));
    }
    let worst = Usage {
        input: estimated_tokens(conversation.size() + crate::model::prompt_bytes()),
        output: u64::from(config.model.max_tokens),
        cache_read: 0,
        cache_write: 0,
    };
    let usd = crate::model::cost(&config.model, model, &worst).unwrap_or(0.0);
    *held.by_uid.entry(uid).or_insert(0.0) += usd;
    held.total += usd;
    Ok(Ok(Hold { shared, uid, usd }))
}

/// About how many bytes of text a token is (Claude's tokenizer averages near 4 in
/// English and code).
pub(super) const BYTES_PER_TOKEN: usize = 4;

/// About how many tokens `bytes` of text are.
pub(super) fn estimated_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(BYTES_PER_TOKEN as u64)
}

fn refusal_with(
    shared: &Shared,
    held: &Held,
    uid: u32,
    config: &AgentConfig,
    model: &str,
) -> fdo::Result<Option<String>> {
    let b = &config.budgets;
    let limited = [b.user_daily_usd, b.user_monthly_usd, b.machine_monthly_usd]
        .iter()
        .any(|l| *l > 0.0);
    if !limited {
        return Ok(None);
    }
    if crate::model::cost(&config.model, model, &Usage::default()).is_none() {
        return Ok(Some(format!(
            "model {model} has no price in [model.prices], and model budgets are set on this machine: only priced models may be used (the configured ones are {} and {}); an administrator can add its price to /etc/devos/agent.toml",
            config.model.small, config.model.large
        )));
    }
    let spent = lock(&shared.store).spent(uid, &today()).map_err(failed)?;
    let mine = held.by_uid.get(&uid).copied().unwrap_or(0.0);
    let Spent {
        user_today,
        user_month,
        machine_month,
    } = spent;
    let over = [
        (
            b.user_daily_usd,
            user_today,
            mine,
            "your daily model budget",
            "today",
            "user-daily-usd",
        ),
        (
            b.user_monthly_usd,
            user_month,
            mine,
            "your monthly model budget",
            "this month",
            "user-monthly-usd",
        ),
        (
            b.machine_monthly_usd,
            machine_month,
            held.total,
            "this machine's monthly model budget",
            "this month by all users",
            "machine-monthly-usd",
        ),
    ]
    .into_iter()
    .find(|(limit, spent, held, ..)| *limit > 0.0 && spent + held >= *limit);
    Ok(over.map(|(limit, spent, held, what, when, key)| {
        let in_flight = if held > 0.0 {
            format!(" and up to ${held:.4} held for model calls still in flight")
        } else {
            String::new()
        };
        format!(
            "{what} is used up: ${spent:.4} spent {when} (UTC){in_flight}, of ${limit:.4}; nothing was sent to the model. It resets at the start of the next UTC day or month; an administrator can raise [budgets] {key} in /etc/devos/agent.toml"
        )
    }))
}

/// Usage as JSON for `Usage`: rows per day, user and model, totals and budgets.
pub(super) fn usage(shared: &Shared, caller: &Caller, since: &str) -> fdo::Result<String> {
    let since = if since.is_empty() {
        day_of(std::time::SystemTime::now() - std::time::Duration::from_secs(30 * 86400))
    } else if is_day(since) {
        since.to_owned()
    } else {
        return Err(fdo::Error::InvalidArgs(format!(
            "since must be a date YYYY-MM-DD, not `{since}`"
        )));
    };
    let uid = (caller.uid != 0).then_some(caller.uid);
    let store = lock(&shared.store);
    let rows = store.usage(uid, &since).map_err(failed)?;
    let spent = store.spent(caller.uid, &today()).map_err(failed)?;
    let budgets = shared.config().budgets.clone();
    Ok(serde_json::json!({
        "since": since,
        "rows": rows,
        // (A fold from +0: an empty float sum is -0, shown as "$-0.0000".)
        "total-cost-usd": rows.iter().fold(0.0, |total, r| total + r.cost_usd),
        "unpriced-calls": rows.iter().map(|r| r.unpriced_calls).sum::<u64>(),
        "estimated-calls": rows.iter().map(|r| r.estimated_calls).sum::<u64>(),
        "spent": {
            "user-today-usd": spent.user_today,
            "user-month-usd": spent.user_month,
            "machine-month-usd": spent.machine_month,
        },
        "budgets": budgets,
    })
    .to_string())
}

/// Whether `s` is a calendar date written `YYYY-MM-DD`.
fn is_day(s: &str) -> bool {
    let part = |r: std::ops::Range<usize>| {
        s.get(r)
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u16>().ok())
    };
    let (Some(y), Some(m), Some(d)) = (part(0..4), part(5..7), part(8..10)) else {
        return false;
    };
    s.len() == 10
        && &s[4..5] == "-"
        && &s[7..8] == "-"
        && time::Month::try_from(m as u8)
            .ok()
            .and_then(|m| time::Date::from_calendar_date(y as i32, m, d as u8).ok())
            .is_some()
}

fn day_of(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()[..10].to_owned()
}

fn today() -> String {
    day_of(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_calendar_dates() {
        assert!(is_day("2026-02-28"));
        assert!(!is_day("2026-02-30"));
        assert!(!is_day("2026-2-28"));
        assert!(!is_day("yesterday"));
        assert!(!is_day("2026-02-28'; --"));
    }
}
