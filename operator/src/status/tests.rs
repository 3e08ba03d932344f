use super::*;
use crate::reports::{Refused, Report};
use k8s_openapi::jiff::Timestamp;

fn at(seconds: i64) -> Time {
    Time(Timestamp::from_second(1_800_000_000 + seconds).expect("timestamp"))
}

fn valid(generation: i64) -> Observation {
    Observation {
        generation: Some(generation),
        config: ConfigOutcome::Valid {
            hash: format!("hash{generation}"),
            config_map: "cache-shotover-config".to_owned(),
        },
        valid_spec: Some(serde_json::json!({"generation": generation})),
        apply_error: None,
        apply_reason: None,
        secrets: Vec::new(),
        db_side: None,
        pods: None,
    }
}

fn invalid(generation: i64) -> Observation {
    Observation {
        generation: Some(generation),
        config: ConfigOutcome::Invalid {
            message: "invalid topology (1 error):\n  spec.sources[0]: bad".to_owned(),
        },
        valid_spec: None,
        apply_error: None,
        apply_reason: None,
        secrets: Vec::new(),
        db_side: None,
        pods: None,
    }
}

fn condition<'a>(status: &'a ShotoverTopologyStatus, type_: &str) -> &'a Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status:?}"))
}

fn summary(status: &ShotoverTopologyStatus) -> Vec<(String, String, String)> {
    status
        .conditions
        .iter()
        .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
        .collect()
}

fn row(type_: &str, status: &str, reason: &str) -> (String, String, String) {
    (type_.to_owned(), status.to_owned(), reason.to_owned())
}

fn sts(
    replicas: i32,
    ready: i32,
    updated: i32,
    current: &str,
    update: &str,
) -> StatefulSetProgress {
    StatefulSetProgress {
        generation: Some(2),
        observed_generation: Some(2),
        replicas,
        ready_replicas: ready,
        updated_replicas: updated,
        current_revision: Some(current.to_owned()),
        update_revision: Some(update.to_owned()),
    }
}

#[test]
fn a_valid_sidecar_only_topology_is_ready_once_rendered() {
    let (status, transitions) = reconciled(None, &valid(1), &at(0));
    assert_eq!(
        summary(&status),
        vec![
            row(READY, "True", "ConfigRendered"),
            row(CONFIG_VALID, "True", "Valid"),
            row(PROGRESSING, "False", "ConfigMapUpToDate"),
            row(DEGRADED, "False", "AsExpected"),
            row(PAUSED, "False", "NotPaused"),
        ]
    );
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.config_hash.as_deref(), Some("hash1"));
    assert_eq!(status.config_map.as_deref(), Some("cache-shotover-config"));
    assert_eq!(status.replicas, None);
    assert!(
        status
            .conditions
            .iter()
            .all(|c| c.observed_generation == Some(1))
    );
    // Conditions appearing in their quiet state are not news.
    let announced: Vec<&str> = transitions.iter().map(|t| t.type_.as_str()).collect();
    assert_eq!(announced, vec![READY, CONFIG_VALID]);
    assert!(transitions.iter().all(|t| !t.warning));
}

#[test]
fn last_transition_time_moves_only_when_the_status_changes() {
    let (first, _) = reconciled(None, &valid(1), &at(0));
    let (second, transitions) = reconciled(Some(&first), &valid(2), &at(60));
    assert!(transitions.is_empty(), "{transitions:?}");
    for c in &second.conditions {
        assert_eq!(c.last_transition_time, at(0), "{}", c.type_);
        assert_eq!(c.observed_generation, Some(2), "{}", c.type_);
    }
    assert_eq!(second.config_hash.as_deref(), Some("hash2"));

    let (third, transitions) = reconciled(Some(&second), &invalid(3), &at(120));
    assert_eq!(
        condition(&third, CONFIG_VALID).last_transition_time,
        at(120)
    );
    assert_eq!(condition(&third, READY).last_transition_time, at(120));
    assert_eq!(condition(&third, DEGRADED).last_transition_time, at(120));
    assert_eq!(condition(&third, PROGRESSING).last_transition_time, at(0));
    let announced: Vec<(&str, bool)> = transitions
        .iter()
        .map(|t| (t.type_.as_str(), t.warning))
        .collect();
    assert_eq!(
        announced,
        vec![(READY, false), (CONFIG_VALID, true), (DEGRADED, true)]
    );
}

#[test]
fn an_invalid_topology_keeps_the_last_good_hash_and_says_why() {
    let (good, _) = reconciled(None, &valid(1), &at(0));
    let (bad, _) = reconciled(Some(&good), &invalid(2), &at(10));
    assert_eq!(bad.observed_generation, Some(2));
    assert_eq!(bad.config_hash.as_deref(), Some("hash1"));
    // The spec of that configuration stays too, for the webhook to inject new Pods with.
    assert_eq!(
        bad.last_valid_spec,
        Some(serde_json::json!({"generation": 1}))
    );
    assert_eq!(bad.config_map.as_deref(), Some("cache-shotover-config"));
    let config_valid = condition(&bad, CONFIG_VALID);
    assert_eq!(config_valid.status, "False");
    assert_eq!(config_valid.reason, "InvalidTopology");
    assert_eq!(
        config_valid.message,
        "invalid topology (1 error):\n  spec.sources[0]: bad"
    );
    let degraded = condition(&bad, DEGRADED);
    assert_eq!(degraded.status, "True");
    assert!(
        degraded
            .message
            .contains("the last valid configuration, hash hash1, stays in place"),
        "{}",
        degraded.message
    );
    assert_eq!(condition(&bad, READY).status, "False");

    let (never, _) = reconciled(None, &invalid(1), &at(0));
    assert_eq!(never.config_hash, None);
    assert!(
        condition(&never, DEGRADED)
            .message
            .contains("no valid configuration was ever rendered")
    );
}

#[test]
fn db_side_readiness_comes_from_the_stateful_set() {
    let mut obs = valid(2);
    obs.db_side = Some(DbSideObservation {
        desired: 2,
        stateful_set: Some(sts(2, 0, 2, "r1", "r1")),
        ..DbSideObservation::default()
    });
    let (waiting, _) = reconciled(None, &obs, &at(0));
    assert_eq!(waiting.replicas, Some(2));
    assert_eq!(waiting.ready_replicas, Some(0));
    assert_eq!(
        summary(&waiting)[..3],
        [
            row(READY, "False", "WaitingForProxies"),
            row(CONFIG_VALID, "True", "Valid"),
            row(PROGRESSING, "True", "WaitingForProxies"),
        ]
    );
    assert_eq!(condition(&waiting, READY).message, "0 of 2 proxies ready");

    obs.db_side = Some(DbSideObservation {
        desired: 2,
        stateful_set: Some(sts(2, 2, 2, "r1", "r1")),
        ..DbSideObservation::default()
    });
    let (ready, transitions) = reconciled(Some(&waiting), &obs, &at(30));
    assert_eq!(ready.ready_replicas, Some(2));
    assert_eq!(condition(&ready, READY).status, "True");
    assert_eq!(condition(&ready, READY).reason, "ProxiesReady");
    assert_eq!(condition(&ready, PROGRESSING).status, "False");
    assert_eq!(condition(&ready, PROGRESSING).reason, "RolloutComplete");
    let announced: Vec<&str> = transitions.iter().map(|t| t.type_.as_str()).collect();
    assert_eq!(announced, vec![READY, PROGRESSING]);
}

#[test]
fn a_rollout_in_progress_is_progressing_until_every_pod_is_updated() {
    for (progress, reason) in [
        (sts(2, 2, 1, "r1", "r2"), "RollingOut"),
        (sts(2, 2, 2, "r1", "r2"), "RollingOut"),
        (
            StatefulSetProgress {
                observed_generation: Some(1),
                ..sts(2, 2, 2, "r2", "r2")
            },
            "RollingOut",
        ),
    ] {
        let mut obs = valid(2);
        obs.db_side = Some(DbSideObservation {
            desired: 2,
            stateful_set: Some(progress.clone()),
            ..DbSideObservation::default()
        });
        let (status, _) = reconciled(None, &obs, &at(0));
        let progressing = condition(&status, PROGRESSING);
        assert_eq!(progressing.status, "True", "{progress:?}");
        assert_eq!(progressing.reason, reason, "{progress:?}");
        assert_eq!(condition(&status, READY).status, "False");
    }
}

#[test]
fn an_invalid_topology_with_nothing_deployed_is_not_progressing() {
    let mut obs = invalid(1);
    obs.db_side = Some(DbSideObservation {
        desired: 2,
        stateful_set: None,
        ..DbSideObservation::default()
    });
    let (status, _) = reconciled(None, &obs, &at(0));
    assert_eq!(condition(&status, PROGRESSING).status, "False");
    assert_eq!(condition(&status, PROGRESSING).reason, "InvalidTopology");
    assert_eq!(status.replicas, None);
}

#[test]
fn a_failed_write_is_degraded_and_not_ready() {
    let mut obs = valid(1);
    obs.apply_error = Some("applying StatefulSet apps/cache-shotover: forbidden".to_owned());
    let (status, transitions) = reconciled(None, &obs, &at(0));
    let degraded = condition(&status, DEGRADED);
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "ApplyFailed")
    );
    assert!(degraded.message.contains("forbidden"));
    assert_eq!(condition(&status, READY).reason, "ApplyFailed");
    assert!(transitions.iter().any(|t| t.type_ == DEGRADED && t.warning));
}

#[test]
fn pausing_changes_only_the_paused_condition() {
    let (before, _) = reconciled(None, &valid(1), &at(0));
    let (paused_status, transitions) = paused(Some(&before), Some(2), &at(50));
    assert_eq!(
        paused_status.observed_generation,
        Some(1),
        "the new spec was not looked at"
    );
    let condition_paused = condition(&paused_status, PAUSED);
    assert_eq!(condition_paused.status, "True");
    assert_eq!(condition_paused.reason, "PausedByAnnotation");
    assert_eq!(condition_paused.observed_generation, Some(2));
    assert_eq!(condition_paused.last_transition_time, at(50));
    assert_eq!(condition(&paused_status, READY), condition(&before, READY));
    assert_eq!(transitions.len(), 1);
    assert_eq!(transitions[0].type_, PAUSED);

    let (resumed, transitions) = reconciled(Some(&paused_status), &valid(2), &at(90));
    assert_eq!(condition(&resumed, PAUSED).status, "False");
    assert_eq!(resumed.observed_generation, Some(2));
    assert!(
        transitions
            .iter()
            .any(|t| t.type_ == PAUSED && t.status == "False")
    );
}

#[test]
fn long_messages_are_cut_to_what_the_api_accepts() {
    let mut obs = invalid(1);
    obs.config = ConfigOutcome::Invalid {
        message: "é".repeat(40 * 1024),
    };
    let (status, _) = reconciled(None, &obs, &at(0));
    let message = &condition(&status, CONFIG_VALID).message;
    assert!(message.len() <= 32 * 1024);
    assert!(message.ends_with("..."));
}

fn pod(name: &str, hash: Option<&str>) -> PodObservation {
    PodObservation {
        name: name.to_owned(),
        injected_hash: hash.map(str::to_owned),
        ..PodObservation::default()
    }
}

/// A running sidecar whose proxy reports running `running`.
fn running(name: &str, injected: &str, running: &str) -> PodObservation {
    PodObservation {
        running: reported(running),
        ..pod(name, Some(injected))
    }
}

fn reported(hash: &str) -> Running {
    Running::Reported(Report {
        hash: hash.to_owned(),
        ..Report::default()
    })
}

#[test]
fn sidecars_are_counted_by_what_their_proxies_say_they_run() {
    // Generation 1: two Pods running hash1, quietly up to date.
    let mut obs = valid(1);
    obs.pods = Some(vec![
        running("web-a", "hash1", "hash1"),
        running("web-b", "hash1", "hash1"),
    ]);
    let (s1, t1) = reconciled(None, &obs, &at(0));
    assert_eq!(
        s1.sidecars,
        Some(SidecarStatus {
            injected: 2,
            outdated: 0,
            unreported: 0,
            not_injected: 0
        })
    );
    let c = condition(&s1, SIDECARS);
    assert_eq!(c.status, "True");
    assert_eq!(c.message, "2 running sidecars run configuration hash1");
    assert!(!t1.iter().any(|t| t.type_ == SIDECARS), "{t1:?}");

    // Generation 2 changes the config: both proxies still run the old one.
    let mut obs = valid(2);
    obs.pods = Some(vec![
        running("web-a", "hash1", "hash1"),
        running("web-b", "hash1", "hash1"),
    ]);
    let (s2, t2) = reconciled(Some(&s1), &obs, &at(10));
    assert_eq!(s2.sidecars.as_ref().map(|s| s.outdated), Some(2));
    let c = condition(&s2, SIDECARS);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "Outdated")
    );
    assert!(
        c.message.starts_with(
            "2 of 2 running sidecars do not run configuration hash2: web-a (runs hash1); web-b (runs hash1); a sidecar reloads once the kubelet updates"
        ),
        "{}",
        c.message
    );
    let t = t2.iter().find(|t| t.type_ == SIDECARS).expect("an Event");
    assert!(!t.warning, "outdated sidecars are expected after a change");
    assert!(proxies_behind(&obs, &s2), "asked again soon");

    // One reloaded (its Pod annotation still says hash1: what counts is what it runs), one
    // refused the new files.
    let mut obs = valid(2);
    let mut refusing = running("web-b", "hash1", "hash1");
    refusing.running = Running::Reported(Report {
        hash: "hash1".to_owned(),
        last_refused: Some(Refused {
            hash: Some("hash2".to_owned()),
            error: "binding 127.0.0.1:6379: address in use".to_owned(),
        }),
        ..Report::default()
    });
    obs.pods = Some(vec![running("web-a", "hash1", "hash2"), refusing]);
    let (s3, _) = reconciled(Some(&s2), &obs, &at(20));
    assert_eq!(
        s3.sidecars.as_ref().map(|s| (s.injected, s.outdated)),
        Some((2, 1))
    );
    assert!(
        condition(&s3, SIDECARS)
            .message
            .contains("web-b (refused it: binding 127.0.0.1:6379: address in use)"),
        "{}",
        condition(&s3, SIDECARS).message
    );

    // Both reloaded; a third Pod not started yet is not counted against anyone.
    let mut obs = valid(2);
    obs.pods = Some(vec![
        running("web-a", "hash1", "hash2"),
        running("web-b", "hash1", "hash2"),
        pod("web-c", Some("hash2")),
    ]);
    let (s4, t4) = reconciled(Some(&s3), &obs, &at(30));
    assert_eq!(
        s4.sidecars,
        Some(SidecarStatus {
            injected: 3,
            outdated: 0,
            unreported: 0,
            not_injected: 0
        })
    );
    let c = condition(&s4, SIDECARS);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "UpToDate"));
    assert_eq!(
        c.message,
        "2 running sidecars run configuration hash2 (1 not started yet)"
    );
    assert!(t4.iter().any(|t| t.type_ == SIDECARS));
    assert!(!proxies_behind(&obs, &s4));
}

#[test]
fn a_sidecar_that_does_not_answer_is_unreported_saying_why() {
    let mut obs = valid(1);
    let mut silent = pod("web-b", Some("hash1"));
    silent.running = Running::Unreachable("connecting: Connection refused".to_owned());
    obs.pods = Some(vec![running("web-a", "hash1", "hash1"), silent]);
    let (status, _) = reconciled(None, &obs, &at(0));
    assert_eq!(
        status.sidecars.as_ref().map(|s| (s.outdated, s.unreported)),
        Some((0, 1))
    );
    let c = condition(&status, SIDECARS);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "Unreported")
    );
    assert!(
        c.message.contains("web-b (connecting: Connection refused)"),
        "{}",
        c.message
    );
    assert!(proxies_behind(&obs, &status));
}

#[test]
fn db_side_proxies_that_reload_are_progressing_until_each_runs_the_new_hash() {
    let mut obs = valid(2);
    obs.db_side = Some(DbSideObservation {
        desired: 2,
        stateful_set: Some(sts(2, 2, 2, "r1", "r1")),
        proxies: vec![
            ("cache-shotover-0".to_owned(), reported("hash2")),
            ("cache-shotover-1".to_owned(), reported("hash1")),
        ],
        ..DbSideObservation::default()
    });
    let (status, _) = reconciled(None, &obs, &at(0));
    assert_eq!(
        summary(&status)[..3],
        [
            row(READY, "False", "Reloading"),
            row(CONFIG_VALID, "True", "Valid"),
            row(PROGRESSING, "True", "Reloading"),
        ]
    );
    assert_eq!(
        condition(&status, READY).message,
        "1 of 2 proxies run configuration hash2; cache-shotover-1 runs hash1"
    );
    assert_eq!(condition(&status, DEGRADED).status, "False");

    // The second refuses it: Degraded says why.
    let db_side = obs.db_side.as_mut().expect("db side");
    db_side.proxies[1].1 = Running::Reported(Report {
        hash: "hash1".to_owned(),
        last_refused: Some(Refused {
            hash: Some("hash2".to_owned()),
            error: "no such file".to_owned(),
        }),
        ..Report::default()
    });
    let (refused, _) = reconciled(Some(&status), &obs, &at(5));
    let degraded = condition(&refused, DEGRADED);
    assert_eq!(
        (degraded.status.as_str(), degraded.message.as_str()),
        (
            "True",
            "cache-shotover-1: refused configuration hash2: no such file"
        )
    );

    // Both run it: ready.
    let db_side = obs.db_side.as_mut().expect("db side");
    db_side.proxies[1].1 = reported("hash2");
    let (done, _) = reconciled(Some(&refused), &obs, &at(10));
    assert_eq!(condition(&done, READY).reason, "ProxiesReady");
    assert_eq!(condition(&done, DEGRADED).status, "False");
    assert!(!proxies_behind(&obs, &done));
}

#[test]
fn pods_created_without_their_sidecar_are_a_warning() {
    let mut obs = valid(1);
    obs.pods = Some(vec![pod("web-a", Some("hash1"))]);
    let (s1, _) = reconciled(None, &obs, &at(0));
    let mut obs = valid(1);
    obs.pods = Some(vec![
        pod("web-a", Some("hash1")),
        pod("web-b", None),
        pod("web-c", None),
    ]);
    let (s2, t2) = reconciled(Some(&s1), &obs, &at(5));
    assert_eq!(s2.sidecars.as_ref().map(|s| s.not_injected), Some(2));
    let c = condition(&s2, SIDECARS);
    assert_eq!(c.reason, "NotInjected");
    assert!(c.message.contains("web-b, web-c"), "{}", c.message);
    let t = t2.iter().find(|t| t.type_ == SIDECARS).expect("an Event");
    assert!(t.warning);
    // Without a Pod cache the counts stay as they were and no condition is set.
    let (s3, _) = reconciled(Some(&s2), &valid(1), &at(9));
    assert_eq!(s3.sidecars, s2.sidecars);
}

#[test]
fn proxies_that_do_not_run_make_the_topology_degraded_saying_why() {
    let mut obs = valid(2);
    obs.db_side = Some(DbSideObservation {
        desired: 2,
        stateful_set: Some(sts(2, 0, 2, "r1", "r1")),
        problems: vec![
            "cache-shotover-0: container shotover ErrImageNeverPull: no image".to_owned(),
            "cache-shotover-1: container shotover ErrImageNeverPull: no image".to_owned(),
        ],
        waiting_for_node: false,
        ..DbSideObservation::default()
    });
    let (status, transitions) = reconciled(None, &obs, &at(0));
    let degraded = condition(&status, DEGRADED);
    assert_eq!(degraded.status, "True");
    assert_eq!(degraded.reason, "ProxiesFailing");
    assert_eq!(
        degraded.message,
        "cache-shotover-0: container shotover ErrImageNeverPull: no image; cache-shotover-1: container shotover ErrImageNeverPull: no image"
    );
    assert_eq!(
        condition(&status, READY).message,
        "0 of 2 proxies ready (see Degraded)"
    );
    let warning = transitions
        .iter()
        .find(|t| t.type_ == DEGRADED)
        .expect("a Degraded transition");
    assert!(warning.warning, "announced as a Warning Event");

    // Fixed: no longer degraded, and that is announced too.
    obs.db_side = Some(DbSideObservation {
        desired: 2,
        stateful_set: Some(sts(2, 2, 2, "r1", "r1")),
        problems: Vec::new(),
        waiting_for_node: false,
        ..DbSideObservation::default()
    });
    let (fixed, transitions) = reconciled(Some(&status), &obs, &at(10));
    assert_eq!(condition(&fixed, DEGRADED).status, "False");
    assert!(transitions.iter().any(|t| t.type_ == DEGRADED));
}

#[test]
fn a_missing_tls_secret_is_degraded_and_not_ready_saying_which() {
    let mut obs = valid(1);
    obs.secrets = vec![
        "Secret apps/redis-tls (spec.tlsSecrets) does not exist: the proxies that mount it do not start until it does".to_owned(),
    ];
    let (status, transitions) = reconciled(None, &obs, &at(0));
    let degraded = condition(&status, DEGRADED);
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "SecretMissing")
    );
    assert!(degraded.message.starts_with("Secret apps/redis-tls"));
    let ready = condition(&status, READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "SecretMissing")
    );
    assert!(ready.message.ends_with("(see Degraded)"));
    assert!(transitions.iter().any(|t| t.type_ == DEGRADED && t.warning));
    // It appears: ready.
    let (fixed, _) = reconciled(Some(&status), &valid(1), &at(10));
    assert_eq!(condition(&fixed, READY).reason, "ConfigRendered");
    assert_eq!(condition(&fixed, DEGRADED).status, "False");
}
