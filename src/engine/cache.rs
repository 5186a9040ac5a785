//! Built models kept across jobs, per (block_hash, params, dtype): one model per device of
//! the engine, least recently used evicted first.

use crate::backend::Model;
use crate::pow::dtype::Dtype;
use crate::pow::params::Params;

/// What a model depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelKey {
    pub block_hash: String,
    pub params: Params,
    pub dtype: Dtype,
}

struct Entry {
    key: ModelKey,
    /// One model per device, in device order.
    models: Vec<Model>,
    last_used: u64,
}

/// A small LRU of built models.
pub struct ModelCache {
    capacity: usize,
    entries: Vec<Entry>,
    clock: u64,
}

impl ModelCache {
    /// Keep at most `capacity` models (0 disables caching).
    pub fn new(capacity: usize) -> Self {
        ModelCache {
            capacity,
            entries: Vec::new(),
            clock: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The models of `key`, marked as just used.
    pub fn get(&mut self, key: &ModelKey) -> Option<Vec<Model>> {
        self.clock += 1;
        let now = self.clock;
        self.entries.iter_mut().find(|e| &e.key == key).map(|e| {
            e.last_used = now;
            e.models.clone()
        })
    }

    /// Make room for one more model before building it, so that the old ones are freed
    /// first rather than held alongside the new one.
    pub fn make_room(&mut self) {
        while !self.entries.is_empty() && self.entries.len() + 1 > self.capacity {
            self.evict_oldest();
        }
    }

    /// Keep `models` for `key`.
    pub fn insert(&mut self, key: ModelKey, models: Vec<Model>) {
        if self.capacity == 0 {
            return;
        }
        self.entries.retain(|e| e.key != key);
        self.make_room();
        self.clock += 1;
        self.entries.push(Entry {
            key,
            models,
            last_used: self.clock,
        });
    }

    /// Drop every kept model.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    fn evict_oldest(&mut self) {
        if let Some(i) = self
            .entries
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| e.last_used)
            .map(|(i, _)| i)
        {
            self.entries.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn key(h: &str) -> ModelKey {
        ModelKey {
            block_hash: h.into(),
            params: Params::default(),
            dtype: Dtype::F16,
        }
    }

    #[test]
    fn lru_keeps_the_recent_ones() {
        let mut c = ModelCache::new(2);
        c.insert(key("a"), vec![Arc::new(1u8)]);
        c.insert(key("b"), vec![Arc::new(2u8)]);
        assert!(c.get(&key("a")).is_some());
        c.insert(key("c"), vec![Arc::new(3u8)]);
        assert!(c.get(&key("b")).is_none());
        assert!(c.get(&key("a")).is_some());
        assert!(c.get(&key("c")).is_some());
        let mut k = key("a");
        k.dtype = Dtype::Bf16;
        assert!(c.get(&k).is_none());
        c.make_room();
        assert_eq!(c.len(), 1);
        let mut z = ModelCache::new(0);
        z.insert(key("a"), vec![Arc::new(1u8)]);
        assert!(z.is_empty());
    }
}
