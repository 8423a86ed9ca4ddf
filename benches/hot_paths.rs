//! Micro-benchmarks of confcast's hot paths (issue 13): each calls the crate's own function on
//! realistic input, built once before timing.
//!
//! - `signature/*`: each forge's `webhook::*::verify` over a real GitHub push payload
//!   (`fixtures/webhooks/github-push-branch-created.json`, compact, its commit repeated up to
//!   25 KiB and 1 MiB), correctly signed, and the rejection of a wrong signature; `github_receive`
//!   is the whole intake of one delivery (`webhook::receive`: verify, then parse).
//! - `diff/*`: `sync::git::changes` (what a sync does after its fetch: tree diff with rename
//!   detection, limits, topic rules, blob contents) on a mirror fetched by `sync::git::sync` from a
//!   repo of 10,000 files: the first sync, a commit changing all 10,000, one changing 10.
//! - `frame_encoding/*`: `store::log_entry`, where a change is encoded once (the frame sent to every
//!   subscriber and its history row), for a 1 KiB and a 64 KiB file; the `serde_json` call that makes
//!   the frame alone; `welcome` and `ack_recorded` as a connection encodes them.
//! - `topic_rules/*`: `TopicRules::topic_of` (path to topic) with the default rule and with 10,000
//!   rules, first and last rule matching, and none; compiling the 10,000 rules.
//! - `topic_matching/*`: `protocol::topic_matches` against 10,000 subscription patterns, one by
//!   one, and the hub's subscription index holding the same patterns (`Subscriptions::deliver`).
//! - `fan_out/deliver/N`: one change queued for N subscribers of its topic by the index (the
//!   receivers are drained in the loop, so the figure includes taking it out again).
//!
//! Run with `cargo bench --bench hot_paths` (add a filter such as `-- diff/` for one group); the
//! figures measured are in docs/BENCHMARKS.md. Nothing here asserts a time.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use base64::Engine as _;
use confcast::hub::subscriptions::Subscriptions;
use confcast::hub::Frame;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hmac::{Hmac, Mac};
use serde_json::Value;

use confcast::config::{
    GenericWebhook, HmacAlgorithm, LimitsConfig, RepoConfig, Secret, ServerConfig,
    SignatureEncoding, WebhookConfig,
};
use confcast::demo::ConfigRepo;
use confcast::protocol::{self, FileStatus, ServerMessage};
use confcast::store::{self, ChangedFile, SyncOutcome, TopicChange};
use confcast::sync::git;
use confcast::sync::rules::{TopicRule, TopicRules};
use confcast::webhook::{self, bitbucket, generic, gitea, github, gitlab};

/// A real GitHub push delivery body (one commit); see fixtures/webhooks/README.txt.
const GITHUB_PUSH: &[u8] = include_bytes!("../fixtures/webhooks/github-push-branch-created.json");
const SECRET: &str = "bench-webhook-secret-0123456789abcdef";
/// A GitLab signing token (Standard Webhooks), the same shape as the tests'.
const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const KIB: usize = 1024;

// ---------------------------------------------------------------------------------------------
// signature check

/// The fixture as GitHub sends it (compact JSON), its commit repeated until the body is at least
/// `min_len` bytes (GitHub lists up to 2048 commits in one push).
fn push_body(min_len: usize) -> Vec<u8> {
    let mut payload: Value = serde_json::from_slice(GITHUB_PUSH).expect("fixture is JSON");
    let commit = payload["commits"][0].clone();
    let base = serde_json::to_vec(&payload).expect("encode").len();
    let per_commit = serde_json::to_vec(&commit).expect("encode").len() + 1;
    let extra = min_len.saturating_sub(base).div_ceil(per_commit);
    let commits = payload["commits"].as_array_mut().expect("commits array");
    commits.extend(std::iter::repeat_n(commit, extra));
    let listed = commits.len();
    assert!(listed <= 2048, "more commits than GitHub lists");
    let body = serde_json::to_vec(&payload).expect("encode");
    eprintln!("signature body: {} bytes, {listed} commits", body.len());
    body
}

fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in pairs {
        h.insert(
            HeaderName::from_static(name),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    h
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("key");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

fn signature(c: &mut Criterion) {
    let secrets = [Secret::new(SECRET)];
    let mut group = c.benchmark_group("signature");
    for (label, size) in [("25KiB", 25 * KIB), ("1MiB", 1024 * KIB)] {
        let body = push_body(size);
        group.throughput(Throughput::Bytes(body.len() as u64));

        let good = headers(&[
            ("x-github-event", "push".into()),
            (
                "x-hub-signature-256",
                github::sign(SECRET.as_bytes(), &body),
            ),
        ]);
        // Same length and format, another key: the whole HMAC is computed, then refused.
        let wrong = headers(&[
            ("x-github-event", "push".into()),
            (
                "x-hub-signature-256",
                github::sign(b"not-the-secret", &body),
            ),
        ]);
        assert_eq!(github::verify(&good, &body, &secrets, false), Ok(()));
        assert_eq!(
            github::verify(&wrong, &body, &secrets, false),
            Err(webhook::WebhookError::BadSignature)
        );
        group.bench_function(BenchmarkId::new("github", label), |b| {
            b.iter(|| github::verify(black_box(&good), black_box(&body), &secrets, false))
        });
        group.bench_function(BenchmarkId::new("github_rejected", label), |b| {
            b.iter(|| github::verify(black_box(&wrong), black_box(&body), &secrets, false))
        });

        let config = WebhookConfig::default();
        assert!(webhook::receive(&good, &body, &config, &secrets, 0).is_ok());
        group.bench_function(BenchmarkId::new("github_receive", label), |b| {
            b.iter(|| webhook::receive(black_box(&good), black_box(&body), &config, &secrets, 0))
        });

        let hex_sig = hex::encode(hmac_sha256(SECRET.as_bytes(), &[&body]));
        let gitea_headers = headers(&[("x-gitea-signature", hex_sig.clone())]);
        assert_eq!(
            gitea::verify(gitea::Flavor::Gitea, &gitea_headers, &body, &secrets),
            Ok(())
        );
        group.bench_function(BenchmarkId::new("gitea", label), |b| {
            b.iter(|| {
                gitea::verify(
                    gitea::Flavor::Gitea,
                    black_box(&gitea_headers),
                    black_box(&body),
                    &secrets,
                )
            })
        });

        let bitbucket_headers = headers(&[("x-hub-signature", format!("sha256={hex_sig}"))]);
        assert_eq!(
            bitbucket::verify(&bitbucket_headers, &body, &secrets),
            Ok(())
        );
        group.bench_function(BenchmarkId::new("bitbucket", label), |b| {
            b.iter(|| bitbucket::verify(black_box(&bitbucket_headers), black_box(&body), &secrets))
        });

        let generic_config = GenericWebhook {
            header: "X-Signature".into(),
            algorithm: HmacAlgorithm::Sha256,
            encoding: SignatureEncoding::Hex,
            prefix: "sha256=".into(),
            ref_pointer: None,
        };
        let generic_headers = headers(&[("x-signature", format!("sha256={hex_sig}"))]);
        assert_eq!(
            generic::verify(&generic_config, &generic_headers, &body, &secrets),
            Ok(())
        );
        group.bench_function(BenchmarkId::new("generic", label), |b| {
            b.iter(|| {
                generic::verify(
                    &generic_config,
                    black_box(&generic_headers),
                    black_box(&body),
                    &secrets,
                )
            })
        });

        // GitLab signing token: HMAC over `{id}.{timestamp}.{body}`, base64, timestamp checked.
        let whsec = [Secret::new(WHSEC)];
        let key = base64::engine::general_purpose::STANDARD
            .decode(&WHSEC["whsec_".len()..])
            .expect("key");
        let (id, ts) = ("msg_2mTqmMqdZ0yGT6GyOJ6XxgAaiHk", 1_700_000_000_i64);
        let ts_text = ts.to_string();
        let sig = base64::engine::general_purpose::STANDARD.encode(hmac_sha256(
            &key,
            &[id.as_bytes(), b".", ts_text.as_bytes(), b".", &body],
        ));
        let gitlab_headers = headers(&[
            ("x-gitlab-event", "Push Hook".into()),
            ("webhook-id", id.into()),
            ("webhook-timestamp", ts_text.clone()),
            ("webhook-signature", format!("v1,{sig}")),
        ]);
        assert_eq!(
            gitlab::verify(&gitlab_headers, &body, &whsec, ts, 300, false),
            Ok(())
        );
        group.bench_function(BenchmarkId::new("gitlab_signing_token", label), |b| {
            b.iter(|| {
                gitlab::verify(
                    black_box(&gitlab_headers),
                    black_box(&body),
                    &whsec,
                    ts,
                    300,
                    false,
                )
            })
        });
    }
    // GitLab's classic secret token: a constant-time compare; the body is not read.
    let token_headers = headers(&[("x-gitlab-token", SECRET.into())]);
    assert_eq!(
        gitlab::verify(&token_headers, b"", &secrets, 0, 300, true),
        Ok(())
    );
    group.throughput(Throughput::Elements(1));
    group.bench_function("gitlab_secret_token", |b| {
        b.iter(|| gitlab::verify(black_box(&token_headers), b"", &secrets, 0, 300, true))
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// diff of a 10,000-file commit

const FILES: usize = 10_000;

/// `bulk/dir{n % 100}/file{n}.json`, one topic (`bulk`) of 10,000 files, as in tests/histories.rs.
fn bulk_path(n: usize) -> String {
    format!("bulk/dir{}/file{n}.json", n % 100)
}

fn commit_files(
    repo: &ConfigRepo,
    files: impl Iterator<Item = (String, Vec<u8>)>,
    message: &str,
) -> String {
    let files: Vec<(String, Vec<u8>)> = files.collect();
    let changes: Vec<(&str, Option<&[u8]>)> = files
        .iter()
        .map(|(p, c)| (p.as_str(), Some(c.as_slice())))
        .collect();
    repo.commit("main", &changes, message)
        .expect("commit")
        .to_string()
}

fn diff(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = ConfigRepo::init(&dir.path().join("origin.git")).expect("init");
    let first = commit_files(
        &origin,
        (0..FILES).map(|n| (bulk_path(n), format!("{{\"n\": {n}}}\n").into_bytes())),
        "ten thousand files",
    );
    let all = commit_files(
        &origin,
        (0..FILES).map(|n| {
            (
                bulk_path(n),
                format!("{{\"n\": {n}, \"v\": 2}}\n").into_bytes(),
            )
        }),
        "change every file",
    );
    let ten = commit_files(
        &origin,
        (0..10).map(|k| {
            let n = k * 997;
            (
                bulk_path(n),
                format!("{{\"n\": {n}, \"v\": 3}}\n").into_bytes(),
            )
        }),
        "change ten files",
    );

    // The mirror as confcast holds it: made and fetched (as a pack) by the real sync.
    let data_dir = dir.path().join("data");
    let repo: RepoConfig = serde_json::from_value(serde_json::json!({
        "name": "bench",
        "url": origin.url(),
    }))
    .expect("repo config");
    let limits = LimitsConfig::default();
    let none = BTreeMap::new();
    let fetched = git::sync(&data_dir, &repo, &limits, None, &none, &BTreeMap::new())
        .expect("sync")
        .expect("a first sync finds changes");
    assert_eq!(fetched.outcome.commit, ten);
    let mirror = git2::Repository::open_bare(git::mirror_path(&data_dir, &repo.name))
        .expect("open the mirror");

    let changes = |last: Option<&str>, head: &str| {
        let head = git2::Oid::from_str(head).expect("oid");
        git::changes(&mirror, &repo, &limits, last, head, &none, &BTreeMap::new()).expect("changes")
    };
    for (last, head, files) in [
        (None, first.as_str(), FILES),
        (Some(first.as_str()), all.as_str(), FILES),
        (Some(all.as_str()), ten.as_str(), 10),
    ] {
        let synced = changes(last, head);
        assert!(synced.held.is_empty(), "{:?}", synced.held);
        let topics = &synced.outcome.topics;
        assert_eq!(topics.len(), 1);
        assert_eq!(topics[0].files.len(), files);
        assert!(topics[0].files.iter().all(|f| f.content.is_some()));
    }

    let mut group = c.benchmark_group("diff");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(FILES as u64));
    group.bench_function("10k_files/first_sync", |b| {
        b.iter(|| changes(None, black_box(&first)))
    });
    group.bench_function("10k_files/all_changed", |b| {
        b.iter(|| changes(Some(&first), black_box(&all)))
    });
    group.throughput(Throughput::Elements(10));
    group.bench_function("10k_files/10_changed", |b| {
        b.iter(|| changes(Some(&all), black_box(&ten)))
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// frame encoding

/// Real JSON text (the GitHub fixture, repeated) cut to exactly `len` bytes: quotes and newlines
/// to escape, as a config file has.
fn text_content(len: usize) -> Vec<u8> {
    GITHUB_PUSH.iter().copied().cycle().take(len).collect()
}

fn frame_encoding(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_encoding");
    for (label, len) in [("1KiB", KIB), ("64KiB", 64 * KIB)] {
        let outcome = SyncOutcome {
            repo: "config".into(),
            commit: "6113728f27ae82c7b1a177c8d03f9e96e0adf246".into(),
            author: "Ada Config <ada@example.com>".into(),
            message: "payments: raise the daily limit".into(),
            ..SyncOutcome::default()
        };
        let topic = TopicChange {
            topic: "payments".into(),
            files: vec![ChangedFile {
                path: "payments/limits.json".into(),
                status: FileStatus::Modified,
                old_path: None,
                sha: "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c".into(),
                content: Some(text_content(len)),
            }],
        };
        let entry = store::log_entry(&outcome, &topic, 42, 6).expect("log entry");
        assert_eq!(
            entry.change.files[0].encoding,
            protocol::Encoding::Utf8,
            "text stays text"
        );
        eprintln!("frame_encoding/{label}: frame {} bytes", entry.frame.len());
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(BenchmarkId::new("log_entry", label), |b| {
            b.iter(|| store::log_entry(black_box(&outcome), black_box(&topic), 42, 6))
        });
        let message = ServerMessage::Change(entry.change);
        group.bench_function(BenchmarkId::new("change_frame", label), |b| {
            b.iter(|| serde_json::to_string(black_box(&message)))
        });
    }
    group.throughput(Throughput::Elements(1));
    let welcome = ServerMessage::Welcome {
        protocol: protocol::PROTOCOL_VERSION,
        server: format!("confcast/{}", env!("CARGO_PKG_VERSION")),
        instance: "payments-1".into(),
        heartbeat_secs: ServerConfig::default().heartbeat().as_secs(),
        max_frame_bytes: LimitsConfig::default().max_frame_bytes(),
        epoch: store::new_epoch_id(),
    };
    group.bench_function("welcome", |b| {
        b.iter(|| serde_json::to_string(black_box(&welcome)))
    });
    let ack = ServerMessage::AckRecorded {
        topic: "payments".into(),
        version: 7,
    };
    group.bench_function("ack_recorded", |b| {
        b.iter(|| serde_json::to_string(black_box(&ack)))
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// path -> topic rules, and subscription patterns

const RULES: usize = 10_000;

fn topic_rules(c: &mut Criterion) {
    let mut group = c.benchmark_group("topic_rules");
    let default = TopicRules::default();
    assert_eq!(
        default.topic_of("payments/app.toml").as_deref(),
        Some("payments")
    );
    group.bench_function("default_rule", |b| {
        b.iter(|| default.topic_of(black_box("payments/app.toml")))
    });

    // One rule per service: `services/svcN/**` is topic `svcN`.
    let list: Vec<TopicRule> = (0..RULES)
        .map(|n| TopicRule {
            pattern: format!("services/svc{n}/**"),
            topic: format!("svc{n}"),
            validate: None,
        })
        .collect();
    let rules = TopicRules::compile(&list).expect("10,000 rules compile");
    let first = "services/svc0/app.toml";
    let last = format!("services/svc{}/app.toml", RULES - 1);
    let unmatched = "README.md";
    assert_eq!(rules.topic_of(first).as_deref(), Some("svc0"));
    assert_eq!(rules.topic_of(&last), Some(format!("svc{}", RULES - 1)));
    assert_eq!(rules.topic_of(unmatched), None);
    group.bench_function("10k_rules/first_matches", |b| {
        b.iter(|| rules.topic_of(black_box(first)))
    });
    group.bench_function("10k_rules/last_matches", |b| {
        b.iter(|| rules.topic_of(black_box(&last)))
    });
    group.bench_function("10k_rules/none_matches", |b| {
        b.iter(|| rules.topic_of(black_box(unmatched)))
    });
    group.sample_size(10);
    group.bench_function("10k_rules/compile", |b| {
        b.iter(|| TopicRules::compile(black_box(&list)))
    });
    group.finish();
}

const PATTERNS: usize = 10_000;

fn topic_matching(c: &mut Criterion) {
    // Half exact topics, half `prefix/*` families, as subscriptions name them.
    let patterns: Vec<String> = (0..PATTERNS)
        .map(|n| {
            if n % 2 == 0 {
                format!("svc{n}")
            } else {
                format!("team{n}/*")
            }
        })
        .collect();
    let topic = format!("team{}/eu", PATTERNS - 1);
    let matching = |topic: &str| {
        patterns
            .iter()
            .filter(|p| protocol::topic_matches(p, topic))
            .count()
    };
    assert_eq!(matching(&topic), 1);
    let mut group = c.benchmark_group("topic_matching");
    group.throughput(Throughput::Elements(PATTERNS as u64));
    group.bench_function("linear_10k_patterns", |b| {
        b.iter(|| matching(black_box(&topic)))
    });
    // The hub's subscription index: the same 10,000 patterns, each held by one connection's
    // inbox; `deliver` looks the topic up and queues the frame for the one subscriber.
    let index = Subscriptions::new(1024);
    let mut receivers = Vec::with_capacity(PATTERNS);
    for p in &patterns {
        let (inbox, rx) = index.inbox();
        index.listen(&inbox, std::slice::from_ref(p));
        receivers.push(rx);
    }
    let subscriber = receivers.len() - 1;
    let mut seq = 0u64;
    group.bench_function("index_10k_patterns", |b| {
        b.iter(|| {
            seq += 1;
            let frame = Arc::new(Frame {
                audience: None,
                seq,
                topic: topic.clone(),
                text: Utf8Bytes::from_static("{}"),
            });
            let done = index.deliver(black_box(&frame));
            // Keep the subscriber's inbox from filling.
            let _ = receivers[subscriber].try_recv();
            done
        })
    });
    group.finish();
}

/// Fan-out of one change through the subscription index to many subscribers of its topic: the
/// feeder's whole per-change cost on the hub side (the sockets' writes are the connections').
fn fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("fan_out");
    for subscribers in [1_000usize, 10_000] {
        let index = Subscriptions::new(1024);
        let mut receivers = Vec::with_capacity(subscribers);
        for _ in 0..subscribers {
            let (inbox, rx) = index.inbox();
            index.listen(&inbox, &["payments".to_string()]);
            receivers.push(rx);
        }
        let mut seq = 0u64;
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_function(BenchmarkId::new("deliver", subscribers), |b| {
            b.iter(|| {
                seq += 1;
                let frame = Arc::new(Frame {
                    audience: None,
                    seq,
                    topic: "payments".into(),
                    text: Utf8Bytes::from_static("{}"),
                });
                let done = index.deliver(&frame);
                for rx in &mut receivers {
                    let _ = rx.try_recv();
                }
                done
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    signature,
    diff,
    frame_encoding,
    topic_rules,
    topic_matching,
    fan_out
);
criterion_main!(benches);
