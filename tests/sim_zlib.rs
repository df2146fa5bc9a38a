//! Transport compression `zlib-stream`: binary messages, one zlib context per connection.

mod common;

use actors::gateway::{Intents, ServerPayload};
use common::{start, test_config, End, GatewayClient};
use shardvisor::sim::{Fault, Target};

/// Returns `true` if the bytes open a zlib stream: a deflate CMF byte and a header checksum that
/// divides by 31 (RFC 1950).
fn is_zlib_header(head: &[u8]) -> bool {
    match head {
        [cmf, flg, ..] => cmf & 0x0f == 8 && (u16::from(*cmf) * 256 + u16::from(*flg)) % 31 == 0,
        _ => false,
    }
}

#[tokio::test]
async fn compressed_session_uses_one_context() {
    let sim = start(test_config()).await;
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect_compressed(sim.gateway_url()).await;

    let (ready, guild_creates) = client.start_session(&token, 0, 1, Intents::ALL).await;
    client.heartbeat().await;
    client
        .wait_payload("op 11", |payload| {
            matches!(payload, ServerPayload::HeartbeatAck)
        })
        .await;
    let guild = guild_creates
        .iter()
        .max_by_key(|dispatch| common::data_field_u64(dispatch, "member_count"))
        .and_then(|dispatch| common::data_field_u64(dispatch, "id"))
        .expect("shard 0 has guilds");
    client.send(&common::all_members(guild, "zlib")).await;
    client
        .collect_until("the last chunk", |dispatch| {
            dispatch.event == "GUILD_MEMBERS_CHUNK" && {
                let header = common::chunk_header(dispatch);
                header.chunk_index + 1 == header.chunk_count
            }
        })
        .await;

    assert_eq!(
        guild_creates.len(),
        ready.guilds.len(),
        "every GUILD_CREATE inflated"
    );
    assert_eq!(
        client.text_messages, 0,
        "a zlib-stream connection sends binary messages only"
    );
    assert!(
        client
            .binary_heads
            .first()
            .is_some_and(|head| is_zlib_header(head)),
        "the first message opens the zlib stream: {:?}",
        client.binary_heads.first()
    );
    let restarts = client
        .binary_heads
        .iter()
        .skip(1)
        .filter(|head| is_zlib_header(head))
        .count();
    assert_eq!(restarts, 0, "later messages continue the one zlib context");
    let report = sim.report();
    assert!(
        report.connections[0].compressed,
        "the report marks the connection compressed"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn compressed_resume_uses_new_context() {
    let sim = start(test_config()).await;
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect_compressed(sim.gateway_url()).await;
    let (ready, _) = client.start_session(&token, 0, 1, Intents::GUILDS).await;

    sim.inject(Target::All, Fault::Drop);
    assert_eq!(
        client.wait_end().await,
        End::Dropped,
        "Drop sends no close frame"
    );

    let mut resumed = GatewayClient::connect_compressed(sim.resume_url()).await;
    resumed.hello().await;
    resumed
        .resume(&token, &ready.session_id, client.last_seq.unwrap_or(0))
        .await;
    resumed.wait_dispatch("RESUMED").await;

    assert!(
        resumed
            .binary_heads
            .first()
            .is_some_and(|head| is_zlib_header(head)),
        "a new connection opens a new zlib stream: {:?}",
        resumed.binary_heads.first()
    );
    assert_eq!(
        resumed.text_messages, 0,
        "the resumed connection is compressed too"
    );
    sim.shutdown().await;
}
