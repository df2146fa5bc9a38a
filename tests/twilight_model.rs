//! A third-party model of Discord's payloads, twilight-model 0.18, must accept every payload the
//! simulator sends: the protocol opcodes, READY, GUILD_CREATE of small and large guilds, every
//! kind of GUILD_MEMBERS_CHUNK, RATE_LIMITED, RESUMED and every kind of steady traffic.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use actors::gateway::{ClientPayload, Intents, RequestGuildMembers, ServerPayload, Snowflake};
use common::{start, test_config, GatewayClient, Received};
use serde::de::DeserializeSeed;
use shardvisor::sim::world::WorldConfig;
use shardvisor::sim::{Fault, SimConfig, Target};
use twilight_model::gateway::event::GatewayEventDeserializer;

/// Traffic events read per shard in the traffic test.
const EVENTS_PER_SHARD: u64 = 1000;

/// Every payload seen, by event name or opcode, and what twilight-model rejected.
#[derive(Default)]
struct ModelCheck {
    seen: BTreeMap<String, u64>,
    /// The first rejection of each name, with its error and the start of the payload.
    rejections: BTreeMap<String, String>,
}

impl ModelCheck {
    /// Deserializes one payload text with twilight-model's gateway event deserializer.
    fn check(&mut self, text: &str) {
        let head: String = text.chars().take(300).collect();
        let Some(deserializer) = GatewayEventDeserializer::from_json(text) else {
            self.rejections
                .entry("(no opcode)".to_owned())
                .or_insert_with(|| format!("no opcode found; payload starts {head}"));
            return;
        };
        let name = match deserializer.event_type() {
            Some(event) => event.to_owned(),
            None => format!("op {}", deserializer.op()),
        };
        let adapted;
        let text = if name == "RATE_LIMITED" {
            match tag_rate_limited_meta(text) {
                Ok(tagged) => {
                    adapted = tagged;
                    adapted.as_str()
                }
                Err(error) => {
                    self.rejections
                        .entry(name.clone())
                        .or_insert_with(|| format!("{error}; payload starts {head}"));
                    return;
                }
            }
        } else {
            text
        };
        let mut json = serde_json::Deserializer::from_str(text);
        if let Err(error) = deserializer.deserialize(&mut json) {
            self.rejections
                .entry(name.clone())
                .or_insert_with(|| format!("{error}; payload starts {head}"));
        }
        *self.seen.entry(name).or_default() += 1;
    }

    /// Reads and checks payloads until one matches `done`; returns the payloads read.
    async fn read_until(
        &mut self,
        client: &mut GatewayClient,
        expected: &str,
        mut done: impl FnMut(&ServerPayload) -> bool,
    ) -> Vec<ServerPayload> {
        let mut payloads = Vec::new();
        loop {
            match client.recv().await {
                Received::Payload { payload, text } => {
                    self.check(&text);
                    let finished = done(&payload);
                    payloads.push(payload);
                    if finished {
                        return payloads;
                    }
                }
                other => panic!("connection ended with {other:?} while waiting for {expected}"),
            }
        }
    }

    /// Fails the test with every rejection, one line per event name.
    fn assert_accepted(&self) {
        let lines: Vec<String> = self
            .rejections
            .iter()
            .map(|(name, error)| format!("{name}: {error}"))
            .collect();
        assert!(
            lines.is_empty(),
            "twilight-model rejected {} kinds of payload:\n{}",
            lines.len(),
            lines.join("\n")
        );
    }

    fn assert_seen(&self, names: &[&str]) {
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|name| !self.seen.contains_key(*name))
            .collect();
        assert!(
            missing.is_empty(),
            "payload kinds never seen: {missing:?}; seen: {:?}",
            self.seen
        );
    }
}

/// Checks that a RATE_LIMITED has Discord's `meta` shape, `{"guild_id", "nonce"}`, and returns
/// the payload with `meta` wrapped as `{"RequestGuildMembers": meta}`.
///
/// NOTE: twilight-model 0.18 declares `RateLimitMetadata` as an externally tagged enum
/// (`gateway/payload/incoming/rate_limited.rs`), so it rejects the untagged `meta` that Discord
/// sends. The wrapping lets it check every other field of the payload.
fn tag_rate_limited_meta(text: &str) -> Result<String, String> {
    let mut frame: serde_json::Value =
        serde_json::from_str(text).map_err(|error| format!("invalid JSON: {error}"))?;
    let meta = frame["d"]["meta"].take();
    if meta.get("guild_id").is_none() || meta.get("RequestGuildMembers").is_some() {
        return Err(format!("meta is not Discord's {{guild_id, nonce}}: {meta}"));
    }
    frame["d"]["meta"] = serde_json::json!({ "RequestGuildMembers": meta });
    Ok(frame.to_string())
}

fn is_dispatch(payload: &ServerPayload, event: &str) -> bool {
    matches!(payload, ServerPayload::Dispatch(dispatch) if dispatch.event == event)
}

/// Returns `true` for the last chunk of the request with this nonce.
fn is_last_chunk(payload: &ServerPayload, nonce: &str) -> bool {
    let ServerPayload::Dispatch(dispatch) = payload else {
        return false;
    };
    if dispatch.event != "GUILD_MEMBERS_CHUNK" {
        return false;
    }
    let header = common::chunk_header(dispatch);
    header.nonce.as_deref() == Some(nonce) && header.chunk_index + 1 == header.chunk_count
}

#[tokio::test]
async fn protocol_payloads_match_model() {
    let sim = start(test_config()).await;
    let token = sim.config().token.clone();
    let mut model = ModelCheck::default();
    let mut client = GatewayClient::connect(sim.gateway_url()).await;

    model
        .read_until(&mut client, "HELLO", |payload| {
            matches!(payload, ServerPayload::Hello(_))
        })
        .await;
    client.heartbeat().await;
    model
        .read_until(&mut client, "op 11", |payload| {
            matches!(payload, ServerPayload::HeartbeatAck)
        })
        .await;

    client.identify(&token, 0, 1, Intents::ALL).await;
    let ready = model
        .read_until(&mut client, "READY", |payload| {
            is_dispatch(payload, "READY")
        })
        .await;
    let Some(ServerPayload::Dispatch(ready)) = ready.last() else {
        unreachable!("read_until stops at READY")
    };
    let guild_count = common::data_json(ready)["guilds"]
        .as_array()
        .map_or(0, Vec::len);
    let mut guilds = Vec::new();
    model
        .read_until(&mut client, "every GUILD_CREATE", |payload| {
            if let ServerPayload::Dispatch(dispatch) = payload {
                if dispatch.event == "GUILD_CREATE" {
                    let id = common::data_field_u64(dispatch, "id").unwrap_or(0);
                    let members = common::data_field_u64(dispatch, "member_count").unwrap_or(0);
                    guilds.push((members, id));
                }
            }
            guilds.len() == guild_count
        })
        .await;
    guilds.sort_unstable();
    let (largest_members, largest) = guilds[guilds.len() - 1];
    let (_, second_largest) = guilds[guilds.len() - 2];
    assert!(largest_members > 250, "the world needs a large guild");
    assert!(guilds[0].0 <= 50, "the world needs a small guild");

    sim.inject(Target::All, Fault::RequestHeartbeat);
    model
        .read_until(&mut client, "op 1", |payload| {
            matches!(payload, ServerPayload::Heartbeat)
        })
        .await;
    sim.inject(Target::All, Fault::Reconnect);
    model
        .read_until(&mut client, "op 7", |payload| {
            matches!(payload, ServerPayload::Reconnect)
        })
        .await;
    sim.inject(Target::All, Fault::InvalidSession { resumable: true });
    model
        .read_until(&mut client, "op 9 true", |payload| {
            matches!(payload, ServerPayload::InvalidSession { .. })
        })
        .await;

    client.send(&common::all_members(largest, "all")).await;
    let chunks = model
        .read_until(&mut client, "the chunks of every member", |payload| {
            is_last_chunk(payload, "all")
        })
        .await;
    let known: Vec<Snowflake> = chunks
        .iter()
        .find_map(|payload| match payload {
            ServerPayload::Dispatch(dispatch) if dispatch.event == "GUILD_MEMBERS_CHUNK" => {
                let data = common::data_json(dispatch);
                let ids = data["members"].as_array().map(|members| {
                    members
                        .iter()
                        .take(2)
                        .filter_map(|member| member["user"]["id"].as_str()?.parse().ok())
                        .map(Snowflake)
                        .collect::<Vec<_>>()
                });
                ids
            }
            _ => None,
        })
        .expect("the chunks list members");

    let by_ids = RequestGuildMembers {
        guild_id: Snowflake(largest),
        query: None,
        limit: 0,
        presences: Some(true),
        user_ids: Some(vec![known[0], Snowflake(175_928_847_299_117_063), known[1]]),
        nonce: Some("ids".to_owned()),
    };
    client
        .send(&ClientPayload::RequestGuildMembers(by_ids))
        .await;
    model
        .read_until(&mut client, "the chunk by user ids", |payload| {
            is_last_chunk(payload, "ids")
        })
        .await;

    let mut with_presences =
        RequestGuildMembers::all_members(Snowflake(second_largest), Some("presences".into()));
    with_presences.presences = Some(true);
    client
        .send(&ClientPayload::RequestGuildMembers(with_presences))
        .await;
    model
        .read_until(&mut client, "the chunks with presences", |payload| {
            is_last_chunk(payload, "presences")
        })
        .await;

    let by_query = RequestGuildMembers {
        guild_id: Snowflake(largest),
        query: Some("a".to_owned()),
        limit: 10,
        presences: None,
        user_ids: None,
        nonce: Some("query".to_owned()),
    };
    client
        .send(&ClientPayload::RequestGuildMembers(by_query))
        .await;
    model
        .read_until(&mut client, "the chunk by query", |payload| {
            is_last_chunk(payload, "query")
        })
        .await;

    client.send(&common::all_members(largest, "again")).await;
    model
        .read_until(&mut client, "RATE_LIMITED", |payload| {
            is_dispatch(payload, "RATE_LIMITED")
        })
        .await;

    let session_id = common::data_json(ready)["session_id"]
        .as_str()
        .expect("READY session_id")
        .to_owned();
    client.close(4900).await;
    let mut resumed = GatewayClient::connect(sim.resume_url()).await;
    model
        .read_until(&mut resumed, "HELLO", |payload| {
            matches!(payload, ServerPayload::Hello(_))
        })
        .await;
    resumed
        .resume(&token, &session_id, client.last_seq.unwrap_or(0))
        .await;
    model
        .read_until(&mut resumed, "RESUMED", |payload| {
            is_dispatch(payload, "RESUMED")
        })
        .await;
    sim.inject(Target::All, Fault::InvalidSession { resumable: false });
    model
        .read_until(&mut resumed, "op 9 false", |payload| {
            matches!(payload, ServerPayload::InvalidSession { .. })
        })
        .await;

    model.assert_accepted();
    model.assert_seen(&[
        "op 1",
        "op 7",
        "op 9",
        "op 10",
        "op 11",
        "READY",
        "GUILD_CREATE",
        "GUILD_MEMBERS_CHUNK",
        "RATE_LIMITED",
        "RESUMED",
    ]);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_payloads_match_model() {
    let shards = 4;
    let config = SimConfig {
        shards,
        max_concurrency: shards,
        dispatch_rate: 1000.0,
        world: WorldConfig {
            guilds: 200,
            ..test_config().world
        },
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();
    let mut model = ModelCheck::default();
    let mut clients = Vec::new();
    for shard in 0..shards {
        let mut client = GatewayClient::connect(sim.gateway_url()).await;
        client.hello().await;
        client.identify(&token, shard, shards, Intents::ALL).await;
        clients.push(client);
    }

    for client in &mut clients {
        let mut first_traffic = None;
        model
            .read_until(client, "the traffic events", |payload| {
                let ServerPayload::Dispatch(dispatch) = payload else {
                    return false;
                };
                if dispatch.event == "READY" {
                    let guilds = common::data_json(dispatch)["guilds"]
                        .as_array()
                        .map_or(0, Vec::len) as u64;
                    first_traffic = Some(dispatch.seq + guilds + 1);
                }
                first_traffic.is_some_and(|first| dispatch.seq + 1 >= first + EVENTS_PER_SHARD)
            })
            .await;
    }

    model.assert_accepted();
    let traffic_kinds = [
        "MESSAGE_CREATE",
        "PRESENCE_UPDATE",
        "GUILD_MEMBER_ADD",
        "GUILD_MEMBER_UPDATE",
        "GUILD_MEMBER_REMOVE",
        "GUILD_ROLE_CREATE",
        "GUILD_ROLE_UPDATE",
        "GUILD_ROLE_DELETE",
        "CHANNEL_CREATE",
        "CHANNEL_UPDATE",
        "CHANNEL_DELETE",
        "GUILD_UPDATE",
        "GUILD_CREATE",
        "GUILD_DELETE",
    ];
    model.assert_seen(&traffic_kinds);
    let unexpected: BTreeSet<&String> = model
        .seen
        .keys()
        .filter(|name| !traffic_kinds.contains(&name.as_str()) && name.as_str() != "READY")
        .collect();
    assert!(
        unexpected.is_empty(),
        "unexpected payload kinds: {unexpected:?}"
    );
    sim.shutdown().await;
}
