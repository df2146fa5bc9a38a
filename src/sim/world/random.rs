//! Seeded randomness of the world: the generator type, a hash for values derived from ids, the
//! guild size distribution and the word lists behind every generated name.

use rand::rngs::Xoshiro256PlusPlus;
use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};

/// The generator of every random choice. rand 0.10 lists Xoshiro256++ among its portable,
/// reproducible generators, unlike `SmallRng`, whose algorithm may change.
pub(super) type Generator = Xoshiro256PlusPlus;

/// Unix time of the simulated "now" in milliseconds (2025-06-01T00:00:00Z). Generated objects
/// are older, and the traffic clock starts here.
pub(super) const WORLD_NOW_MS: u64 = 1_748_736_000_000;

/// Unix time in milliseconds of Discord's public launch (2015-05-13), the oldest user account.
pub(super) const DISCORD_LAUNCH_MS: u64 = 1_431_475_200_000;

/// Creation times of generated guilds span 2016-01-01 to 2025-01-01 (Unix milliseconds).
pub(super) const GUILD_CREATED_MS: std::ops::Range<u64> = 1_451_606_400_000..1_735_689_600_000;

/// Unix time in milliseconds of the bot account's creation (2017-01-01): the bot joined no guild
/// before it.
pub(super) const BOT_CREATED_MS: u64 = 1_483_228_800_000;

/// Minimum member count of a generated guild: a guild with the bot has the owner and the bot.
pub(super) const MIN_GUILD_SIZE: u32 = 2;

/// Scale of the Pareto distribution of guild sizes, in members.
const SIZE_SCALE: f64 = 5.0;

/// Shape of the Pareto distribution of guild sizes. With the scale of 5 the median guild has 14
/// members, 14 % have more than 100, 0.7 % more than 10,000, and about 1 in 1,300 exceeds
/// 300,000 (and is clamped to the largest size).
const SIZE_SHAPE: f64 = 0.65;

/// Creates a generator from a seed and a stream number, so that independent parts of the world
/// (each guild, each shard's traffic) draw from independent sequences.
pub(super) fn generator(seed: u64, stream: u64) -> Generator {
    Generator::seed_from_u64(mix(seed, stream))
}

/// Hashes two values into one with the SplitMix64 finalizer: equal inputs give equal outputs,
/// and every input bit affects every output bit.
pub(super) fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(31);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Maps a hash to a uniform value in `[0, 1)`.
pub(super) fn unit(hash: u64) -> f64 {
    (hash >> 11) as f64 / (1_u64 << 53) as f64
}

/// Draws a guild member count from a Pareto distribution, clamped to `[MIN_GUILD_SIZE, largest]`.
/// The heavy tail gives the shape of a large bot's guild list: mostly small friend groups, and a
/// few community guilds with most of the members. The parameters are chosen for that shape, not
/// fitted to measured data.
pub(super) fn guild_size(rng: &mut Generator, largest: u32) -> u32 {
    let uniform: f64 = 1.0 - rng.random::<f64>();
    let size = SIZE_SCALE / uniform.powf(1.0 / SIZE_SHAPE);
    let largest = largest.max(MIN_GUILD_SIZE);
    if size >= f64::from(largest) {
        largest
    } else {
        (size as u32).max(MIN_GUILD_SIZE)
    }
}

const ADJECTIVES: &[&str] = &[
    "amber", "ancient", "arctic", "bold", "brave", "bright", "calm", "clever", "cosmic", "cozy",
    "crimson", "crystal", "dark", "dizzy", "electric", "fancy", "fierce", "frozen", "fuzzy",
    "gentle", "golden", "happy", "hidden", "hollow", "icy", "jolly", "lazy", "little", "lucky",
    "lunar", "mellow", "misty", "neon", "noble", "odd", "pale", "pixel", "proud", "quiet", "rapid",
    "rusty", "salty", "shiny", "silent", "silver", "sleepy", "sly", "solar", "spicy", "stormy",
    "sunny", "swift", "tiny", "velvet", "wild", "windy", "wise", "witty", "young", "zesty",
];

const NOUNS: &[&str] = &[
    "badger", "bear", "bee", "comet", "coyote", "crow", "dragon", "eagle", "falcon", "ferret",
    "fox", "frog", "gecko", "ghost", "goose", "hawk", "hedgehog", "heron", "koala", "lemur",
    "lion", "llama", "lynx", "moth", "otter", "owl", "panda", "panther", "parrot", "penguin",
    "phoenix", "pigeon", "puffin", "rabbit", "raven", "robin", "salmon", "seal", "shark", "sloth",
    "snail", "sparrow", "spider", "squid", "swan", "tiger", "toad", "turtle", "viper", "walrus",
    "whale", "wolf", "wombat", "yak", "zebra", "cobra", "nebula", "pebble", "pine", "river",
];

const GUILD_TOPICS: &[&str] = &[
    "Gaming",
    "Anime",
    "Study",
    "Music",
    "Art",
    "Coding",
    "Minecraft",
    "Valorant",
    "Memes",
    "Book Club",
    "Fitness",
    "Crypto",
    "Movie Night",
    "Roleplay",
    "Esports",
    "Photography",
    "Cooking",
    "Language Exchange",
    "Pokemon",
    "Homework Help",
];

const GUILD_PLACES: &[&str] = &[
    "Hangout",
    "Lounge",
    "Den",
    "Hub",
    "Club",
    "Community",
    "Corner",
    "Cafe",
    "Squad",
    "Guild",
    "Academy",
    "Tavern",
    "Collective",
    "Society",
    "Crew",
    "Garden",
];

const TEXT_CHANNELS: &[&str] = &[
    "off-topic",
    "memes",
    "media",
    "bot-commands",
    "introductions",
    "art",
    "music",
    "gaming",
    "help",
    "suggestions",
    "events",
    "clips",
    "pets",
    "food",
    "selfies",
    "resources",
    "showcase",
    "looking-for-group",
    "giveaways",
    "feedback",
    "questions",
    "news",
    "lore",
];

const VOICE_CHANNELS: &[&str] = &[
    "General",
    "Lounge",
    "Gaming",
    "Music",
    "Study Room",
    "Chill",
    "AFK",
    "Hangout",
    "Squad",
    "Movie Night",
    "Duo",
    "Trio",
    "Quiet Room",
];

const CATEGORIES: &[&str] = &[
    "Information",
    "Text Channels",
    "Voice Channels",
    "Community",
    "Gaming",
    "Events",
    "Archive",
    "Support",
    "Media",
    "Off Topic",
];

const ROLE_NAMES: &[&str] = &[
    "Member",
    "Verified",
    "VIP",
    "Artist",
    "Gamer",
    "Musician",
    "Helper",
    "Events",
    "Announcements",
    "Red",
    "Blue",
    "Green",
    "Purple",
    "Yellow",
    "Level 5",
    "Level 10",
    "Level 25",
    "Level 50",
    "Streamer",
    "Developer",
    "Veteran",
    "Newcomer",
    "Trusted",
    "Muted",
    "He/Him",
    "She/Her",
    "They/Them",
    "Europe",
    "North America",
    "Asia",
    "Oceania",
];

const ACTIVITY_GAMES: &[&str] = &[
    "Minecraft",
    "League of Legends",
    "Valorant",
    "Fortnite",
    "Counter-Strike 2",
    "Roblox",
    "Genshin Impact",
    "Apex Legends",
    "Overwatch 2",
    "Rocket League",
    "Stardew Valley",
    "Terraria",
    "Elden Ring",
    "Visual Studio Code",
    "osu!",
];

const MESSAGE_WORDS: &[&str] = &[
    "the", "a", "is", "this", "that", "lol", "yeah", "no", "anyone", "want", "to", "play",
    "tonight", "just", "got", "new", "game", "server", "nice", "what", "time", "today", "i",
    "think", "we", "should", "try", "again", "later", "cool", "thanks", "help", "me", "with",
    "homework", "music", "listen", "stream", "watch", "build", "it", "works", "now", "gg",
];

/// Picks one entry of a non-empty word list.
pub(super) fn pick<'a>(rng: &mut Generator, words: &[&'a str]) -> &'a str {
    words.choose(rng).copied().unwrap_or_default()
}

/// Builds a username in Discord's current format: 2 to 32 lowercase letters, digits, `_` and `.`.
pub(super) fn username(rng: &mut Generator) -> String {
    let adjective = pick(rng, ADJECTIVES);
    let noun = pick(rng, NOUNS);
    match rng.random_range(0..4) {
        0 => format!("{adjective}{noun}"),
        1 => format!("{adjective}{noun}{}", rng.random_range(1..10_000)),
        2 => format!("{noun}_{adjective}"),
        _ => format!("{adjective}.{noun}{}", rng.random_range(1..100)),
    }
}

/// Builds a display name ("global name"), which unlike a username may have capitals and spaces.
pub(super) fn display_name(rng: &mut Generator) -> String {
    let adjective = capitalize(pick(rng, ADJECTIVES));
    let noun = capitalize(pick(rng, NOUNS));
    format!("{adjective} {noun}")
}

/// Builds a guild name such as "Cozy Gaming Den".
pub(super) fn guild_name(rng: &mut Generator) -> String {
    let adjective = capitalize(pick(rng, ADJECTIVES));
    let topic = pick(rng, GUILD_TOPICS);
    let place = pick(rng, GUILD_PLACES);
    format!("{adjective} {topic} {place}")
}

/// Builds a text channel name (lowercase, dashes).
pub(super) fn text_channel_name(rng: &mut Generator) -> String {
    pick(rng, TEXT_CHANNELS).to_owned()
}

/// Builds `count` different text channel names.
pub(super) fn text_channel_names(rng: &mut Generator, count: usize) -> Vec<String> {
    distinct(rng, TEXT_CHANNELS, count, "-")
}

/// Builds a voice channel name.
pub(super) fn voice_channel_name(rng: &mut Generator) -> String {
    pick(rng, VOICE_CHANNELS).to_owned()
}

/// Builds `count` different voice channel names.
pub(super) fn voice_channel_names(rng: &mut Generator, count: usize) -> Vec<String> {
    distinct(rng, VOICE_CHANNELS, count, " ")
}

/// Builds `count` different category names.
pub(super) fn category_names(rng: &mut Generator, count: usize) -> Vec<String> {
    distinct(rng, CATEGORIES, count, " ")
}

/// Builds a role name.
pub(super) fn role_name(rng: &mut Generator) -> String {
    pick(rng, ROLE_NAMES).to_owned()
}

/// Builds `count` different role names.
pub(super) fn role_names(rng: &mut Generator, count: usize) -> Vec<String> {
    distinct(rng, ROLE_NAMES, count, " ")
}

/// Builds a thread name.
pub(super) fn thread_name(rng: &mut Generator) -> String {
    let noun = pick(rng, NOUNS);
    match rng.random_range(0..3) {
        0 => format!("{noun} screenshots"),
        1 => format!("help with {noun}"),
        _ => format!("weekly {} {noun} thread", pick(rng, ADJECTIVES)),
    }
}

/// Draws `count` different entries of a word list; past the list's length, numbered variants
/// ("clips-2") follow.
fn distinct(rng: &mut Generator, words: &[&str], count: usize, separator: &str) -> Vec<String> {
    let mut names: Vec<String> = words
        .sample(rng, count.min(words.len()))
        .map(|word| (*word).to_owned())
        .collect();
    let mut number = 2;
    while names.len() < count {
        names.push(format!("{}{separator}{number}", pick(rng, words)));
        number += 1;
    }
    names
}

/// Builds a custom emoji name: 2 to 32 letters, digits and underscores.
pub(super) fn emoji_name(rng: &mut Generator) -> String {
    format!("{}_{}", pick(rng, ADJECTIVES), pick(rng, NOUNS))
}

/// Picks the name of a game for a "Playing" activity.
pub(super) fn game_name(rng: &mut Generator) -> &'static str {
    pick(rng, ACTIVITY_GAMES)
}

/// Builds a chat message of 2 to 20 words.
pub(super) fn message_text(rng: &mut Generator) -> String {
    let words = rng.random_range(2..=20);
    let mut text = String::new();
    for position in 0..words {
        if position > 0 {
            text.push(' ');
        }
        text.push_str(pick(rng, MESSAGE_WORDS));
    }
    text
}

/// Builds a channel topic.
pub(super) fn topic(rng: &mut Generator) -> String {
    format!(
        "Talk about {} things and {}s",
        pick(rng, ADJECTIVES),
        pick(rng, NOUNS)
    )
}

fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guild_size_stays_in_bounds() {
        let mut rng = generator(7, 0);
        for _ in 0..10_000 {
            let size = guild_size(&mut rng, 1000);
            assert!((MIN_GUILD_SIZE..=1000).contains(&size), "size {size}");
        }
    }

    #[test]
    fn guild_size_is_skewed_small() {
        let mut rng = generator(7, 1);
        let mut sizes: Vec<u32> = (0..20_000).map(|_| guild_size(&mut rng, 300_000)).collect();
        sizes.sort_unstable();
        let median = sizes[sizes.len() / 2];
        assert!((8..=25).contains(&median), "median {median}");
        let above_1000 = sizes.iter().filter(|&&size| size > 1000).count();
        assert!(above_1000 < sizes.len() / 10, "{above_1000} above 1000");
        assert!(sizes.contains(&300_000));
    }

    #[test]
    fn usernames_follow_discord_rules() {
        let mut rng = generator(3, 0);
        for _ in 0..1000 {
            let name = username(&mut rng);
            assert!((2..=32).contains(&name.len()), "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.'),
                "{name}"
            );
        }
    }

    #[test]
    fn distinct_names_do_not_repeat() {
        let mut rng = generator(4, 0);
        let names = role_names(&mut rng, ROLE_NAMES.len() + 5);
        let unique: std::collections::BTreeSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
    }

    #[test]
    fn mix_depends_on_both_inputs() {
        assert_ne!(mix(1, 2), mix(2, 1));
        assert_ne!(mix(1, 2), mix(1, 3));
        assert_eq!(mix(1, 2), mix(1, 2));
    }
}
