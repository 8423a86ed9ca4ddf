//! Progressive rollouts: a topic's new version goes to a stage of its instances first (a
//! percentage, a count, or the instances with some labels), and widens stage by stage on healthy
//! acks, or halts on failed ones.
//!
//! What is decided here, as pure functions: which instances a stage admits ([`Cut`],
//! [`Audience`]), how a stage is chosen from the instances subscribed when it starts
//! ([`cut_for`]), and what the acks of a stage say ([`judge`]). The store keeps each topic's
//! rollout ([`crate::store::Staging`]); the hub and the replay deliver a logged change only to the
//! instances its [`Audience`] admits; one replica at a time decides ([`crate::hub::stages`]).
//!
//! Must never: let an instance flap between versions within a rollout. Membership depends only on
//! the instance's id, its labels and the cuts stored when each stage started, never on who else
//! is connected now, and the cuts of a rollout only ever widen.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// An instance's rank in a topic's rollouts: 64 bits of FNV-1a over the topic, a NUL and the
/// instance id. Stable across restarts, replicas and versions of confcast; per topic, so the
/// canaries of one topic are not always the canaries of every topic.
pub fn rank(topic: &str, instance: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for byte in topic.bytes().chain([0]).chain(instance.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    hash
}

/// One stage's admission rule, fixed when the stage starts: the instances carrying every one of
/// `labels` whose rank is at most `below` (`None`: all of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cut {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<u64>,
}

impl Cut {
    /// Whether this cut admits `instance` (with `labels`) for `topic`.
    pub fn admits(&self, topic: &str, instance: &str, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.below.is_none_or(|b| rank(topic, instance) <= b)
    }

    /// Admits every instance.
    pub fn everyone(&self) -> bool {
        self.labels.is_empty() && self.below.is_none()
    }
}

/// Who a logged change is for: the instances any of the cuts admits (the stages reached so far).
/// A change without an audience is for every subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audience {
    pub cuts: Vec<Cut>,
}

impl Audience {
    pub fn admits(&self, topic: &str, instance: &str, labels: &BTreeMap<String, String>) -> bool {
        self.cuts.iter().any(|c| c.admits(topic, instance, labels))
    }
}

/// Whether an instance is in the stages `cuts` reached (an empty list admits no one).
pub fn admitted(
    cuts: &[Cut],
    topic: &str,
    instance: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    cuts.iter().any(|c| c.admits(topic, instance, labels))
}
