//! Dispatch parsing: each cached event becomes the row writes it implies, in order, or the reason
//! it cannot be stored. Nothing here touches the database.
//!
//! The cached events and how each changes the cache are those of the in-memory store
//! (`adapters::memory`), so both stores hold the same rows for the same stream.

use actors::gateway::Snowflake;
use serde_json::value::RawValue;

use super::jsonb::storable_json;
use super::payload::{
    keyed_rows, object_from_fields, optional_bool, parse, parse_item, presence_rows, required_id,
    take_list, thread_rows, ChannelKey, ChunkPayload, EmojisPayload, Fields, GuildDeletePayload,
    IdKey, MemberKey, PresencePayload, RoleDeletePayload, RolePayload, ThreadKey,
    ThreadListSyncPayload, ThreadRow, UserKey, VoiceKey,
};
use super::schema::Table;

/// One stored object as JSON text, already checked by [`storable_json`].
pub(crate) type Json = Box<str>;

/// A row write. Ids are `int8` values, as stored.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Op {
    /// Stores the guild object, replacing the stored one.
    PutGuild { guild: i64, object: Json },
    /// Sets the top-level fields of the guild object, or stores them as the guild object.
    MergeGuild { guild: i64, fields: Json },
    /// Removes the guild object and every row of the guild in every table.
    RemoveGuild { guild: i64 },
    /// Stores a row of a table, replacing the stored one. `parent` is a thread's channel.
    Put {
        table: Table,
        guild: i64,
        id: i64,
        parent: Option<i64>,
        row: Json,
    },
    /// Sets the top-level fields of a member, or stores them as the member.
    MergeMember { guild: i64, user: i64, fields: Json },
    /// Removes one row of a table.
    Remove { table: Table, guild: i64, id: i64 },
    /// Removes every row of the guild in one table.
    Clear { table: Table, guild: i64 },
    /// Removes the guild's threads whose parent is one of `parents`.
    ClearThreads { guild: i64, parents: Vec<i64> },
}

/// The change a dispatch makes to the set of cached guilds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GuildEffect {
    None,
    /// GUILD_CREATE: the guild is cached, and new if it was not.
    Create(u64),
    /// GUILD_UPDATE: the guild is cached, never counted as new.
    Update(u64),
    /// GUILD_DELETE of a guild the bot left: the guild is no longer cached.
    Delete(u64),
}

/// A parsed dispatch.
#[derive(Debug)]
pub(crate) struct Dispatch {
    pub effect: GuildEffect,
    pub ops: Vec<Op>,
}

impl Dispatch {
    fn ignored() -> Self {
        Self {
            effect: GuildEffect::None,
            ops: Vec::new(),
        }
    }

    fn guild_change(ops: Vec<Op>) -> Self {
        Self {
            effect: GuildEffect::None,
            ops,
        }
    }
}

/// Events whose payload is the guild object, so the guild id is its `id` field.
const GUILD_OBJECT_EVENTS: [&str; 3] = ["GUILD_CREATE", "GUILD_UPDATE", "GUILD_DELETE"];

/// Events the cache stores. Every other event is accepted and ignored without reading it.
const CACHED_EVENTS: [&str; 21] = [
    "GUILD_CREATE",
    "GUILD_UPDATE",
    "GUILD_DELETE",
    "GUILD_ROLE_CREATE",
    "GUILD_ROLE_UPDATE",
    "GUILD_ROLE_DELETE",
    "CHANNEL_CREATE",
    "CHANNEL_UPDATE",
    "CHANNEL_DELETE",
    "THREAD_CREATE",
    "THREAD_UPDATE",
    "THREAD_DELETE",
    "THREAD_LIST_SYNC",
    "GUILD_EMOJIS_UPDATE",
    "GUILD_MEMBER_ADD",
    "GUILD_MEMBER_UPDATE",
    "GUILD_MEMBER_REMOVE",
    "GUILD_BAN_ADD",
    "GUILD_MEMBERS_CHUNK",
    "PRESENCE_UPDATE",
    "VOICE_STATE_UPDATE",
];

/// Parses and checks a dispatch. The error is the reason the payload cannot be stored, with the
/// path of the offending field where there is one.
pub(crate) fn parse_dispatch(event: &str, data: &RawValue) -> Result<Dispatch, String> {
    if !CACHED_EVENTS.contains(&event) {
        return Ok(Dispatch::ignored());
    }

    // One pass over the whole payload makes every part of it storable, so the rows cut from it
    // below need no further checks.
    let json = storable_json(data.get())?;
    let json = json.as_ref();

    match event {
        "GUILD_CREATE" => parse_guild_create(json),
        "GUILD_UPDATE" => parse_guild_update(json),
        "GUILD_DELETE" => parse_guild_delete(json),
        "GUILD_ROLE_CREATE" | "GUILD_ROLE_UPDATE" => {
            let payload: RolePayload = parse(json)?;
            let id = parse_item::<IdKey>("role", None, payload.role)?.id;
            Ok(Dispatch::guild_change(vec![Op::Put {
                table: Table::Roles,
                guild: db_id(payload.guild_id)?,
                id: db_id(id)?,
                parent: None,
                row: payload.role.get().into(),
            }]))
        }
        "GUILD_ROLE_DELETE" => {
            let payload: RoleDeletePayload = parse(json)?;
            Ok(Dispatch::guild_change(vec![Op::Remove {
                table: Table::Roles,
                guild: db_id(payload.guild_id)?,
                id: db_id(payload.role_id)?,
            }]))
        }
        "CHANNEL_CREATE" | "CHANNEL_UPDATE" | "CHANNEL_DELETE" => parse_channel(event, json),
        "THREAD_CREATE" | "THREAD_UPDATE" | "THREAD_DELETE" => parse_thread(event, json),
        "THREAD_LIST_SYNC" => parse_thread_list_sync(json),
        "GUILD_EMOJIS_UPDATE" => {
            let payload: EmojisPayload = parse(json)?;
            let guild = db_id(payload.guild_id)?;
            let mut ops = vec![Op::Clear {
                table: Table::Emojis,
                guild,
            }];
            let emojis = keyed_rows("emojis", payload.emojis, |key: IdKey| key.id)?;
            ops.extend(puts(Table::Emojis, guild, emojis));
            Ok(Dispatch::guild_change(ops))
        }
        "GUILD_MEMBER_ADD" | "GUILD_MEMBER_UPDATE" | "GUILD_MEMBER_REMOVE" | "GUILD_BAN_ADD" => {
            parse_member_event(event, json)
        }
        "GUILD_MEMBERS_CHUNK" => parse_members_chunk(json),
        "PRESENCE_UPDATE" => {
            let payload: PresencePayload = parse(json)?;
            let guild = db_id(payload.guild_id)?;
            let user = db_id(payload.user.id)?;
            let row = payload.status.is_online().then(|| json.into());
            Ok(Dispatch::guild_change(vec![put_or_remove(
                Table::Presences,
                guild,
                user,
                row,
            )]))
        }
        "VOICE_STATE_UPDATE" => parse_voice_state_update(json),
        _ => Ok(Dispatch::ignored()),
    }
}

/// Returns the guild id of a payload that failed to parse, if its guild id field is readable.
pub(crate) fn guild_hint(event: &str, data: &RawValue) -> Option<u64> {
    let field = if GUILD_OBJECT_EVENTS.contains(&event) {
        "id"
    } else {
        "guild_id"
    };
    let fields: Fields = serde_json::from_str(data.get()).ok()?;
    let id: Snowflake = serde_json::from_str(fields.get(field)?.get()).ok()?;
    Some(id.get())
}

/// Converts a Discord id to the `int8` it is stored as. Discord ids are below 2^63.
pub(crate) fn db_id(id: Snowflake) -> Result<i64, String> {
    i64::try_from(id.get()).map_err(|_| format!("id {id} is out of the range of int8"))
}

fn parse_guild_create(json: &str) -> Result<Dispatch, String> {
    let mut fields: Fields = parse(json)?;
    let guild_id = required_id(&fields, "id")?;

    // Discord sends an unavailable guild as `{"id", "unavailable": true}` with no contents.
    if optional_bool(&fields, "unavailable")? {
        tracing::debug!(
            guild_id = guild_id.get(),
            "unavailable GUILD_CREATE ignored"
        );
        return Ok(Dispatch::ignored());
    }
    let guild = db_id(guild_id)?;
    let mut ops = Vec::new();

    // Roles, channels, threads, emojis and voice states replace the stored ones. Members and
    // presences are merged instead, because the GUILD_CREATE of a large guild carries only a
    // few of them.
    for (field, table) in [
        ("roles", Table::Roles),
        ("channels", Table::Channels),
        ("emojis", Table::Emojis),
    ] {
        if let Some(items) = take_list(&mut fields, field)? {
            let rows = keyed_rows(field, items, |key: IdKey| key.id)?;
            ops.push(Op::Clear { table, guild });
            ops.extend(puts(table, guild, rows));
        }
    }
    if let Some(items) = take_list(&mut fields, "threads")? {
        let threads = thread_rows("threads", items)?;
        ops.push(Op::Clear {
            table: Table::Threads,
            guild,
        });
        ops.extend(thread_puts(guild, threads));
    }
    if let Some(items) = take_list(&mut fields, "voice_states")? {
        let states = keyed_rows("voice_states", items, |key: VoiceKey| key.user_id)?;
        ops.push(Op::Clear {
            table: Table::VoiceStates,
            guild,
        });
        ops.extend(puts(Table::VoiceStates, guild, states));
    }
    if let Some(items) = take_list(&mut fields, "members")? {
        let members = keyed_rows("members", items, |key: UserKey| key.user.id)?;
        ops.extend(puts(Table::Members, guild, members));
    }
    if let Some(items) = take_list(&mut fields, "presences")? {
        let presences = presence_rows("presences", items)?;
        ops.extend(presence_ops(guild, presences));
    }

    let object = object_from_fields(fields.iter().map(|(key, value)| (key.as_str(), *value)));
    ops.insert(0, Op::PutGuild { guild, object });
    Ok(Dispatch {
        effect: GuildEffect::Create(guild_id.get()),
        ops,
    })
}

fn parse_guild_update(json: &str) -> Result<Dispatch, String> {
    let mut fields: Fields = parse(json)?;
    let guild_id = required_id(&fields, "id")?;
    let guild = db_id(guild_id)?;
    let mut ops = Vec::new();

    for (field, table) in [("roles", Table::Roles), ("emojis", Table::Emojis)] {
        if let Some(items) = take_list(&mut fields, field)? {
            let rows = keyed_rows(field, items, |key: IdKey| key.id)?;
            ops.push(Op::Clear { table, guild });
            ops.extend(puts(table, guild, rows));
        }
    }

    let fields = object_from_fields(fields.iter().map(|(key, value)| (key.as_str(), *value)));
    ops.insert(0, Op::MergeGuild { guild, fields });
    Ok(Dispatch {
        effect: GuildEffect::Update(guild_id.get()),
        ops,
    })
}

fn parse_guild_delete(json: &str) -> Result<Dispatch, String> {
    let payload: GuildDeletePayload = parse(json)?;
    let guild_id = payload.id;

    // `unavailable: true` is an outage: the guild comes back with a GUILD_CREATE, and its
    // cache is still valid until then. Without it the bot left or was removed.
    if payload.unavailable == Some(true) {
        tracing::debug!(guild_id = guild_id.get(), "guild unavailable, cache kept");
        return Ok(Dispatch::ignored());
    }
    Ok(Dispatch {
        effect: GuildEffect::Delete(guild_id.get()),
        ops: vec![Op::RemoveGuild {
            guild: db_id(guild_id)?,
        }],
    })
}

/// Parses CHANNEL_CREATE, CHANNEL_UPDATE and CHANNEL_DELETE. A channel without `guild_id` is a
/// DM channel, which the cache does not keep. Deleting a channel deletes its threads.
fn parse_channel(event: &str, json: &str) -> Result<Dispatch, String> {
    let payload: ChannelKey = parse(json)?;
    let Some(guild_id) = payload.guild_id else {
        return Ok(Dispatch::ignored());
    };
    let guild = db_id(guild_id)?;
    let id = db_id(payload.id)?;

    let ops = if event == "CHANNEL_DELETE" {
        vec![
            Op::Remove {
                table: Table::Channels,
                guild,
                id,
            },
            Op::ClearThreads {
                guild,
                parents: vec![id],
            },
        ]
    } else {
        vec![Op::Put {
            table: Table::Channels,
            guild,
            id,
            parent: None,
            row: json.into(),
        }]
    };
    Ok(Dispatch::guild_change(ops))
}

fn parse_thread(event: &str, json: &str) -> Result<Dispatch, String> {
    let payload: ThreadKey = parse(json)?;
    let guild = db_id(payload.guild_id)?;
    let id = db_id(payload.id)?;

    let op = if event == "THREAD_DELETE" {
        Op::Remove {
            table: Table::Threads,
            guild,
            id,
        }
    } else {
        Op::Put {
            table: Table::Threads,
            guild,
            id,
            parent: payload.parent_id.map(db_id).transpose()?,
            row: json.into(),
        }
    };
    Ok(Dispatch::guild_change(vec![op]))
}

/// Parses THREAD_LIST_SYNC. Without `channel_ids` the list covers the whole guild. Thread
/// members (`members`) are not cached.
fn parse_thread_list_sync(json: &str) -> Result<Dispatch, String> {
    let payload: ThreadListSyncPayload = parse(json)?;
    let guild = db_id(payload.guild_id)?;
    let threads = thread_rows("threads", payload.threads)?;

    let clear = match payload.channel_ids {
        Some(ids) => Op::ClearThreads {
            guild,
            parents: ids.into_iter().map(db_id).collect::<Result<_, _>>()?,
        },
        None => Op::Clear {
            table: Table::Threads,
            guild,
        },
    };
    let mut ops = vec![clear];
    ops.extend(thread_puts(guild, threads));
    Ok(Dispatch::guild_change(ops))
}

/// Parses the member events keyed by `guild_id` and `user.id`. A ban removes the member
/// because a banned user has left the guild, and Discord sends the ban and the removal as
/// separate events. A removed member's presence is removed with it, because a user who left
/// the guild gets no more presence updates from it.
fn parse_member_event(event: &str, json: &str) -> Result<Dispatch, String> {
    let payload: MemberKey = parse(json)?;
    let guild = db_id(payload.guild_id)?;
    let user = db_id(payload.user.id)?;

    let ops = match event {
        "GUILD_MEMBER_ADD" => vec![Op::Put {
            table: Table::Members,
            guild,
            id: user,
            parent: None,
            row: json.into(),
        }],
        "GUILD_MEMBER_UPDATE" => {
            // Checked to be an object, so that the merge in SQL (`||`) sets fields.
            let _: Fields = parse(json)?;
            vec![Op::MergeMember {
                guild,
                user,
                fields: json.into(),
            }]
        }
        _ => vec![
            Op::Remove {
                table: Table::Members,
                guild,
                id: user,
            },
            Op::Remove {
                table: Table::Presences,
                guild,
                id: user,
            },
        ],
    };
    Ok(Dispatch::guild_change(ops))
}

fn parse_members_chunk(json: &str) -> Result<Dispatch, String> {
    let payload: ChunkPayload = parse(json)?;
    let guild = db_id(payload.guild_id)?;
    let members = keyed_rows("members", payload.members, |key: UserKey| key.user.id)?;
    let presences = presence_rows("presences", payload.presences.unwrap_or_default())?;

    let mut ops = Vec::with_capacity(members.len() + presences.len());
    ops.extend(puts(Table::Members, guild, members));
    ops.extend(presence_ops(guild, presences));
    Ok(Dispatch::guild_change(ops))
}

/// Parses VOICE_STATE_UPDATE. A null `channel_id` means the user left voice. A state without
/// `guild_id` belongs to a DM call, which the cache does not keep.
fn parse_voice_state_update(json: &str) -> Result<Dispatch, String> {
    let payload: VoiceKey = parse(json)?;
    let Some(guild_id) = payload.guild_id else {
        return Ok(Dispatch::ignored());
    };
    let row = payload.channel_id.map(|_| json.into());
    let op = put_or_remove(
        Table::VoiceStates,
        db_id(guild_id)?,
        db_id(payload.user_id)?,
        row,
    );
    Ok(Dispatch::guild_change(vec![op]))
}

fn puts(table: Table, guild: i64, rows: Vec<(i64, Json)>) -> impl Iterator<Item = Op> {
    rows.into_iter().map(move |(id, row)| Op::Put {
        table,
        guild,
        id,
        parent: None,
        row,
    })
}

fn thread_puts(guild: i64, threads: Vec<ThreadRow>) -> impl Iterator<Item = Op> {
    threads.into_iter().map(move |thread| Op::Put {
        table: Table::Threads,
        guild,
        id: thread.id,
        parent: thread.parent,
        row: thread.row,
    })
}

fn presence_ops(guild: i64, presences: Vec<(i64, Option<Json>)>) -> impl Iterator<Item = Op> {
    presences
        .into_iter()
        .map(move |(user, row)| put_or_remove(Table::Presences, guild, user, row))
}

/// Stores a row, or removes it for `None` (an offline presence, a user who left voice).
fn put_or_remove(table: Table, guild: i64, id: i64, row: Option<Json>) -> Op {
    match row {
        Some(row) => Op::Put {
            table,
            guild,
            id,
            parent: None,
            row,
        },
        None => Op::Remove { table, guild, id },
    }
}
