//! Who listens to which topic: the index the feeder looks a change's topic up in, so a change is
//! handed to the connections that subscribed to it and to no other.
//!
//! Patterns are exact topics, `*`, or `prefix/*` families, so a topic is looked up, never matched
//! against every pattern: one hash lookup for the exact topic, one per `/` for its families, plus
//! the `*` subscribers. Each pattern is stored once (interned) whoever subscribed to it. A
//! connection's [`Inbox`] is a bounded queue of shared frames: the feeder never waits for a
//! connection, and one that lets its queue fill is marked lagged and cut off (4008), so a slow
//! subscriber never slows another. The index lock is taken by the feeder once per change and by a
//! connection when it subscribes or goes, never per change per connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use super::Frame;

/// One connection's end of the index: where the feeder puts the frames it subscribed to.
#[derive(Debug)]
pub struct Inbox {
    id: u64,
    tx: mpsc::Sender<Arc<Frame>>,
    /// The highest seq queued, so a change matching two of its patterns is queued once.
    queued: AtomicU64,
    /// Set when the queue was full: the connection is cut off instead of skipping a change.
    lagged: AtomicBool,
    /// Its instance, for changes a progressive rollout gives only to some (`Frame::audience`).
    member: Option<Arc<Member>>,
}

/// Who an inbox delivers to, as a rollout's stages see it.
#[derive(Debug)]
pub struct Member {
    pub instance: String,
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Inbox {
    /// Whether the feeder found this inbox full; the connection must close (4008).
    pub fn lagged(&self) -> bool {
        self.lagged.load(Ordering::Acquire)
    }
}

type Bucket = HashMap<u64, Arc<Inbox>>;

/// One pattern, stored once, and its subscribers.
struct Entry {
    pattern: Arc<str>,
    subscribers: Bucket,
}

struct Index {
    /// `payments` -> its subscribers
    exact: HashMap<Box<str>, Entry>,
    /// `billing` (from `billing/*`) -> its subscribers
    families: HashMap<Box<str>, Entry>,
    /// `*`
    all: Entry,
}

impl Default for Index {
    fn default() -> Index {
        Index {
            exact: HashMap::new(),
            families: HashMap::new(),
            all: Entry {
                pattern: Arc::from("*"),
                subscribers: Bucket::new(),
            },
        }
    }
}

impl Index {
    /// The entry of `pattern`, created when missing.
    fn entry(&mut self, pattern: &str) -> &mut Entry {
        if pattern == "*" {
            return &mut self.all;
        }
        let (map, key) = match pattern.strip_suffix("/*") {
            Some(prefix) => (&mut self.families, prefix),
            None => (&mut self.exact, pattern),
        };
        map.entry(Box::from(key)).or_insert_with(|| Entry {
            pattern: Arc::from(pattern),
            subscribers: Bucket::new(),
        })
    }

    fn remove(&mut self, pattern: &str, id: u64) {
        if pattern == "*" {
            self.all.subscribers.remove(&id);
            return;
        }
        let (map, key) = match pattern.strip_suffix("/*") {
            Some(prefix) => (&mut self.families, prefix),
            None => (&mut self.exact, pattern),
        };
        if let Some(entry) = map.get_mut(key) {
            entry.subscribers.remove(&id);
            if entry.subscribers.is_empty() {
                map.remove(key);
            }
        }
    }

    /// The subscribers of every pattern that matches `topic` (see `protocol::topic_matches`).
    fn matching<'a>(&'a self, topic: &str) -> impl Iterator<Item = &'a Bucket> + 'a {
        let exact = self.exact.get(topic);
        // `a/b/c` is in the families `a` and `a/b`; a family never matches its own name.
        let families: Vec<&Entry> = if self.families.is_empty() {
            Vec::new()
        } else {
            topic
                .match_indices('/')
                .filter_map(|(at, _)| self.families.get(&topic[..at]))
                .collect()
        };
        std::iter::once(&self.all)
            .chain(exact)
            .chain(families)
            .map(|e| &e.subscribers)
            .filter(|b| !b.is_empty())
    }
}

/// The subscription index of one replica.
pub struct Subscriptions {
    index: Mutex<Index>,
    next: AtomicU64,
    capacity: usize,
}

/// What [`Subscriptions::deliver`] did with one change.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delivered {
    /// Inboxes the frame was queued in.
    pub queued: usize,
    /// Inboxes found full: their connections are cut off.
    pub lagged: usize,
}

impl Subscriptions {
    /// An index whose inboxes each hold at most `capacity` frames.
    pub fn new(capacity: usize) -> Subscriptions {
        Subscriptions {
            index: Mutex::new(Index::default()),
            next: AtomicU64::new(1),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // A panic elsewhere while holding the lock leaves the index consistent (every change
        // is one insert or remove), so a poisoned lock is still usable.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new, empty inbox and the receiving end a connection reads.
    pub fn inbox(&self) -> (Arc<Inbox>, mpsc::Receiver<Arc<Frame>>) {
        self.inbox_for(None)
    }

    /// An inbox for `member`: changes with an audience are queued only if it admits `member`
    /// (an inbox without one gets none of them).
    pub fn inbox_for(
        &self,
        member: Option<Arc<Member>>,
    ) -> (Arc<Inbox>, mpsc::Receiver<Arc<Frame>>) {
        let (tx, rx) = mpsc::channel(self.capacity);
        let inbox = Inbox {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            tx,
            queued: AtomicU64::new(0),
            lagged: AtomicBool::new(false),
            member,
        };
        (Arc::new(inbox), rx)
    }

    /// Adds `patterns` to what `inbox` receives, from the next change the feeder hands out. Returns
    /// the patterns interned (shared with every other subscriber of the same pattern).
    pub fn listen(&self, inbox: &Arc<Inbox>, patterns: &[String]) -> Vec<Arc<str>> {
        let mut index = self.lock();
        patterns
            .iter()
            .map(|p| {
                let entry = index.entry(p);
                entry.subscribers.insert(inbox.id, inbox.clone());
                entry.pattern.clone()
            })
            .collect()
    }

    /// Removes `inbox` from every pattern it listed: it receives nothing more.
    pub fn leave<'p>(&self, inbox: &Inbox, patterns: impl IntoIterator<Item = &'p str>) {
        let mut index = self.lock();
        for p in patterns {
            index.remove(p, inbox.id);
        }
    }

    /// Queues `frame` in the inbox of every subscriber of its topic, once each. An inbox that is
    /// full is marked lagged and dropped from the index, never waited for.
    pub fn deliver(&self, frame: &Arc<Frame>) -> Delivered {
        let mut done = Delivered::default();
        let mut full: Vec<Arc<Inbox>> = Vec::new();
        let mut index = self.lock();
        for bucket in index.matching(&frame.topic) {
            for inbox in bucket.values() {
                if let Some(audience) = &frame.audience {
                    let admitted = inbox
                        .member
                        .as_ref()
                        .is_some_and(|m| audience.admits(&frame.topic, &m.instance, &m.labels));
                    if !admitted {
                        continue;
                    }
                }
                // Frames come in seq order: a lower mark means not queued yet for this change.
                if inbox.queued.fetch_max(frame.seq, Ordering::Relaxed) >= frame.seq {
                    continue;
                }
                match inbox.tx.try_send(frame.clone()) {
                    Ok(()) => done.queued += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        inbox.lagged.store(true, Ordering::Release);
                        done.lagged += 1;
                        full.push(inbox.clone());
                    }
                    // The connection is gone and has not left yet: it will.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        for inbox in full {
            // A lagged inbox gets nothing more; its connection closes on the next read.
            let index = &mut *index;
            index.all.subscribers.remove(&inbox.id);
            for map in [&mut index.exact, &mut index.families] {
                map.retain(|_, e| {
                    e.subscribers.remove(&inbox.id);
                    !e.subscribers.is_empty()
                });
            }
        }
        done
    }

    /// Distinct patterns held, over all connections (for tests and metrics).
    pub fn patterns(&self) -> usize {
        let index = self.lock();
        index.exact.len() + index.families.len() + usize::from(!index.all.subscribers.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::ws::Utf8Bytes;

    fn frame(seq: u64, topic: &str) -> Arc<Frame> {
        Arc::new(Frame {
            audience: None,
            seq,
            topic: topic.into(),
            text: Utf8Bytes::from(format!("{seq}")),
        })
    }

    fn drain(rx: &mut mpsc::Receiver<Arc<Frame>>) -> Vec<u64> {
        let mut seqs = Vec::new();
        while let Ok(f) = rx.try_recv() {
            seqs.push(f.seq);
        }
        seqs
    }

    #[test]
    fn a_change_reaches_exactly_the_matching_patterns_once() {
        let subs = Subscriptions::new(16);
        let (a, mut ra) = subs.inbox();
        let (b, mut rb) = subs.inbox();
        let (c, mut rc) = subs.inbox();
        let (d, mut rd) = subs.inbox();
        subs.listen(&a, &["payments".into()]);
        subs.listen(&b, &["billing/*".into(), "billing/eu".into()]);
        subs.listen(&c, &["*".into()]);
        subs.listen(&d, &["billing/eu/*".into()]);
        for (seq, topic) in [
            (1, "payments"),
            (2, "billing"),
            (3, "billing/eu"),
            (4, "billing/eu/v2"),
            (5, "payments/x"),
            (6, "billingx/eu"),
        ] {
            subs.deliver(&frame(seq, topic));
        }
        assert_eq!(drain(&mut ra), vec![1]);
        // `billing/*` does not match `billing`; `billing/eu` matches two patterns, queued once.
        assert_eq!(drain(&mut rb), vec![3, 4]);
        assert_eq!(drain(&mut rc), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(drain(&mut rd), vec![4]);
        // Agrees with the protocol's own matching rule.
        for topic in ["billing", "billing/eu", "billing/eu/v2", "payments/x"] {
            for pattern in ["billing/*", "billing/eu/*", "payments", "*"] {
                let subs = Subscriptions::new(4);
                let (i, mut r) = subs.inbox();
                subs.listen(&i, &[pattern.into()]);
                subs.deliver(&frame(1, topic));
                assert_eq!(
                    !drain(&mut r).is_empty(),
                    crate::protocol::topic_matches(pattern, topic),
                    "{pattern} vs {topic}"
                );
            }
        }
    }

    #[test]
    fn a_full_inbox_is_marked_lagged_and_never_slows_the_others() {
        let subs = Subscriptions::new(2);
        let (slow, _keep) = subs.inbox();
        let (fast, mut rf) = subs.inbox();
        subs.listen(&slow, &["t".into()]);
        subs.listen(&fast, &["t".into()]);
        for seq in 1..=3 {
            let done = subs.deliver(&frame(seq, "t"));
            assert_eq!(done.lagged, usize::from(seq == 3));
            assert_eq!(drain(&mut rf), vec![seq]);
        }
        assert!(slow.lagged() && !fast.lagged());
        // Dropped from the index: later changes are not even offered to it.
        assert_eq!(subs.deliver(&frame(4, "t")).queued, 1);
    }

    #[test]
    fn leaving_removes_the_inbox_and_empty_patterns() {
        let subs = Subscriptions::new(4);
        let (a, mut ra) = subs.inbox();
        let (b, _rb) = subs.inbox();
        let held = subs.listen(&a, &["x".into(), "y/*".into()]);
        subs.listen(&b, &["x".into()]);
        assert_eq!(subs.patterns(), 2);
        subs.leave(&a, held.iter().map(|p| &**p));
        assert_eq!(subs.patterns(), 1);
        subs.deliver(&frame(1, "x"));
        assert!(drain(&mut ra).is_empty());
    }

    #[test]
    fn patterns_are_interned() {
        let subs = Subscriptions::new(4);
        let (a, _ra) = subs.inbox();
        let (b, _rb) = subs.inbox();
        let pa = subs.listen(&a, &["payments".into(), "eu/*".into()]);
        let pb = subs.listen(&b, &["eu/*".into(), "payments".into()]);
        assert!(Arc::ptr_eq(&pa[0], &pb[1]));
        assert!(Arc::ptr_eq(&pa[1], &pb[0]));
    }
}
