//! The per-policy key/value store behind the `kv-*` host imports. It belongs
//! to the policy's name, not to an instance or version, so it survives
//! instance recycling and reloads. Bounded, because a policy is untrusted.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

pub const MAX_ENTRIES: usize = 10_000;
pub const MAX_KEY_BYTES: usize = 256;
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct KvStore {
    entries: Mutex<HashMap<String, (String, Option<u64>)>>,
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl KvStore {
    pub fn get(&self, key: &str, now: u64) -> Option<String> {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some((_, Some(expires))) if *expires <= now => {
                map.remove(key);
                None
            }
            Some((value, _)) => Some(value.clone()),
            None => None,
        }
    }

    /// Store an entry; refused (and `false` returned) when it is oversized or
    /// the store is full of live entries.
    pub fn set(&self, key: &str, value: &str, ttl_ms: Option<u64>, now: u64) -> bool {
        if key.len() > MAX_KEY_BYTES || value.len() > MAX_VALUE_BYTES {
            return false;
        }
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_ENTRIES && !map.contains_key(key) {
            map.retain(|_, (_, expires)| expires.is_none_or(|e| e > now));
            if map.len() >= MAX_ENTRIES {
                return false;
            }
        }
        let expires = ttl_ms.map(|t| now.saturating_add(t));
        map.insert(key.to_owned(), (value.to_owned(), expires));
        true
    }

    pub fn delete(&self, key: &str) {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(key);
    }

    pub fn len(&self) -> usize {
        self.entries.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_and_bounds() {
        let kv = KvStore::default();
        assert!(kv.set("a", "1", Some(10), 100));
        assert_eq!(kv.get("a", 109).as_deref(), Some("1"));
        assert_eq!(kv.get("a", 110), None);
        assert!(!kv.set(&"k".repeat(MAX_KEY_BYTES + 1), "v", None, 0));
        assert!(!kv.set("big", &"v".repeat(MAX_VALUE_BYTES + 1), None, 0));
        for i in 0..MAX_ENTRIES {
            assert!(kv.set(&format!("k{i}"), "v", Some(5), 0));
        }
        // Full of live entries: refused; once they expire, room again.
        assert!(!kv.set("one-more", "v", None, 1));
        assert!(kv.set("one-more", "v", None, 10));
        assert_eq!(kv.len(), 1);
    }
}
