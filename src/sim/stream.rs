//! What a session streams: READY, the shard's GUILD_CREATEs, steady traffic, and the chunks of a
//! member request.

use std::sync::Arc;
use std::time::Duration;

use serde_json::value::to_raw_value;

use super::session::Session;
use super::{lock, Shared};

/// Id of the simulated bot user.
pub const BOT_USER_ID: u64 = 1_100_000_000_000_000_001;

/// Sends READY, then the shard's GUILD_CREATEs, then steady traffic until the session ends.
pub(crate) async fn stream_session(shared: Arc<Shared>, session: Arc<Session>) {
    let shard = session.shard;
    let extra_delay = lock(&shared.faults).ready_delay(shard);
    let delay = shared.config.ready_delay + extra_delay.unwrap_or_default();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let world = &shared.worlds[shard as usize];
    let guild_ids = lock(world).guild_ids();
    let ready = serde_json::json!({
        "v": actors::gateway::API_VERSION,
        "user": bot_user(),
        "guilds": guild_ids
            .iter()
            .map(|id| serde_json::json!({"id": id, "unavailable": true}))
            .collect::<Vec<_>>(),
        "session_id": session.id,
        "resume_gateway_url": shared.resume_url,
        "shard": [shard, shared.config.shards],
        "application": {"id": BOT_USER_ID.to_string(), "flags": 0},
        "session_type": "normal",
        "private_channels": [],
        "relationships": [],
        "presences": [],
        "guild_join_requests": [],
        "user_settings": {},
    });
    let ready = to_raw_value(&ready).expect("READY serializes");
    if session
        .dispatch("READY", &ready, &shared.recorder)
        .is_none()
    {
        return;
    }

    let withheld = lock(&shared.faults).take_withhold(shard) as usize;
    let sent = guild_ids.len().saturating_sub(withheld);
    for guild_id in &guild_ids[..sent] {
        let data = lock(world).guild_create(*guild_id, session.large_threshold, session.intents);
        let Some(data) = data else { continue };
        if session
            .dispatch("GUILD_CREATE", &data, &shared.recorder)
            .is_none()
        {
            return;
        }
        if shared.config.guild_create_interval.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(shared.config.guild_create_interval).await;
        }
    }
    if withheld > 0 {
        tracing::debug!(shard, withheld, "withheld GUILD_CREATEs");
    }

    run_traffic(shared, session).await;
}

/// Sends steady traffic at the configured rate while the session is known and resumable.
async fn run_traffic(shared: Arc<Shared>, session: Arc<Session>) {
    if shared.config.dispatch_rate <= 0.0 {
        return;
    }
    let period = Duration::from_secs_f64(1.0 / shared.config.dispatch_rate);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if shared.session(&session.id).is_none() {
            return;
        }
        let event = lock(&shared.worlds[session.shard as usize])
            .next_event_with_large_threshold(session.intents, session.large_threshold);
        let Some((name, data)) = event else { return };
        if session.dispatch(name, &data, &shared.recorder).is_none() {
            return;
        }
    }
}

/// Answers a member request chunk by chunk, releasing the world between chunks.
pub(crate) async fn send_member_chunks(
    shared: Arc<Shared>,
    session: Arc<Session>,
    guild_id: u64,
    plan: super::world::MemberPlan,
) {
    let world = &shared.worlds[session.shard as usize];
    for index in 0..plan.chunk_count() {
        let chunk = lock(world).member_chunk(&plan, index);
        if session
            .dispatch("GUILD_MEMBERS_CHUNK", &chunk, &shared.recorder)
            .is_none()
        {
            return;
        }
        shared.recorder.update(|report| {
            if let Some(record) = report.member_requests.get_mut(&guild_id) {
                record.chunks_sent += 1;
            }
        });
        tokio::task::yield_now().await;
    }
}

/// The bot's user object, as READY carries it.
fn bot_user() -> serde_json::Value {
    serde_json::json!({
        "id": BOT_USER_ID.to_string(),
        "username": "shardvisor-sim",
        "discriminator": "0",
        "global_name": null,
        "avatar": null,
        "bot": true,
        "verified": true,
        "mfa_enabled": false,
        "flags": 0,
        "public_flags": 0,
    })
}
