//! Userspace value types: MAC addresses and cloud ids, with parsing and display.

use std::{fmt, str::FromStr};

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A locally administered unicast address derived from `seed` (`02:a7:` + 4 bytes).
    pub const fn local(seed: u32) -> Self {
        let b = seed.to_be_bytes();
        MacAddr([0x02, 0xa7, b[0], b[1], b[2], b[3]])
    }

    /// True for unicast addresses (group bit clear) that are not all-zero.
    pub fn is_valid_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Error parsing a [`MacAddr`].
#[derive(Debug, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex bytes separated by ':'")]
pub struct ParseMacError(pub String);

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().ok_or_else(|| ParseMacError(s.into()))?;
            if p.len() != 2 {
                return Err(ParseMacError(s.into()));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| ParseMacError(s.into()))?;
        }
        if parts.next().is_some() {
            return Err(ParseMacError(s.into()));
        }
        Ok(MacAddr(out))
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `v` in base 36 (`0-9a-z`): short unique suffixes for device, namespace and pin names.
pub fn radix36(mut v: u64) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(digits[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

/// A cloud (tenant) id: the API's type (`c` + 8 hex digits when shown), never 0.
pub use atoll_api::model::CloudId;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_and_rejects_garbage() {
        let m: MacAddr = "02:a7:00:00:00:0f".parse().unwrap();
        assert_eq!(m.to_string(), "02:a7:00:00:00:0f");
        assert!(m.is_valid_unicast());
        for bad in [
            "",
            "02:a7",
            "02:a7:00:00:00:0f:00",
            "zz:a7:00:00:00:0f",
            "2:a7:0:0:0:f",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(!"01:00:5e:00:00:01"
            .parse::<MacAddr>()
            .unwrap()
            .is_valid_unicast());
        assert_eq!(CloudId::new(0), None);
    }
}
