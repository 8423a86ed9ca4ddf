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
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::protocol::{topic_matches, truncate_utf8};

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

/// How many instances a stage holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// Every instance carrying the stage's labels.
    All,
    /// This percentage (1 to 99; `100%` parses to [`Size::All`]) of them, rounded up.
    Percent(u32),
    /// This many of them (at least 1), or all when fewer are subscribed.
    Count(u64),
}

/// One stage of a policy: the instances with every one of `labels`, `size` of them.
///
/// Text form (what `[[rollouts]]` stages are written as): whitespace-separated tokens in any
/// order, each a label selector `key=value` (keys unique) or at most one size: `N%`, `N`,
/// `N instances` / `N instance`, or `all`; no size means all of the labelled instances. The
/// [`Display`](fmt::Display) form is canonical (labels sorted by key, then the size) and parses
/// back to the same stage, for every stage [`FromStr`] produces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Stage {
    pub labels: BTreeMap<String, String>,
    pub size: Size,
}

impl Stage {
    /// The stage every policy ends with: every instance.
    pub fn everyone() -> Stage {
        Stage {
            labels: BTreeMap::new(),
            size: Size::All,
        }
    }
}

/// Caps on a stage's text: labels as an instance may carry them (`limits.max_labels` and
/// `max_label_bytes` by default), and a count no fleet reaches.
pub const MAX_STAGE_LABELS: usize = 32;
pub const MAX_STAGE_LABEL_BYTES: usize = 256;
pub const MAX_STAGE_COUNT: u64 = 1_000_000;

impl FromStr for Stage {
    type Err = String;

    fn from_str(text: &str) -> Result<Stage, String> {
        let mut labels = BTreeMap::new();
        // The size, with the text it was given as, to name both when a second one comes.
        let mut size: Option<(Size, String)> = None;
        let mut tokens = text.split_whitespace().peekable();
        if tokens.peek().is_none() {
            return Err("empty stage: give a size (`10%`, `3 instances`, `all`), labels (`zone=eu-1`) or both".into());
        }
        while let Some(token) = tokens.next() {
            if let Some((key, value)) = token.split_once('=') {
                if key.is_empty() || value.is_empty() {
                    return Err(format!(
                        "label `{token}`: give it as key=value, both non-empty"
                    ));
                }
                if key.len() > MAX_STAGE_LABEL_BYTES || value.len() > MAX_STAGE_LABEL_BYTES {
                    return Err(format!(
                        "label `{}`: keys and values are at most {MAX_STAGE_LABEL_BYTES} bytes",
                        key.chars().take(32).collect::<String>()
                    ));
                }
                if token
                    .chars()
                    .any(|c| c.is_control() || crate::protocol::is_bidi_control(c))
                {
                    return Err(
                        "a label holds a control character or a bidirectional override".into(),
                    );
                }
                if labels.insert(key.to_string(), value.to_string()).is_some() {
                    return Err(format!("label `{key}` is given twice"));
                }
                if labels.len() > MAX_STAGE_LABELS {
                    return Err(format!("at most {MAX_STAGE_LABELS} labels in a stage"));
                }
                continue;
            }
            let (parsed, shown) = if token.eq_ignore_ascii_case("all") {
                (Size::All, token.to_string())
            } else if let Some(digits) = token.strip_suffix('%') {
                (parse_percent(token, digits)?, token.to_string())
            } else if is_number(token) {
                let count: u64 = token
                    .parse()
                    .map_err(|_| format!("`{token}`: too many instances"))?;
                if count == 0 || count > MAX_STAGE_COUNT {
                    return Err(format!(
                        "`{token}`: a count is 1 to {MAX_STAGE_COUNT} instances"
                    ));
                }
                let unit = tokens.next_if(|next| is_instances(next));
                let shown = unit.map_or_else(|| token.to_string(), |u| format!("{token} {u}"));
                (Size::Count(count), shown)
            } else if is_instances(token) {
                return Err(format!(
                    "`{token}` must follow a number, as in `3 instances`"
                ));
            } else {
                return Err(format!(
                    "`{token}` is neither a size (`10%`, `3`, `3 instances`, `all`) nor a label (`key=value`)"
                ));
            };
            if let Some((_, first)) = &size {
                return Err(format!(
                    "`{shown}`: a stage has at most one size, and `{first}` is given already"
                ));
            }
            size = Some((parsed, shown));
        }
        Ok(Stage {
            labels,
            size: size.map_or(Size::All, |(s, _)| s),
        })
    }
}

fn is_number(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit())
}

fn is_instances(token: &str) -> bool {
    token.eq_ignore_ascii_case("instances") || token.eq_ignore_ascii_case("instance")
}

fn parse_percent(token: &str, digits: &str) -> Result<Size, String> {
    let bad = || format!("`{token}`: a percentage is 1% to 100%");
    if !is_number(digits) {
        return Err(bad());
    }
    match digits.parse::<u32>() {
        Ok(100) => Ok(Size::All),
        Ok(p @ 1..=99) => Ok(Size::Percent(p)),
        _ => Err(bad()),
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        match self.size {
            // Labels alone already mean all of the labelled instances.
            Size::All if !parts.is_empty() => {}
            Size::All => parts.push("all".into()),
            Size::Percent(p) => parts.push(format!("{p}%")),
            Size::Count(1) => parts.push("1 instance".into()),
            Size::Count(n) => parts.push(format!("{n} instances")),
        }
        f.write_str(&parts.join(" "))
    }
}

impl TryFrom<String> for Stage {
    type Error = String;

    fn try_from(text: String) -> Result<Stage, String> {
        text.parse()
    }
}

impl From<Stage> for String {
    fn from(stage: Stage) -> String {
        stage.to_string()
    }
}

/// A rollout policy, from `[[rollouts]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    /// Topic patterns (exact, `prefix/*` or `*`, see protocol::validate_pattern) it applies to by
    /// default; empty: only when a push names it.
    pub topics: Vec<String>,
    /// Stages in order; the last one is always "all" (added when the config's list does not end
    /// with it).
    pub stages: Vec<Stage>,
    /// Minimum time each stage runs before it may be promoted.
    pub bake_secs: u64,
    /// Promote when at least this percentage of the stage's instances acked `applied` (default 100).
    pub promote_applied_percent: u32,
    /// Halt when more than this percentage of the stage's instances acked `failed`; 0 (default):
    /// any failure halts.
    pub halt_failed_percent: u32,
    /// On halt, give the instances that got the new version the previous content back as a new
    /// version.
    pub auto_revert: bool,
}

/// The cut that starts `stage` of `topic`'s rollout, given the instances subscribed to the topic
/// now (id, labels) and the cuts of the stages already reached.
///
/// Stages are cumulative: an instance is in the rollout when any cut admits it. The members of
/// the stage are the subscribers carrying every one of the stage's labels (an id listed twice
/// counts once, with its first labels). [`Size::All`] admits all of them, present and future.
/// Otherwise the target is `ceil(p × members / 100)` for `p%`, or `min(n, members)` for a count;
/// the members the earlier cuts admit count towards it, and the rest is taken in rank order, so
/// the cut's `below` is the rank of the last one taken and an instance that subscribes later is
/// admitted exactly when its rank is at most that.
///
/// When the earlier cuts already admit the target, the cut admits no member more: its `below` is
/// the highest rank among the admitted members, lowered to just under the lowest rank of a member
/// not admitted. Two corners can admit one instance more than the target, each needing a 64-bit
/// hash collision (odds about 2⁻⁶⁴ per instance): two members of equal rank at the boundary, and
/// a member of rank 0 when no one is to be added (no `below` admits none of rank 0). A stage
/// without members gets `below: Some(0)`.
pub fn cut_for(
    stage: &Stage,
    topic: &str,
    subscribers: &[(&str, &BTreeMap<String, String>)],
    earlier: &[Cut],
) -> Cut {
    let labels = stage.labels.clone();
    if stage.size == Size::All {
        return Cut {
            labels,
            below: None,
        };
    }
    let mut members: BTreeMap<&str, &BTreeMap<String, String>> = BTreeMap::new();
    for (id, carried) in subscribers {
        if labels.iter().all(|(k, v)| carried.get(k) == Some(v)) {
            members.entry(id).or_insert(carried);
        }
    }
    let count = u64::try_from(members.len()).unwrap_or(u64::MAX);
    let target = match stage.size {
        Size::All => count,
        Size::Percent(p) => (u64::from(p.min(100)) * count).div_ceil(100),
        Size::Count(n) => n.min(count),
    };
    let (mut admitted_ranks, mut rest) = (Vec::new(), Vec::new());
    for (id, carried) in &members {
        let r = rank(topic, id);
        if admitted(earlier, topic, id, carried) {
            admitted_ranks.push(r);
        } else {
            rest.push(r);
        }
    }
    let already = u64::try_from(admitted_ranks.len()).unwrap_or(u64::MAX);
    let below = if already >= target {
        let highest = admitted_ranks.iter().copied().max().unwrap_or(0);
        match rest.iter().copied().min() {
            Some(lowest) => highest.min(lowest.saturating_sub(1)),
            None => highest,
        }
    } else {
        rest.sort_unstable();
        // 1 <= target - already <= rest.len(), as target <= count = already + rest.len().
        let take = usize::try_from(target - already).unwrap_or(usize::MAX);
        rest.truncate(take);
        rest.last().copied().unwrap_or(0)
    };
    Cut {
        labels,
        below: Some(below),
    }
}

/// What a stage's acks say so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Instances in the stage (its cut and the earlier ones admit them) subscribed now.
    pub members: u64,
    /// Members whose latest ack for the rollout's version is `applied`.
    pub applied: u64,
    /// (instance, error) of members whose latest ack failed.
    pub failed: Vec<(String, Option<String>)>,
}

/// What [`judge`] decided, with the reason shown to people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Wait(String),
    Promote(String),
    Halt(String),
}

/// How the reason of a halt [`judge`] decided begins (an operator's halt reads otherwise).
pub const HALTED_AT: &str = "halted at ";

/// Failed instances a halt reason names; the rest are counted.
const NAMED_FAILURES: usize = 3;
/// Bytes of each failed instance's error a halt reason keeps.
const FAILURE_ERROR_BYTES: usize = 200;

/// What the acks of the current stage say: halt, promote, or wait.
///
/// `stage` is the index of the current stage in `policy.stages`; `stage_started_ms` when it
/// began. Halts when any member acked `failed` and `halt_failed_percent` is 0, or when more than
/// that percentage of the members did. Otherwise promotes once the bake has run
/// (`now_ms - stage_started_ms >= bake_secs × 1000`) and at least `promote_applied_percent` of
/// the members acked `applied`, or, with no member connected, once the bake has run.
pub fn judge(
    policy: &Policy,
    stage: usize,
    stage_started_ms: i64,
    now_ms: i64,
    tally: &Tally,
) -> Verdict {
    let name = format!(
        "stage {} of {} ({})",
        stage.saturating_add(1),
        policy.stages.len(),
        policy
            .stages
            .get(stage)
            .map_or_else(|| "unknown".to_string(), ToString::to_string)
    );
    let members = tally.members;
    let failed = u64::try_from(tally.failed.len()).unwrap_or(u64::MAX);
    if failed > 0
        && (policy.halt_failed_percent == 0
            || failed.saturating_mul(100)
                > u64::from(policy.halt_failed_percent).saturating_mul(members))
    {
        let mut named: Vec<String> = tally
            .failed
            .iter()
            .take(NAMED_FAILURES)
            .map(|(instance, error)| match error {
                Some(error) => format!("{instance}: {}", shorten(error)),
                None => instance.clone(),
            })
            .collect();
        if tally.failed.len() > NAMED_FAILURES {
            named.push(format!("and {} more", tally.failed.len() - NAMED_FAILURES));
        }
        return Verdict::Halt(format!(
            "{HALTED_AT}{name}: {failed} of {members} {} acked failed ({})",
            instances(members),
            named.join("; ")
        ));
    }
    let elapsed = now_ms.saturating_sub(stage_started_ms);
    let bake_ms = i64::try_from(policy.bake_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let left_ms = bake_ms.saturating_sub(elapsed);
    let bake_left = (left_ms > 0).then(|| {
        let secs = left_ms / 1000 + i64::from(left_ms % 1000 != 0);
        format!("bake {secs} s left")
    });
    if members == 0 {
        return match bake_left {
            None => Verdict::Promote(format!("{name} holds no connected instance")),
            Some(left) => Verdict::Wait(format!("{name} holds no connected instance, {left}")),
        };
    }
    let applied_enough = tally.applied.saturating_mul(100)
        >= u64::from(policy.promote_applied_percent).saturating_mul(members);
    let failures = if failed > 0 {
        format!(
            ", {failed} failed (halts above {}%)",
            policy.halt_failed_percent
        )
    } else {
        String::new()
    };
    match bake_left {
        None if applied_enough => Verdict::Promote(format!(
            "{name}: {} of {members} applied{failures} after a {} s bake",
            tally.applied, policy.bake_secs
        )),
        _ => {
            let mut waiting = vec![format!(
                "{}: {} of {members} applied, {failed} failed",
                name, tally.applied
            )];
            waiting.extend(bake_left);
            if !applied_enough {
                waiting.push(format!("needs {}% applied", policy.promote_applied_percent));
            }
            Verdict::Wait(waiting.join(", "))
        }
    }
}

fn instances(n: u64) -> &'static str {
    if n == 1 {
        "instance"
    } else {
        "instances"
    }
}

/// An ack's error on one line, cut to [`FAILURE_ERROR_BYTES`] at a character boundary.
fn shorten(error: &str) -> String {
    let line = error.split_whitespace().collect::<Vec<_>>().join(" ");
    let cut = truncate_utf8(&line, FAILURE_ERROR_BYTES);
    if cut.len() < line.len() {
        format!("{cut}…")
    } else {
        line
    }
}

/// The trailer key a commit message names its rollout policy with.
const TRAILER_KEY: &str = "Confcast-Rollout";

/// The value of the last `Confcast-Rollout:` trailer of a commit message (git trailer rules: in
/// the last paragraph, key case-insensitive, value trimmed), if any.
///
/// As git does: the first paragraph is the subject and never holds trailers, so a one-line
/// message `Confcast-Rollout: x` has none. The last paragraph is a trailer block when every line
/// in it is a trailer (`Key: value`, the key of letters, digits and `-`) or continues one
/// (starts with whitespace), or when it holds a `Signed-off-by:` or `(cherry picked from commit`
/// line and at least a quarter of its lines are trailers. A value continued on the next line
/// counts only its first line.
pub fn trailer(message: &str) -> Option<&str> {
    let lines: Vec<&str> = message.lines().collect();
    let blank = |line: &&str| line.trim().is_empty();
    let first = lines.iter().position(|l| !blank(l))?;
    let end = lines.iter().rposition(|l| !blank(l))? + 1;
    let gap = lines.get(first..end)?.iter().rposition(blank)?;
    let block = lines.get(first + gap + 1..end)?;
    let (mut trailers, mut others, mut recognized) = (0usize, 0usize, false);
    let mut found = None;
    for (i, line) in block.iter().enumerate() {
        if i > 0 && line.starts_with(char::is_whitespace) {
            continue;
        }
        if line.starts_with("(cherry picked from commit ") {
            trailers += 1;
            recognized = true;
            continue;
        }
        match split_trailer(line) {
            Some((key, value)) => {
                trailers += 1;
                recognized |= key.eq_ignore_ascii_case("Signed-off-by");
                if key.eq_ignore_ascii_case(TRAILER_KEY) {
                    found = Some(value);
                }
            }
            None => others += 1,
        }
    }
    let is_block = trailers > 0 && (others == 0 || (recognized && trailers * 3 >= others));
    found.filter(|_| is_block)
}

/// `Key: value` (whitespace allowed before the colon) as the key and the trimmed value.
fn split_trailer(line: &str) -> Option<(&str, &str)> {
    let (key, value) = line.split_once(':')?;
    let key = key.trim_end();
    let token = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    token.then_some((key, value.trim()))
}

/// The trailer value that rolls a change out to everyone at once, whatever the policies say.
pub const IMMEDIATE: &str = "immediate";

/// The policy a change of `topic` rolls out with: the one the trailer names (whatever its
/// `topics`), none when the trailer is `immediate`, otherwise the first policy whose `topics`
/// match `topic` (protocol::topic_matches). Err(message) when the trailer names no policy.
pub fn choose<'a>(
    policies: &'a [Policy],
    topic: &str,
    trailer: Option<&str>,
) -> Result<Option<&'a Policy>, String> {
    match trailer {
        Some(IMMEDIATE) => Ok(None),
        Some(name) => policies
            .iter()
            .find(|p| p.name == name)
            .map(Some)
            .ok_or_else(|| {
                let known: Vec<String> = policies.iter().map(|p| format!("`{}`", p.name)).collect();
                format!(
                    "{TRAILER_KEY}: `{name}` names no rollout policy (configured: {}; or `{IMMEDIATE}`)",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                )
            }),
        None => Ok(policies
            .iter()
            .find(|p| p.topics.iter().any(|pattern| topic_matches(pattern, topic)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn stage(text: &str) -> Stage {
        text.parse().expect("valid stage")
    }

    #[test]
    fn stages_parse_from_their_text_forms() {
        let eu = labels(&[("zone", "eu-1")]);
        let cases = [
            ("10%", BTreeMap::new(), Size::Percent(10)),
            ("100%", BTreeMap::new(), Size::All),
            ("3 instances", BTreeMap::new(), Size::Count(3)),
            ("1 instance", BTreeMap::new(), Size::Count(1)),
            ("3", BTreeMap::new(), Size::Count(3)),
            ("all", BTreeMap::new(), Size::All),
            ("zone=eu-1", eu.clone(), Size::All),
            ("zone=eu-1 50%", eu.clone(), Size::Percent(50)),
            ("  50%\tzone=eu-1 ", eu.clone(), Size::Percent(50)),
            ("2 instances zone=eu-1", eu.clone(), Size::Count(2)),
            (
                "zone=eu-1 tier=web all",
                labels(&[("zone", "eu-1"), ("tier", "web")]),
                Size::All,
            ),
            ("url=a=b", labels(&[("url", "a=b")]), Size::All),
        ];
        for (text, labels, size) in cases {
            assert_eq!(stage(text), Stage { labels, size }, "{text}");
        }
        assert_eq!(stage("zone=eu-1 all").to_string(), "zone=eu-1");
        assert_eq!(stage("50% zone=eu-1").to_string(), "zone=eu-1 50%");
        assert_eq!(stage("3").to_string(), "3 instances");
        assert_eq!(stage("100%").to_string(), "all");
    }

    #[test]
    fn bad_stages_are_refused_naming_the_token() {
        let cases = [
            ("", "empty stage"),
            ("0%", "`0%`"),
            ("101%", "`101%`"),
            ("+5%", "`+5%`"),
            ("%", "`%`"),
            ("0", "`0`"),
            ("0 instances", "`0`"),
            ("99999999999999999999", "`99999999999999999999`"),
            ("instances", "`instances` must follow a number"),
            ("10% 3 instances", "`3 instances`"),
            ("all 10%", "`10%`"),
            ("ten", "`ten`"),
            ("=eu-1", "`=eu-1`"),
            ("zone=", "`zone=`"),
            ("zone=a zone=b", "`zone` is given twice"),
            ("1000001 instances", "a count is 1 to 1000000"),
            ("18446744073709551615 instances", "a count is 1 to 1000000"),
            ("zone=eu\u{202e}1", "control character"),
        ];
        for (text, expected) in cases {
            let err = text.parse::<Stage>().expect_err(text);
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    proptest::proptest! {
        #[test]
        fn stages_round_trip_through_their_text(
            labels in proptest::collection::btree_map("[a-z][a-z0-9._-]{0,8}", "[a-zA-Z0-9=._-]{1,8}", 0..4),
            size in proptest::prop_oneof![
                proptest::strategy::Just(Size::All),
                (1u32..100).prop_map(Size::Percent),
                (1u64..=MAX_STAGE_COUNT).prop_map(Size::Count),
            ],
        ) {
            let stage = Stage { labels, size };
            let text = stage.to_string();
            proptest::prop_assert_eq!(text.parse::<Stage>(), Ok(stage.clone()));
            let json = serde_json::to_string(&stage).expect("serializes");
            proptest::prop_assert_eq!(json.clone(), serde_json::to_string(&text).expect("string"));
            let back: Stage = serde_json::from_str(&json).expect("deserializes");
            proptest::prop_assert_eq!(back, stage);
        }
    }

    #[test]
    fn stages_deserialize_only_from_valid_text() {
        let err = serde_json::from_str::<Stage>("\"10 %\"").expect_err("bad stage");
        assert!(err.to_string().contains("`%`"), "{err}");
    }

    use proptest::strategy::Strategy as _;

    const TOPIC: &str = "payments";

    /// 20 instances `i-00`..`i-19`; the first five carry `zone=eu-1`.
    fn fleet() -> Vec<(String, BTreeMap<String, String>)> {
        (0..20)
            .map(|n| {
                let l = if n < 5 {
                    labels(&[("zone", "eu-1")])
                } else {
                    labels(&[("zone", "us-1")])
                };
                (format!("i-{n:02}"), l)
            })
            .collect()
    }

    fn view(
        fleet: &[(String, BTreeMap<String, String>)],
    ) -> Vec<(&str, &BTreeMap<String, String>)> {
        fleet.iter().map(|(id, l)| (id.as_str(), l)).collect()
    }

    /// The ids the cuts admit, in id order.
    fn admitted_ids(fleet: &[(String, BTreeMap<String, String>)], cuts: &[Cut]) -> Vec<String> {
        fleet
            .iter()
            .filter(|(id, l)| admitted(cuts, TOPIC, id, l))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Reaches each stage in turn, as a rollout does, returning the cuts.
    fn reach(fleet: &[(String, BTreeMap<String, String>)], stages: &[&str]) -> Vec<Cut> {
        let mut cuts = Vec::new();
        for text in stages {
            let cut = cut_for(&stage(text), TOPIC, &view(fleet), &cuts);
            cuts.push(cut);
        }
        cuts
    }

    #[test]
    fn percentages_admit_their_share_of_the_lowest_ranks_cumulatively() {
        let fleet = fleet();
        let cuts = reach(&fleet, &["10%"]);
        let first = admitted_ids(&fleet, &cuts);
        assert_eq!(first.len(), 2);
        let mut by_rank: Vec<&String> = fleet.iter().map(|(id, _)| id).collect();
        by_rank.sort_by_key(|id| rank(TOPIC, id));
        let mut lowest: Vec<String> = by_rank[..2].iter().map(|id| id.to_string()).collect();
        lowest.sort();
        assert_eq!(first, lowest);

        let cuts = reach(&fleet, &["10%", "50%"]);
        let second = admitted_ids(&fleet, &cuts);
        assert_eq!(second.len(), 10);
        assert!(first.iter().all(|id| second.contains(id)));

        let cuts = reach(&fleet, &["10%", "50%", "all"]);
        assert_eq!(admitted_ids(&fleet, &cuts).len(), 20);
        assert!(cuts[2].everyone());
    }

    #[test]
    fn counts_and_labels_admit_what_they_say() {
        let fleet = fleet();
        assert_eq!(
            admitted_ids(&fleet, &reach(&fleet, &["3 instances"])).len(),
            3
        );
        assert_eq!(admitted_ids(&fleet, &reach(&fleet, &["100"])).len(), 20);
        let eu = admitted_ids(&fleet, &reach(&fleet, &["zone=eu-1"]));
        assert_eq!(eu, ["i-00", "i-01", "i-02", "i-03", "i-04"]);
        let half = admitted_ids(&fleet, &reach(&fleet, &["zone=eu-1 50%"]));
        assert_eq!(half.len(), 3, "ceil(50% of 5)");
        assert!(half.iter().all(|id| eu.contains(id)));
    }

    #[test]
    fn a_stage_the_earlier_cuts_already_fill_admits_no_one_more() {
        let fleet = fleet();
        // 10% of 20 is 2, and zone=eu-1 admitted 5 already.
        let cuts = reach(&fleet, &["zone=eu-1", "10%"]);
        assert_eq!(admitted_ids(&fleet, &cuts).len(), 5);
        let cuts = reach(&fleet, &["50%", "3 instances", "10%"]);
        assert_eq!(admitted_ids(&fleet, &cuts).len(), 10);
        // No member at all: only rank 0 would be admitted.
        let none = cut_for(&stage("zone=mars 10%"), TOPIC, &view(&fleet), &[]);
        assert_eq!(none.below, Some(0));
        assert!(admitted_ids(&fleet, &[none]).is_empty());
    }

    #[test]
    fn instances_joining_later_are_admitted_by_rank() {
        let fleet = fleet();
        let cuts = reach(&fleet, &["10%"]);
        let below = cuts[0].below.expect("a rank bound");
        let newcomer = |admit: bool| {
            (0..10_000)
                .map(|n| format!("new-{n}"))
                .find(|id| (rank(TOPIC, id) <= below) == admit)
                .expect("some id on each side")
        };
        let none = BTreeMap::new();
        assert!(admitted(&cuts, TOPIC, &newcomer(true), &none));
        assert!(!admitted(&cuts, TOPIC, &newcomer(false), &none));
    }

    #[test]
    fn duplicate_subscribers_count_once() {
        let fleet = fleet();
        let mut twice = view(&fleet);
        twice.extend(view(&fleet));
        let cut = cut_for(&stage("10%"), TOPIC, &twice, &[]);
        assert_eq!(admitted_ids(&fleet, &[cut]).len(), 2);
    }

    proptest::proptest! {
        /// Whatever the stages and whoever connects between them, reaching a stage never
        /// admits fewer instances, and never drops one admitted before.
        #[test]
        fn widening_never_admits_fewer(
            stages in proptest::collection::vec(
                proptest::prop_oneof![
                    (1u32..100).prop_map(|p| format!("{p}%")),
                    (1u64..30).prop_map(|n| format!("{n} instances")),
                    proptest::strategy::Just("zone=eu-1".to_string()),
                    (1u32..100).prop_map(|p| format!("zone=eu-1 {p}%")),
                ],
                1..6,
            ),
            joined in proptest::collection::vec(0usize..20, 1..6),
        ) {
            let all = fleet();
            let mut cuts: Vec<Cut> = Vec::new();
            let mut before: Vec<String> = Vec::new();
            for (text, present) in stages.iter().zip(joined.iter().cycle()) {
                // Only some instances are subscribed when this stage starts.
                let now: Vec<_> = all.iter().skip(*present).cloned().collect();
                cuts.push(cut_for(&stage(text), TOPIC, &view(&now), &cuts));
                let after = admitted_ids(&all, &cuts);
                proptest::prop_assert!(before.iter().all(|id| after.contains(id)));
                before = after;
            }
        }
    }

    fn policy(stages: &[&str]) -> Policy {
        Policy {
            name: "canary".into(),
            topics: vec!["payments".into()],
            stages: stages.iter().map(|s| stage(s)).collect(),
            bake_secs: 30,
            promote_applied_percent: 100,
            halt_failed_percent: 0,
            auto_revert: false,
        }
    }

    fn tally(members: u64, applied: u64, failed: &[(&str, Option<&str>)]) -> Tally {
        Tally {
            members,
            applied,
            failed: failed
                .iter()
                .map(|(i, e)| (i.to_string(), e.map(str::to_string)))
                .collect(),
        }
    }

    const START: i64 = 1_000_000;
    const BAKED: i64 = START + 30_000;

    #[test]
    fn any_failure_halts_by_default_naming_at_most_three() {
        let p = policy(&["10%", "50%", "all"]);
        let t = tally(
            2,
            0,
            &[
                ("i-03", Some("check failed: nginx -t\nline 3")),
                ("i-07", None),
            ],
        );
        assert_eq!(
            judge(&p, 0, START, START, &t),
            Verdict::Halt(
                "halted at stage 1 of 3 (10%): 2 of 2 instances acked failed (i-03: check failed: nginx -t line 3; i-07)"
                    .into()
            )
        );
        let long = "é".repeat(300);
        let five: Vec<(String, Option<&str>)> = (0..5)
            .map(|n| (format!("i-{n}"), Some(long.as_str())))
            .collect();
        let five: Vec<(&str, Option<&str>)> = five.iter().map(|(i, e)| (i.as_str(), *e)).collect();
        let Verdict::Halt(reason) = judge(&p, 1, START, BAKED, &tally(10, 5, &five)) else {
            panic!("halts");
        };
        assert!(
            reason
                .starts_with("halted at stage 2 of 3 (50%): 5 of 10 instances acked failed (i-0: "),
            "{reason}"
        );
        assert!(
            reason.contains("i-2: ")
                && !reason.contains("i-3")
                && reason.ends_with("; and 2 more)"),
            "{reason}"
        );
        assert!(
            reason.contains(&format!("{}…", "é".repeat(100))),
            "{reason}"
        );
        assert!(!reason.contains(&"é".repeat(101)), "{reason}");
    }

    #[test]
    fn a_failure_threshold_halts_only_above_it() {
        let mut p = policy(&["10%", "all"]);
        p.halt_failed_percent = 20;
        // 2 of 10 is 20%: not above it, so it promotes once the rest applied.
        p.promote_applied_percent = 80;
        let two = [("a", None), ("b", None)];
        assert_eq!(
            judge(&p, 0, START, BAKED, &tally(10, 8, &two)),
            Verdict::Promote(
                "stage 1 of 2 (10%): 8 of 10 applied, 2 failed (halts above 20%) after a 30 s bake"
                    .into()
            )
        );
        let three = [("a", None), ("b", None), ("c", None)];
        assert!(matches!(
            judge(&p, 0, START, BAKED, &tally(10, 7, &three)),
            Verdict::Halt(r) if r.starts_with("halted at stage 1 of 2 (10%): 3 of 10 instances acked failed (a; b; c)")
        ));
    }

    #[test]
    fn promotion_waits_for_the_bake_and_the_applied_share() {
        let p = policy(&["10%", "50%", "all"]);
        let all_applied = tally(2, 2, &[]);
        assert_eq!(
            judge(&p, 0, START, BAKED - 1, &all_applied),
            Verdict::Wait("stage 1 of 3 (10%): 2 of 2 applied, 0 failed, bake 1 s left".into())
        );
        assert_eq!(
            judge(&p, 0, START, BAKED, &all_applied),
            Verdict::Promote("stage 1 of 3 (10%): 2 of 2 applied after a 30 s bake".into())
        );
        assert_eq!(
            judge(&p, 0, START, START + 18_000, &tally(2, 1, &[])),
            Verdict::Wait(
                "stage 1 of 3 (10%): 1 of 2 applied, 0 failed, bake 12 s left, needs 100% applied"
                    .into()
            )
        );
        assert_eq!(
            judge(&p, 0, START, BAKED + 60_000, &tally(2, 1, &[])),
            Verdict::Wait(
                "stage 1 of 3 (10%): 1 of 2 applied, 0 failed, needs 100% applied".into()
            )
        );
        let mut most = policy(&["10%", "all"]);
        most.promote_applied_percent = 75;
        assert!(matches!(
            judge(&most, 0, START, BAKED, &tally(4, 3, &[])),
            Verdict::Promote(_)
        ));
        assert!(matches!(
            judge(&most, 0, START, BAKED, &tally(5, 3, &[])),
            Verdict::Wait(_)
        ));
        // A clock behind the stage's start only waits longer.
        assert!(
            matches!(judge(&p, 0, START, START - 5_000, &all_applied), Verdict::Wait(r) if r.ends_with("bake 35 s left"))
        );
    }

    #[test]
    fn an_empty_stage_promotes_after_the_bake() {
        let p = policy(&["zone=eu-1", "all"]);
        assert_eq!(
            judge(&p, 0, START, START + 29_001, &Tally::default()),
            Verdict::Wait(
                "stage 1 of 2 (zone=eu-1) holds no connected instance, bake 1 s left".into()
            )
        );
        assert_eq!(
            judge(&p, 0, START, BAKED, &Tally::default()),
            Verdict::Promote("stage 1 of 2 (zone=eu-1) holds no connected instance".into())
        );
    }

    #[test]
    fn trailers_come_from_the_last_paragraph_only() {
        let cases: [(&str, Option<&str>); 11] = [
            ("Raise timeouts\n\nConfcast-Rollout: canary\n", Some("canary")),
            (
                "Raise timeouts\n\nWhy: the upstream is slow.\n\nConfcast-Rollout:  canary \nSigned-off-by: A <a@example.com>\n",
                Some("canary"),
            ),
            ("Raise timeouts\n\nconfcast-rollout: immediate", Some("immediate")),
            ("Raise timeouts\r\n\r\nCONFCAST-ROLLOUT : slow\r\n", Some("slow")),
            ("Raise\n\nConfcast-Rollout: first\nConfcast-Rollout: second\n", Some("second")),
            // The subject paragraph is never a trailer block.
            ("Confcast-Rollout: canary", None),
            ("Confcast-Rollout: canary\nSigned-off-by: A <a@example.com>\n\n", None),
            // Not in the last paragraph.
            ("Raise\n\nConfcast-Rollout: canary\n\nMore text.\n", None),
            // A paragraph of prose is not a trailer block...
            ("Raise\n\nNote: this ships with\nConfcast-Rollout: canary\nas usual\n", None),
            // ...unless git would take it for one: a git trailer and a quarter of trailers.
            (
                "Raise\n\nsome prose\nmore prose\nConfcast-Rollout: canary\nSigned-off-by: A <a@example.com>\n",
                Some("canary"),
            ),
            ("Raise\n\nConfcast-Rollout: canary\n  continued\nReviewed-by: B\n", Some("canary")),
        ];
        for (message, expected) in cases {
            assert_eq!(trailer(message), expected, "{message:?}");
        }
    }

    #[test]
    fn the_trailer_names_the_policy_else_topics_choose_it() {
        let mut canary = policy(&["10%", "all"]);
        canary.topics = vec!["billing/*".into()];
        let mut slow = policy(&["1 instance", "all"]);
        slow.name = "slow".into();
        slow.topics = vec!["*".into()];
        let policies = [canary, slow];
        let name =
            |chosen: Result<Option<&Policy>, String>| chosen.map(|p| p.map(|p| p.name.clone()));
        assert_eq!(
            name(choose(&policies, "billing/eu", None)),
            Ok(Some("canary".into()))
        );
        assert_eq!(
            name(choose(&policies, "payments", None)),
            Ok(Some("slow".into()))
        );
        assert_eq!(
            name(choose(&policies, "payments", Some("canary"))),
            Ok(Some("canary".into()))
        );
        assert_eq!(
            name(choose(&policies, "billing/eu", Some("immediate"))),
            Ok(None)
        );
        assert_eq!(name(choose(&policies[..1], "payments", None)), Ok(None));
        let err = choose(&policies, "payments", Some("fast")).expect_err("unknown");
        assert!(
            err.contains("`fast`") && err.contains("`canary`, `slow`"),
            "{err}"
        );
        let err = choose(&[], "payments", Some("")).expect_err("empty");
        assert!(err.contains("none"), "{err}");
    }
}
