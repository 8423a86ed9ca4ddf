//! Property tests standing in for a fuzzer (cargo fuzz needs nightly compiler features; these run
//! on the stable toolchain in every CI run): every payload parser, signature check, client-frame parser, topic rule
//! and agent path check is fed arbitrary input and must answer with a value or an error, never a
//! panic; and a valid signature over any body verifies while any altered body does not.

use axum::http::{HeaderMap, HeaderValue};
use confcast::config::{
    GenericWebhook, HmacAlgorithm, Provider, Secret, SignatureEncoding, WebhookConfig,
};
use confcast::webhook::{receive, Intake, WebhookError};
use proptest::prelude::*;

const EVENTS: &[(&str, &str)] = &[
    ("x-github-event", "push"),
    ("x-github-event", "ping"),
    ("x-gitlab-event", "Push Hook"),
    ("x-gitea-event", "push"),
    ("x-forgejo-event", "push"),
    ("x-gogs-event", "push"),
    ("x-event-key", "repo:push"),
    ("x-event-key", "repo:refs_changed"),
];

fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(*k, v);
        }
    }
    h
}

fn generic() -> WebhookConfig {
    WebhookConfig {
        provider: Provider::Generic,
        generic: Some(GenericWebhook {
            header: "X-Sig".into(),
            algorithm: HmacAlgorithm::Sha512,
            encoding: SignatureEncoding::Base64,
            prefix: "v=".into(),
            ref_pointer: None,
        }),
        ..Default::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn intake_never_panics_on_arbitrary_requests(
        event in 0..EVENTS.len(),
        body in proptest::collection::vec(any::<u8>(), 0..2048),
        sig in ".{0,200}",
        token in ".{0,64}",
        content_type in prop_oneof![Just("application/json".to_string()), Just("application/x-www-form-urlencoded".to_string()), ".{0,40}"],
        ts in ".{0,20}",
    ) {
        let (name, value) = EVENTS[event];
        let h = headers(&[
            (name, value.to_string()),
            ("x-hub-signature-256", sig.clone()),
            ("x-hub-signature", sig.clone()),
            ("x-gitea-signature", sig.clone()),
            ("x-forgejo-signature", sig.clone()),
            ("x-gogs-signature", sig.clone()),
            ("x-gitlab-token", token),
            ("webhook-id", "msg".into()),
            ("webhook-timestamp", ts),
            ("webhook-signature", sig.clone()),
            ("x-sig", sig),
            ("content-type", content_type),
        ]);
        let secrets = [Secret::new("s"), Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")];
        let _ = receive(&h, &body, &WebhookConfig::default(), &secrets, 1_700_000_000);
        let _ = receive(&h, &body, &generic(), &secrets, 1_700_000_000);
    }

    #[test]
    fn signed_bodies_of_any_shape_parse_or_fail_cleanly(body in proptest::collection::vec(any::<u8>(), 0..4096)) {
        // With a valid signature the body reaches the parser: it must return, not panic.
        let sig = confcast::webhook::github::sign(b"s", &body);
        for event in ["push", "ping", "issues"] {
            let h = headers(&[("x-github-event", event.into()), ("x-hub-signature-256", sig.clone())]);
            match receive(&h, &body, &WebhookConfig::default(), &[Secret::new("s")], 0) {
                Ok(d) => prop_assert!(matches!(d.intake, Intake::Push(_) | Intake::Ping | Intake::Ignored(_))),
                Err(e) => prop_assert!(matches!(e, WebhookError::Malformed(_)), "{e:?}"),
            }
        }
        let bb = format!("sha256={}", &sig["sha256=".len()..]);
        for key in ["repo:push", "repo:refs_changed", "diagnostics:ping"] {
            let h = headers(&[("x-event-key", key.into()), ("x-hub-signature", bb.clone())]);
            if let Err(e) = receive(&h, &body, &WebhookConfig::default(), &[Secret::new("s")], 0) {
                prop_assert!(matches!(e, WebhookError::Malformed(_)), "{e:?}");
            }
        }
    }

    #[test]
    fn a_signature_covers_exactly_its_body(body in proptest::collection::vec(any::<u8>(), 1..512), flip in any::<usize>()) {
        let sig = confcast::webhook::github::sign(b"k", &body);
        let h = headers(&[("x-github-event", "zen".into()), ("x-hub-signature-256", sig)]);
        prop_assert!(receive(&h, &body, &WebhookConfig::default(), &[Secret::new("k")], 0).is_ok());
        let mut altered = body.clone();
        let i = flip % altered.len();
        altered[i] ^= 0x01;
        prop_assert_eq!(receive(&h, &altered, &WebhookConfig::default(), &[Secret::new("k")], 0).err(), Some(WebhookError::BadSignature));
    }

    #[test]
    fn client_frames_never_panic(text in ".{0,300}") {
        let _ = serde_json::from_str::<confcast::protocol::ClientMessage>(&text);
        let wrapped = format!(r#"{{"type":"subscribe","topics":[{}],"since":{}}}"#, serde_json::json!(text), text.len());
        let _ = serde_json::from_str::<confcast::protocol::ClientMessage>(&wrapped);
        let _ = confcast::protocol::validate_pattern(&text);
        let _ = confcast::protocol::topic_matches(&text, "payments/eu");
    }

    #[test]
    fn topic_rules_compile_or_refuse(pattern in "[a-z*?/{}0-9.]{0,20}", topic in "[a-z{}0-9/]{0,12}", path in "[a-z/.]{0,30}") {
        let rule = confcast::sync::rules::TopicRule { pattern, topic, validate: None };
        if let Ok(rules) = confcast::sync::rules::TopicRules::compile(&[rule]) {
            let _ = rules.topic_of(&path);
            let _ = rules.format_of(&path);
        }
    }

    #[test]
    fn agent_paths_stay_inside(path in "(\\.[gG][iI][tT]|[a-z./\\\\]){0,20}") {
        if let Ok(clean) = confcast::agent::safe_path(&path) {
            prop_assert!(clean.is_relative());
            prop_assert!(clean.components().all(|c| matches!(c, std::path::Component::Normal(_))));
            prop_assert!(clean.components().all(|c| !c.as_os_str().eq_ignore_ascii_case(".git")), "{path:?}");
        }
    }

    #[test]
    fn content_is_never_larger_in_json_than_in_base64(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        text in "[\\x00-\\x20\"\\\\a-z\u{e9}\u{7f}]{0,300}",
    ) {
        use confcast::protocol::{decode_content, encode_content};
        // The frame bound (`LimitsConfig::max_frame_bytes`) counts content at its base64 size.
        for input in [bytes.as_slice(), text.as_bytes()] {
            let (content, encoding) = encode_content(input);
            let json = serde_json::to_string(&content).expect("serializes");
            prop_assert!(json.len() - 2 <= input.len().div_ceil(3) * 4, "{input:?} as {encoding:?}");
            prop_assert_eq!(decode_content(&content, encoding).expect("decodes"), input);
        }
    }

    #[test]
    fn validators_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        use confcast::sync::validate::{check, Format};
        for f in [Format::Toml, Format::Json, Format::Yaml] {
            let _ = check(f, &bytes);
        }
    }
}
