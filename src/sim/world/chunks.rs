//! Member requests: the members a REQUEST_GUILD_MEMBERS selects, and the GUILD_MEMBERS_CHUNK
//! payloads that carry them.

use actors::gateway::{Intents, RequestGuildMembers, Snowflake};
use serde::Serialize;
use serde_json::value::RawValue;

use super::guild::Guild;
use super::members::{MemberRecord, MemberView, Presence};
use super::wire::raw;
use super::{MemberPlan, Selection};

/// Most members of one GUILD_MEMBERS_CHUNK (Discord's documentation of the event).
pub(super) const CHUNK_SIZE: u32 = 1000;

/// Most members a query or a user-id request returns, and the limit a query with `limit` 0 gets.
///
/// NOTE: Discord documents 100 as the maximum of `user_ids`; the same maximum for `limit` of a
/// query follows client libraries, because Discord's documentation states none.
pub(super) const MAX_LISTED_MEMBERS: usize = 100;

impl MemberPlan {
    /// Selects the members of a request by Discord's rules. `user_ids` returns those members and
    /// lists the other ids in `not_found`. `query` "" with `limit` 0 returns every member. Any
    /// other query returns up to `limit` members whose username starts with it, ignoring case.
    pub(super) fn resolve(guild: &Guild, request: &RequestGuildMembers, intents: Intents) -> Self {
        let selection = if let Some(user_ids) = &request.user_ids {
            select_user_ids(guild, user_ids)
        } else if request.is_all_members() {
            select_all(guild)
        } else {
            let query = request.query.as_deref().unwrap_or("");
            select_query(guild, query, request.limit)
        };

        let nonce = request
            .nonce
            .clone()
            .filter(|nonce| nonce.len() <= RequestGuildMembers::MAX_NONCE_BYTES);
        Self {
            guild_id: guild.id,
            selection,
            presences: request.presences == Some(true)
                && intents.contains(Intents::GUILD_PRESENCES),
            nonce,
        }
    }

    /// Builds the `d` of chunk `index` from the guild as it is now (`None` if it left).
    pub(super) fn chunk(&self, guild: Option<&Guild>, index: u32) -> Box<RawValue> {
        let records = guild
            .map(|guild| self.chunk_members(guild, index))
            .unwrap_or_default();
        let presences = match guild {
            Some(guild) if self.presences => Some(guild.presences(&records)),
            None if self.presences => Some(Vec::new()),
            _ => None,
        };
        let not_found = match &self.selection {
            Selection::Listed {
                not_found: Some(not_found),
                ..
            } if index == 0 => Some(not_found.as_slice()),
            _ => None,
        };

        let payload = ChunkView {
            guild_id: self.guild_id,
            members: records
                .iter()
                .filter_map(|record| Some(guild?.member_view(record, true)))
                .collect(),
            chunk_index: index,
            chunk_count: self.chunk_count(),
            not_found,
            presences,
            nonce: self.nonce.as_deref(),
        };
        raw(&payload)
    }

    /// Returns the current members of chunk `index`.
    fn chunk_members(&self, guild: &Guild, index: u32) -> Vec<MemberRecord> {
        let members = &guild.members;
        match &self.selection {
            Selection::Ranges { bounds } => {
                let index = index as usize;
                match (bounds.get(index), bounds.get(index + 1)) {
                    (Some(&start), Some(&end)) => members
                        .live_slots(start..end)
                        .filter_map(|slot| members.get(slot))
                        .collect(),
                    _ => Vec::new(),
                }
            }
            Selection::Listed { slots, .. } if index == 0 => {
                slots.iter().filter_map(|slot| members.get(*slot)).collect()
            }
            Selection::Listed { .. } => Vec::new(),
        }
    }
}

/// Splits the slots into ranges of [`CHUNK_SIZE`] current members each.
fn select_all(guild: &Guild) -> Selection {
    let members = &guild.members;
    let mut bounds = vec![0];
    let mut start = 0;
    loop {
        let end = members.advance(start, CHUNK_SIZE);
        bounds.push(end);
        if end >= members.slot_end() {
            return Selection::Ranges { bounds };
        }
        start = end;
    }
}

/// Selects up to `limit` members whose username starts with `query`, ignoring case.
fn select_query(guild: &Guild, query: &str, limit: u32) -> Selection {
    let limit = match limit as usize {
        0 => MAX_LISTED_MEMBERS,
        limit => limit.min(MAX_LISTED_MEMBERS),
    };
    let prefix = query.to_lowercase();
    let members = &guild.members;
    let slots = members
        .live_slots(0..members.slot_end())
        .filter(|slot| members.username(*slot).starts_with(&prefix))
        .take(limit)
        .collect();
    Selection::Listed {
        slots,
        not_found: None,
    }
}

/// Selects the members with these user ids (the first [`MAX_LISTED_MEMBERS`] distinct ids) and
/// lists the ids of non-members as `not_found`.
fn select_user_ids(guild: &Guild, user_ids: &[Snowflake]) -> Selection {
    let mut requested: Vec<Snowflake> = Vec::new();
    for id in user_ids {
        if !requested.contains(id) {
            requested.push(*id);
        }
    }
    requested.truncate(MAX_LISTED_MEMBERS);

    let mut slots = Vec::new();
    let mut not_found = Vec::new();
    for id in requested {
        match guild.members.slot_of(id) {
            Some(slot) => slots.push(slot),
            None => not_found.push(id),
        }
    }
    Selection::Listed {
        slots,
        not_found: Some(not_found),
    }
}

/// The `d` of GUILD_MEMBERS_CHUNK.
#[derive(Serialize)]
struct ChunkView<'a> {
    guild_id: Snowflake,
    members: Vec<MemberView<'a>>,
    chunk_index: u32,
    chunk_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    not_found: Option<&'a [Snowflake]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presences: Option<Vec<Presence>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nonce: Option<&'a str>,
}
