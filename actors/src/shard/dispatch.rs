//! Dispatch handling: READY and RESUMED move the session along; every event is stored, then
//! pushed, then its sequence number is taken, so the saved sequence never passes an event that
//! was not delivered.

use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::state::{Session, ShardState};
use super::{Event, MemberRequestReason, ShardMsg, ShardStage};
use crate::gateway::{Dispatch, GuildMembersChunkHeader, RateLimited, Ready, Snowflake};
use crate::store::{Applied, PortError};

/// First wait before retrying a store or sink that is unavailable; doubles up to 5 s.
const PORT_RETRY: Duration = Duration::from_millis(100);

/// The GUILD_CREATE fields the backfill decision reads.
#[derive(Deserialize)]
struct GuildCreateHead {
    id: Snowflake,
    #[serde(default)]
    member_count: Option<u64>,
    #[serde(default)]
    unavailable: Option<bool>,
}

/// The GUILD_DELETE fields that tell an outage from a removal.
#[derive(Deserialize)]
struct GuildDeleteHead {
    id: Snowflake,
    #[serde(default)]
    unavailable: Option<bool>,
}

impl ShardState {
    pub(crate) async fn on_dispatch(&mut self, dispatch: Dispatch) {
        let Dispatch { seq, event, data } = dispatch;
        tracing::trace!(shard = self.args.shard, seq, event_type = %event, "dispatch");

        match event.as_str() {
            "READY" => self.on_ready(&data).await,
            "RESUMED" => self.on_resumed().await,
            "GUILD_CREATE" => {
                self.on_guild_create(&data).await;
                self.take_sequence(seq).await;
                return;
            }
            "GUILD_DELETE" => self.on_guild_delete(&data),
            "GUILD_MEMBERS_CHUNK" => self.on_members_chunk(&data),
            "RATE_LIMITED" => self.on_rate_limited(&data),
            _ => {}
        }

        let applied = self.apply(&event, &data).await;
        if applied.is_some() && event != "GUILD_MEMBERS_CHUNK" {
            self.push(&event, &data).await;
        }
        self.take_sequence(seq).await;
        if event == "GUILD_DELETE" {
            self.update_progress().await;
        }
    }

    async fn take_sequence(&mut self, seq: u64) {
        // READY starts a session at 1; after it, or after RESUMED's replay, every dispatch must
        // follow the previous one. A jump means the gateway lost events for this session.
        if self.seq > 0 && seq > self.seq + 1 {
            let missed = seq - self.seq - 1;
            self.missed_events += missed;
            tracing::warn!(
                shard = self.args.shard,
                expected = self.seq + 1,
                received = seq,
                missed,
                "sequence gap"
            );
        }
        self.seq = self.seq.max(seq);
        self.unsaved += 1;
        if self.unsaved >= self.args.save_every {
            self.save().await;
        }
    }

    async fn on_ready(&mut self, data: &RawValue) {
        let ready: Ready = match serde_json::from_str(data.get()) {
            Ok(ready) => ready,
            Err(error) => {
                tracing::error!(shard = self.args.shard, %error, "READY could not be decoded; reconnecting");
                self.drop_session().await;
                return;
            }
        };
        tracing::info!(
            shard = self.args.shard,
            guilds = ready.guilds.len(),
            "READY"
        );
        self.session = Some(Session {
            id: ready.session_id,
            resume_url: Some(ready.resume_gateway_url),
        });
        self.seq = 0;
        self.connected();
        self.expect_guilds(ready.guilds.iter().map(|guild| guild.id.get()));
        self.start_stabilize_hold();
        let pending = self.guilds.pending.len() as u32;
        self.set_stage(ShardStage::StreamingGuilds { pending });
        self.update_progress().await;
        self.save().await;
    }

    async fn on_resumed(&mut self) {
        tracing::info!(shard = self.args.shard, seq = self.seq, "RESUMED");
        self.connected();
        self.update_progress().await;
        if self.stage.is_steady() {
            self.save().await;
        }
    }

    /// Stores a GUILD_CREATE, pushes it if the guild is new to the cache, and requests its
    /// members when the cached count is missing or diverges.
    async fn on_guild_create(&mut self, data: &RawValue) {
        let head: GuildCreateHead = match serde_json::from_str(data.get()) {
            Ok(head) => head,
            Err(error) => {
                tracing::warn!(shard = self.args.shard, %error, "GUILD_CREATE without a valid id skipped");
                return;
            }
        };
        let guild_id = head.id.get();

        // Read the cached count before the GUILD_CREATE adds its own partial member list.
        let cached = self.read_member_count(guild_id).await;
        let applied = self.apply("GUILD_CREATE", data).await;
        if applied.is_some_and(|applied| applied.new_guild) {
            self.push("GUILD_CREATE", data).await;
        }

        if head.unavailable != Some(true) && self.needs_backfill(head.member_count, cached) {
            self.request_members(guild_id, MemberRequestReason::Backfill);
        }
        if self.guilds.pending.remove(&guild_id) {
            self.update_progress().await;
        }
    }

    fn needs_backfill(&self, discord: Option<u64>, cached: Option<u64>) -> bool {
        needs_member_backfill(discord, cached, self.args.divergence_ratio)
    }

    fn on_guild_delete(&mut self, data: &RawValue) {
        if let Ok(head) = serde_json::from_str::<GuildDeleteHead>(data.get()) {
            // An unavailable guild promised by READY will not arrive: stop waiting for it.
            self.guilds.pending.remove(&head.id.get());
            if head.unavailable != Some(true) {
                self.outstanding.remove(&head.id.get());
                if let Some(timer) = self.deferred.remove(&head.id.get()) {
                    timer.abort();
                }
            }
        }
    }

    fn on_members_chunk(&mut self, data: &RawValue) {
        let Ok(header) = serde_json::from_str::<GuildMembersChunkHeader>(data.get()) else {
            return;
        };
        let guild_id = header.guild_id.get();
        let ours =
            header.nonce.is_some() && self.outstanding.get(&guild_id) == header.nonce.as_ref();
        if ours && header.chunk_index + 1 >= header.chunk_count {
            self.outstanding.remove(&guild_id);
        }
    }

    /// Honours RATE_LIMITED for a member request: the request is sent again after `retry_after`.
    fn on_rate_limited(&mut self, data: &RawValue) {
        let Ok(limited) = serde_json::from_str::<RateLimited>(data.get()) else {
            return;
        };
        if limited.opcode != crate::gateway::OpCode::RequestGuildMembers.code() {
            return;
        }
        let guild_id = limited.meta.guild_id.get();
        if !self.outstanding.contains_key(&guild_id) {
            return;
        }
        let wait = Duration::from_secs_f64(limited.retry_after.max(0.0));
        tracing::debug!(
            shard = self.args.shard,
            guild_id,
            retry_after_ms = wait.as_millis() as u64,
            "member request rate limited"
        );
        let actor = self.myself.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = actor.cast(ShardMsg::from(Event::RetryMembers { guild_id }));
        });
    }

    async fn read_member_count(&self, guild_id: u64) -> Option<u64> {
        let mut failures = 0;
        loop {
            match self.args.store.member_count(guild_id).await {
                Ok(count) => return count,
                Err(error) => {
                    failures += 1;
                    if !self.wait_for_port("state store", &error, failures).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Applies an event to the store, waiting out an unavailable store. Returns `None` for an
    /// event the store rejected as invalid; it is logged and not pushed.
    async fn apply(&self, event: &str, data: &RawValue) -> Option<Applied> {
        let mut failures = 0;
        loop {
            match self.args.store.apply(self.args.shard, event, data).await {
                Ok(applied) => return Some(applied),
                Err(PortError::InvalidEvent {
                    event,
                    guild,
                    reason,
                }) => {
                    tracing::warn!(shard = self.args.shard, event_type = %event, guild_id = guild, %reason, "event not cached");
                    return None;
                }
                Err(error) => {
                    failures += 1;
                    self.wait_for_port("state store", &error, failures).await;
                }
            }
        }
    }

    /// Pushes an event to the sink, waiting out an unavailable sink.
    async fn push(&self, event: &str, data: &RawValue) {
        let mut failures = 0;
        while let Err(error) = self.args.sink.push(event, data).await {
            failures += 1;
            self.wait_for_port("event sink", &error, failures).await;
        }
    }

    /// Waits before retrying a port; the shard reads nothing meanwhile, so the gateway
    /// connection backs up instead of events being dropped. Returns `false` for an error that
    /// retrying cannot fix.
    async fn wait_for_port(&self, port: &'static str, error: &PortError, failures: u32) -> bool {
        if matches!(error, PortError::InvalidEvent { .. }) {
            return false;
        }
        if failures == 1 || failures % 50 == 0 {
            tracing::warn!(shard = self.args.shard, port, %error, failures, "write failed; retrying");
        }
        let exponent = failures.saturating_sub(1).min(6);
        let delay = PORT_RETRY
            .saturating_mul(1 << exponent)
            .min(Duration::from_secs(5));
        tokio::time::sleep(delay).await;
        true
    }
}

/// Returns whether a guild's members are requested at GUILD_CREATE. A cold guild (no member
/// cached) always needs them. A cached one needs them when `|discord - cached| / discord`
/// exceeds `ratio`. A ratio of 0 turns the comparison off.
pub fn needs_member_backfill(discord: Option<u64>, cached: Option<u64>, ratio: f64) -> bool {
    let cached = cached.unwrap_or(0);
    if cached == 0 {
        return true;
    }
    let Some(discord) = discord.filter(|count| *count > 0) else {
        return false;
    };
    ratio > 0.0 && (discord.abs_diff(cached) as f64 / discord as f64) > ratio
}

#[cfg(test)]
mod tests {
    use super::needs_member_backfill;

    #[test]
    fn cold_guild_always_requested() {
        assert!(needs_member_backfill(Some(500), None, 0.0));
        assert!(needs_member_backfill(Some(500), Some(0), 0.5));
        assert!(needs_member_backfill(None, None, 0.01));
    }

    #[test]
    fn cached_guild_requested_past_ratio() {
        assert!(!needs_member_backfill(Some(1000), Some(990), 0.01));
        assert!(needs_member_backfill(Some(1000), Some(989), 0.01));
        assert!(needs_member_backfill(Some(1000), Some(1011), 0.01));
        assert!(!needs_member_backfill(Some(1000), Some(1000), 0.001));
    }

    #[test]
    fn zero_ratio_compares_nothing() {
        assert!(!needs_member_backfill(Some(1000), Some(10), 0.0));
    }

    #[test]
    fn missing_discord_count_skips_comparison() {
        assert!(!needs_member_backfill(None, Some(10), 0.01));
        assert!(!needs_member_backfill(Some(0), Some(10), 0.01));
    }
}
