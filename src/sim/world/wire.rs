//! Value types that serialize the way Discord's JSON writes them: ISO 8601 timestamps, image
//! hashes and permission bit sets as strings.

use std::fmt;

use serde::{Serialize, Serializer};
use serde_json::value::{to_raw_value, RawValue};

/// Milliseconds in one day.
const DAY_MS: u64 = 86_400_000;

/// A point in time in milliseconds since the Unix epoch, serialized as Discord writes
/// timestamps: `2021-08-10T11:16:37.020000+00:00` (microsecond precision, explicit UTC offset).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Timestamp(pub(super) u64);

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (year, month, day) = civil_from_days(self.0 / DAY_MS);
        let millis_of_day = self.0 % DAY_MS;
        let hours = millis_of_day / 3_600_000;
        let minutes = millis_of_day / 60_000 % 60;
        let seconds = millis_of_day / 1000 % 60;
        let micros = millis_of_day % 1000 * 1000;
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{hours:02}:{minutes:02}:{seconds:02}.{micros:06}+00:00"
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Converts days since 1970-01-01 to a (year, month, day) date of the proleptic Gregorian
/// calendar, with Howard Hinnant's `civil_from_days` algorithm restricted to dates after 1970.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// An image hash (avatar, icon, banner): 16 bytes written as 32 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ImageHash(pub(super) u128);

impl fmt::Display for ImageHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl Serialize for ImageHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A permission bit set, serialized as a decimal string because it exceeds 53 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Permissions(pub(super) u64);

impl Permissions {
    pub(super) const CREATE_INSTANT_INVITE: u64 = 1 << 0;
    pub(super) const KICK_MEMBERS: u64 = 1 << 1;
    pub(super) const BAN_MEMBERS: u64 = 1 << 2;
    pub(super) const ADMINISTRATOR: u64 = 1 << 3;
    pub(super) const MANAGE_CHANNELS: u64 = 1 << 4;
    pub(super) const ADD_REACTIONS: u64 = 1 << 6;
    pub(super) const STREAM: u64 = 1 << 9;
    pub(super) const VIEW_CHANNEL: u64 = 1 << 10;
    pub(super) const SEND_MESSAGES: u64 = 1 << 11;
    pub(super) const MANAGE_MESSAGES: u64 = 1 << 13;
    pub(super) const EMBED_LINKS: u64 = 1 << 14;
    pub(super) const ATTACH_FILES: u64 = 1 << 15;
    pub(super) const READ_MESSAGE_HISTORY: u64 = 1 << 16;
    pub(super) const USE_EXTERNAL_EMOJIS: u64 = 1 << 18;
    pub(super) const CONNECT: u64 = 1 << 20;
    pub(super) const SPEAK: u64 = 1 << 21;
    pub(super) const USE_VAD: u64 = 1 << 25;
    pub(super) const CHANGE_NICKNAME: u64 = 1 << 26;
    pub(super) const MANAGE_ROLES: u64 = 1 << 28;
    pub(super) const USE_APPLICATION_COMMANDS: u64 = 1 << 31;
    pub(super) const MODERATE_MEMBERS: u64 = 1 << 40;

    /// The permissions of the generated @everyone roles: view, chat, react, attach, invite,
    /// connect and speak.
    pub(super) const EVERYONE: Self = Self(
        Self::CREATE_INSTANT_INVITE
            | Self::ADD_REACTIONS
            | Self::STREAM
            | Self::VIEW_CHANNEL
            | Self::SEND_MESSAGES
            | Self::EMBED_LINKS
            | Self::ATTACH_FILES
            | Self::READ_MESSAGE_HISTORY
            | Self::USE_EXTERNAL_EMOJIS
            | Self::CONNECT
            | Self::SPEAK
            | Self::USE_VAD
            | Self::CHANGE_NICKNAME
            | Self::USE_APPLICATION_COMMANDS,
    );

    /// The permissions of a moderator role.
    pub(super) const MODERATOR: Self = Self(
        Self::KICK_MEMBERS
            | Self::BAN_MEMBERS
            | Self::MANAGE_MESSAGES
            | Self::MANAGE_ROLES
            | Self::MANAGE_CHANNELS
            | Self::MODERATE_MEMBERS,
    );

    pub(super) const NONE: Self = Self(0);
}

impl Serialize for Permissions {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// Serializes a payload of the world. Its types have string keys and infallible `Serialize`
/// implementations, so serialization does not fail.
pub(super) fn raw(value: &impl Serialize) -> Box<RawValue> {
    to_raw_value(value).expect("world payloads always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_formats_like_discord() {
        // 1628594197020 ms is the example 2021-08-10T11:16:37.020000+00:00 of twilight-model's
        // Timestamp documentation.
        assert_eq!(
            Timestamp(1_628_594_197_020).to_string(),
            "2021-08-10T11:16:37.020000+00:00"
        );
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00.000000+00:00");
        assert_eq!(
            Timestamp(951_782_400_000).to_string(),
            "2000-02-29T00:00:00.000000+00:00"
        );
        assert_eq!(
            Timestamp(1_735_689_599_999).to_string(),
            "2024-12-31T23:59:59.999000+00:00"
        );
    }

    #[test]
    fn image_hash_is_32_hex_digits() {
        assert_eq!(ImageHash(0xab).to_string(), format!("{:0>32}", "ab"));
        assert_eq!(ImageHash(u128::MAX).to_string().len(), 32);
    }

    #[test]
    fn permissions_serialize_as_string() {
        let text = serde_json::to_string(&Permissions(1 << 40)).unwrap();
        assert_eq!(text, "\"1099511627776\"");
    }
}
