//! Discord ids ("snowflakes"). Discord sends them as JSON strings because they overflow the
//! integers of JavaScript; this type also reads them as numbers.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Milliseconds between the Unix epoch and Discord's epoch (2015-01-01T00:00:00Z).
pub const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;

/// A Discord id. Serialized as a string, deserialized from a string or a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Snowflake(pub u64);

impl Snowflake {
    /// Builds an id from a Unix time in milliseconds and the low 22 bits (worker, process and
    /// increment), as Discord does.
    pub const fn from_parts(unix_ms: u64, low_bits: u64) -> Self {
        Self(((unix_ms - DISCORD_EPOCH_MS) << 22) | (low_bits & 0x3f_ffff))
    }

    /// Returns the creation time of the id in milliseconds since the Unix epoch.
    pub const fn unix_ms(self) -> u64 {
        (self.0 >> 22) + DISCORD_EPOCH_MS
    }

    /// Returns the raw id.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Snowflake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<u64> for Snowflake {
    fn from(id: u64) -> Self {
        Self(id)
    }
}

impl Serialize for Snowflake {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Snowflake {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SnowflakeVisitor;

        impl Visitor<'_> for SnowflakeVisitor {
            type Value = Snowflake;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a Discord id as a string or a non-negative integer")
            }

            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Snowflake, E> {
                Ok(Snowflake(value))
            }

            fn visit_i64<E: de::Error>(self, value: i64) -> Result<Snowflake, E> {
                u64::try_from(value)
                    .map(Snowflake)
                    .map_err(|_| E::custom(format!("invalid Discord id {value}: negative")))
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<Snowflake, E> {
                value
                    .parse()
                    .map(Snowflake)
                    .map_err(|_| E::custom(format!("invalid Discord id {value:?}: not a u64")))
            }
        }

        deserializer.deserialize_any(SnowflakeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snowflake_reads_string_and_number() {
        let from_str: Snowflake = serde_json::from_str("\"175928847299117063\"").unwrap();
        let from_num: Snowflake = serde_json::from_str("175928847299117063").unwrap();
        assert_eq!(from_str, Snowflake(175_928_847_299_117_063));
        assert_eq!(from_num, from_str);
        assert_eq!(
            serde_json::to_string(&from_str).unwrap(),
            "\"175928847299117063\""
        );
    }

    #[test]
    fn snowflake_rejects_garbage() {
        let err = serde_json::from_str::<Snowflake>("\"12ab\"").unwrap_err();
        assert!(err.to_string().contains("\"12ab\""), "{err}");
        assert!(serde_json::from_str::<Snowflake>("-4").is_err());
    }

    #[test]
    fn snowflake_timestamp_round_trips() {
        // Discord's documentation decodes 175928847299117063 to 1462015105796 ms.
        assert_eq!(
            Snowflake(175_928_847_299_117_063).unix_ms(),
            1_462_015_105_796
        );
        let id = Snowflake::from_parts(1_462_015_105_796, 7);
        assert_eq!(id.unix_ms(), 1_462_015_105_796);
        assert_eq!(id.0 & 0x3f_ffff, 7);
    }
}
