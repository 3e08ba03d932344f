//! The status a reconcile reports, as a pure function of what it observed and of the previous
//! status: conditions with reasons and messages, `lastTransitionTime` that moves only when a
//! condition's status changes, `observedGeneration`, and the transitions to announce as Events.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use shotover_crds::crd::{ShotoverTopologyStatus, SidecarStatus};

use crate::reports::{Running, Standing};

pub const READY: &str = "Ready";
pub const CONFIG_VALID: &str = "ConfigValid";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const PAUSED: &str = "ReconciliationPaused";
pub const SIDECARS: &str = "SidecarsUpToDate";

/// What one reconcile saw and did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observation {
    /// `metadata.generation` of the topology.
    pub generation: Option<i64>,
    /// The topology rendered: its hash; or why not.
    pub config: ConfigOutcome,
    /// The spec that rendered, when it did.
    pub valid_spec: Option<serde_json::Value>,
    /// A write to the apiserver failed (the message says which).
    pub apply_error: Option<String>,
    /// The conditions' reason for it (default `ApplyFailed`; `NotOwned`).
    pub apply_reason: Option<&'static str>,
    /// Secrets of `spec.tlsSecrets` that do not exist (or could not be read), each as a
    /// sentence.
    pub secrets: Vec<String>,
    /// DB-side mode: the StatefulSet as last seen.
    pub db_side: Option<DbSideObservation>,
    /// The live application Pods that name this topology (`None` when Pods are not watched).
    pub pods: Option<Vec<PodObservation>>,
}

/// One live Pod that names the topology.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodObservation {
    pub name: String,
    /// The config hash its sidecar was injected with; `None` when it has no sidecar.
    pub injected_hash: Option<String>,
    /// Where its sidecar answers `/config`, once it runs.
    pub address: Option<std::net::SocketAddr>,
    /// What its sidecar says it runs.
    pub running: Running,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ConfigOutcome {
    Valid { hash: String, config_map: String },
    Invalid { message: String },
}

impl Default for ConfigOutcome {
    fn default() -> Self {
        ConfigOutcome::Invalid {
            message: String::new(),
        }
    }
}

/// The StatefulSet of the DB-side tier, as far as the status needs it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DbSideObservation {
    /// `spec.dbSide.replicas`.
    pub desired: i32,
    /// `None` while the StatefulSet does not exist.
    pub stateful_set: Option<StatefulSetProgress>,
    /// Why proxy Pods do not run, `pod: problem` each (from `pods::pod_problem`).
    pub problems: Vec<String>,
    /// A proxy Pod waits for a node, not yet for long enough to be a problem: reconcile
    /// again when it would be.
    pub waiting_for_node: bool,
    /// The live proxy Pods by name, and what each says it runs.
    pub proxies: Vec<(String, Running)>,
    /// The proxy Pods' label selector (`status.selector`, for the scale subresource).
    pub selector: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct StatefulSetProgress {
    pub generation: Option<i64>,
    pub observed_generation: Option<i64>,
    pub replicas: i32,
    pub ready_replicas: i32,
    pub updated_replicas: i32,
    pub current_revision: Option<String>,
    pub update_revision: Option<String>,
}

impl StatefulSetProgress {
    pub fn from_stateful_set(sts: &k8s_openapi::api::apps::v1::StatefulSet) -> Self {
        let status = sts.status.clone().unwrap_or_default();
        StatefulSetProgress {
            generation: sts.metadata.generation,
            observed_generation: status.observed_generation,
            replicas: status.replicas,
            ready_replicas: status.ready_replicas.unwrap_or(0),
            updated_replicas: status.updated_replicas.unwrap_or(0),
            current_revision: status.current_revision,
            update_revision: status.update_revision,
        }
    }
}

/// A condition whose status changed (or appeared): what an Event announces.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    /// A change for the worse (an invalid config, a failed write): a Warning Event.
    pub warning: bool,
}

struct Want {
    type_: &'static str,
    status: bool,
    reason: String,
    message: String,
}

fn want(type_: &'static str, status: bool, reason: &str, message: impl Into<String>) -> Want {
    Want {
        type_,
        status,
        reason: reason.to_owned(),
        message: message.into(),
    }
}

/// The status after a reconcile that observed `obs`.
pub fn reconciled(
    previous: Option<&ShotoverTopologyStatus>,
    obs: &Observation,
    now: &Time,
) -> (ShotoverTopologyStatus, Vec<Transition>) {
    let previous_hash = previous.and_then(|s| s.config_hash.clone());
    let (config_hash, config_map, last_valid_spec) = match &obs.config {
        ConfigOutcome::Valid { hash, config_map } if obs.apply_error.is_none() => (
            Some(hash.clone()),
            Some(config_map.clone()),
            obs.valid_spec
                .clone()
                .or_else(|| previous.and_then(|s| s.last_valid_spec.clone())),
        ),
        _ => (
            previous_hash.clone(),
            previous.and_then(|s| s.config_map.clone()),
            previous.and_then(|s| s.last_valid_spec.clone()),
        ),
    };

    let config_valid = match &obs.config {
        ConfigOutcome::Valid { hash, .. } => want(
            CONFIG_VALID,
            true,
            "Valid",
            format!("topology.yaml and config.yaml rendered, hash {hash}"),
        ),
        ConfigOutcome::Invalid { message } => want(CONFIG_VALID, false, "InvalidTopology", message),
    };

    let rollout = obs
        .db_side
        .as_ref()
        .map(|d| rollout_state(d, config_hash.as_deref()));
    let invalid = matches!(obs.config, ConfigOutcome::Invalid { .. });
    let nothing_deployed = obs
        .db_side
        .as_ref()
        .is_some_and(|d| d.stateful_set.is_none());
    let progressing = match &rollout {
        _ if obs.apply_error.is_some() && rollout.is_none() => want(
            PROGRESSING,
            false,
            "ApplyFailed",
            "nothing rolls out until the writes succeed (see Degraded)",
        ),
        Some(_) if invalid && nothing_deployed => want(
            PROGRESSING,
            false,
            "InvalidTopology",
            "nothing to roll out until the topology is valid",
        ),
        None => want(
            PROGRESSING,
            false,
            "ConfigMapUpToDate",
            "no DB-side proxies to roll out",
        ),
        Some(Rollout::Done { message }) => want(PROGRESSING, false, "RolloutComplete", message),
        Some(Rollout::Pending { reason, message }) => want(PROGRESSING, true, reason, message),
    };

    let degraded = match (&obs.config, &obs.apply_error) {
        (_, Some(error)) => want(
            DEGRADED,
            true,
            obs.apply_reason.unwrap_or("ApplyFailed"),
            error,
        ),
        (ConfigOutcome::Invalid { .. }, None) => want(
            DEGRADED,
            true,
            "InvalidTopology",
            match &previous_hash {
                Some(hash) => format!(
                    "the topology is invalid (see ConfigValid); the last valid configuration, hash {hash}, stays in place"
                ),
                None => "the topology is invalid (see ConfigValid) and no valid configuration was ever rendered".to_owned(),
            },
        ),
        (ConfigOutcome::Valid { .. }, None) if !obs.secrets.is_empty() => {
            want(DEGRADED, true, "SecretMissing", summary(&obs.secrets))
        }
        (ConfigOutcome::Valid { hash, .. }, None) => {
            let problems: Vec<String> = obs
                .db_side
                .iter()
                .flat_map(|d| {
                    let refusals = d.proxies.iter().filter_map(|(name, running)| {
                        match running.standing(hash) {
                            Standing::Refused(error) => {
                                Some(format!("{name}: refused configuration {hash}: {error}"))
                            }
                            _ => None,
                        }
                    });
                    d.problems.iter().cloned().chain(refusals)
                })
                .collect();
            if problems.is_empty() {
                want(DEGRADED, false, "AsExpected", "nothing is failing")
            } else {
                want(DEGRADED, true, "ProxiesFailing", summary(&problems))
            }
        }
    };

    let ready = match (&obs.config, &obs.apply_error, &rollout) {
        (ConfigOutcome::Invalid { .. }, _, _) => want(
            READY,
            false,
            "InvalidTopology",
            "the topology is invalid (see ConfigValid)",
        ),
        (_, Some(error), _) => want(
            READY,
            false,
            obs.apply_reason.unwrap_or("ApplyFailed"),
            error,
        ),
        (ConfigOutcome::Valid { .. }, None, _) if !obs.secrets.is_empty() => want(
            READY,
            false,
            "SecretMissing",
            format!("{} (see Degraded)", summary(&obs.secrets)),
        ),
        (ConfigOutcome::Valid { hash, .. }, None, None) => want(
            READY,
            true,
            "ConfigRendered",
            format!("configuration {hash} is in the ConfigMap"),
        ),
        (ConfigOutcome::Valid { .. }, None, Some(Rollout::Done { message })) => {
            want(READY, true, "ProxiesReady", message)
        }
        (ConfigOutcome::Valid { .. }, None, Some(Rollout::Pending { reason, message })) => {
            want(READY, false, reason, message)
        }
    };

    let paused = want(
        PAUSED,
        false,
        "NotPaused",
        "reconciling (set the annotation shotover.io/paused: \"true\" to pause)",
    );

    let (sidecars, sidecar_condition) = match &obs.pods {
        Some(pods) => {
            let (counts, condition) = sidecars(pods, config_hash.as_deref());
            (Some(counts), Some(condition))
        }
        None => (previous.and_then(|p| p.sidecars.clone()), None),
    };
    let stateful_set = obs.db_side.as_ref().and_then(|d| d.stateful_set.as_ref());
    let status = ShotoverTopologyStatus {
        observed_generation: obs.generation,
        conditions: Vec::new(),
        config_hash,
        config_map,
        last_valid_spec,
        replicas: stateful_set.map(|s| s.replicas),
        ready_replicas: stateful_set.map(|s| s.ready_replicas),
        selector: obs.db_side.as_ref().and_then(|d| d.selector.clone()),
        sidecars,
    };
    let mut wanted = vec![ready, config_valid, progressing, degraded, paused];
    wanted.extend(sidecar_condition);
    merge(previous, status, wanted, obs.generation, now)
}

/// At most this many Pod names in a message.
const NAMES_SHOWN: usize = 5;

/// The first problems, and how many more.
fn summary(problems: &[String]) -> String {
    let mut out = problems[..problems.len().min(NAMES_SHOWN)].join("; ");
    if problems.len() > NAMES_SHOWN {
        out.push_str(&format!("; and {} more", problems.len() - NAMES_SHOWN));
    }
    out
}

fn some_names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.collect();
    let mut text = names
        .iter()
        .take(NAMES_SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > NAMES_SHOWN {
        text.push_str(&format!(" and {} more", names.len() - NAMES_SHOWN));
    }
    text
}

/// The sidecar counts and the `SidecarsUpToDate` condition, from what the running sidecars
/// say they run.
fn sidecars(pods: &[PodObservation], hash: Option<&str>) -> (SidecarStatus, Want) {
    let injected: Vec<&PodObservation> =
        pods.iter().filter(|p| p.injected_hash.is_some()).collect();
    let mut outdated = Vec::new();
    let mut unreported = Vec::new();
    let mut current = 0;
    let mut not_started = 0;
    for pod in &injected {
        let Some(hash) = hash else { break };
        match pod.running.standing(hash) {
            Standing::Current => current += 1,
            Standing::NotStarted => not_started += 1,
            Standing::Unreported(why) => unreported.push(format!("{} ({why})", pod.name)),
            standing => outdated.push(format!(
                "{} ({})",
                pod.name,
                standing.why_not().unwrap_or_default()
            )),
        }
    }
    let missing: Vec<&PodObservation> = pods.iter().filter(|p| p.injected_hash.is_none()).collect();
    let counts = SidecarStatus {
        injected: injected.len() as i32,
        outdated: outdated.len() as i32,
        unreported: unreported.len() as i32,
        not_injected: missing.len() as i32,
    };
    let not_started_yet = if not_started > 0 {
        format!(" ({not_started} not started yet)")
    } else {
        String::new()
    };
    let condition = if !missing.is_empty() {
        want(
            SIDECARS,
            false,
            "NotInjected",
            format!(
                "{} Pods asked for the sidecar but run without it (created while the webhook was unreachable, with failurePolicy Ignore): {}; delete them to have them recreated with it",
                missing.len(),
                some_names(missing.iter().map(|p| p.name.as_str()))
            ),
        )
    } else if !outdated.is_empty() {
        want(
            SIDECARS,
            false,
            "Outdated",
            format!(
                "{} of {} running sidecars do not run configuration {}: {}; a sidecar reloads once the kubelet updates its ConfigMap volume (within its sync period, about a minute)",
                outdated.len(),
                injected.len() - not_started,
                hash.unwrap_or_default(),
                summary(&outdated)
            ),
        )
    } else if !unreported.is_empty() {
        want(
            SIDECARS,
            false,
            "Unreported",
            format!(
                "{} of {} running sidecars did not say what they run (GET /config on their observability port): {}",
                unreported.len(),
                injected.len() - not_started,
                summary(&unreported)
            ),
        )
    } else {
        want(
            SIDECARS,
            true,
            "UpToDate",
            match hash {
                Some(hash) if !injected.is_empty() => {
                    format!("{current} running sidecars run configuration {hash}{not_started_yet}")
                }
                _ => "no Pods run this topology as a sidecar".to_owned(),
            },
        )
    };
    (counts, condition)
}

/// Whether a proxy (sidecar or DB-side) is behind or silent: the operator asks again soon.
pub fn proxies_behind(obs: &Observation, status: &ShotoverTopologyStatus) -> bool {
    let Some(hash) = status.config_hash.as_deref() else {
        return false;
    };
    let behind = |running: &Running| {
        !matches!(
            running.standing(hash),
            Standing::Current | Standing::NotStarted
        )
    };
    obs.pods
        .iter()
        .flatten()
        .any(|p| p.injected_hash.is_some() && behind(&p.running))
        || obs
            .db_side
            .iter()
            .flat_map(|d| &d.proxies)
            .any(|(_, running)| behind(running))
}

/// The status while `shotover.io/paused` is `"true"`: everything as before, plus
/// `ReconciliationPaused=True` for the current generation.
pub fn paused(
    previous: Option<&ShotoverTopologyStatus>,
    generation: Option<i64>,
    now: &Time,
) -> (ShotoverTopologyStatus, Vec<Transition>) {
    let status = previous.cloned().unwrap_or_default();
    let condition = want(
        PAUSED,
        true,
        "PausedByAnnotation",
        "the annotation shotover.io/paused is \"true\": changes to this topology are not rendered or applied until it is removed",
    );
    merge(previous, status, vec![condition], generation, now)
}

/// Sets `wanted` on `status` (keeping conditions not in `wanted` from `previous`), with
/// `lastTransitionTime` kept wherever the status did not change.
fn merge(
    previous: Option<&ShotoverTopologyStatus>,
    mut status: ShotoverTopologyStatus,
    wanted: Vec<Want>,
    generation: Option<i64>,
    now: &Time,
) -> (ShotoverTopologyStatus, Vec<Transition>) {
    let before: &[Condition] = previous.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let mut conditions: Vec<Condition> = before
        .iter()
        .filter(|c| !wanted.iter().any(|w| w.type_ == c.type_))
        .cloned()
        .collect();
    let mut transitions = Vec::new();
    for w in wanted {
        let status_text = if w.status { "True" } else { "False" };
        let old = before.iter().find(|c| c.type_ == w.type_);
        let changed = old.is_none_or(|c| c.status != status_text);
        // For the sidecars, a different reason is news too (outdated, then not injected).
        let announce =
            changed || (w.type_ == SIDECARS && old.is_some_and(|c| c.reason != w.reason));
        let last_transition_time = match old {
            Some(c) if !changed => c.last_transition_time.clone(),
            _ => now.clone(),
        };
        // A condition appearing in its quiet state (not paused, not degraded, not
        // progressing) is not news.
        let quiet_start = old.is_none()
            && ((matches!(w.type_, PAUSED | DEGRADED | PROGRESSING) && !w.status)
                || (w.type_ == SIDECARS && w.status));
        if announce && !quiet_start {
            transitions.push(Transition {
                type_: w.type_.to_owned(),
                status: status_text.to_owned(),
                reason: w.reason.clone(),
                message: w.message.clone(),
                warning: bad(&w),
            });
        }
        conditions.push(Condition {
            type_: w.type_.to_owned(),
            status: status_text.to_owned(),
            reason: w.reason,
            message: truncate(w.message, 32 * 1024),
            observed_generation: generation,
            last_transition_time,
        });
    }
    conditions.sort_by_key(|c| condition_order(&c.type_));
    status.conditions = conditions;
    (status, transitions)
}

/// Whether a condition in this state means something is wrong.
fn bad(w: &Want) -> bool {
    match w.type_ {
        CONFIG_VALID => !w.status,
        DEGRADED => w.status,
        // Pods without their sidecar are worth a Warning; outdated ones are expected after
        // every change.
        SIDECARS => w.reason == "NotInjected",
        _ => false,
    }
}

fn condition_order(type_: &str) -> usize {
    [READY, CONFIG_VALID, PROGRESSING, DEGRADED, PAUSED, SIDECARS]
        .iter()
        .position(|t| *t == type_)
        .unwrap_or(usize::MAX)
}

/// The API limits a condition message to 32 KiB.
fn truncate(mut message: String, max: usize) -> String {
    if message.len() > max {
        let mut cut = max - 3;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str("...");
    }
    message
}

enum Rollout {
    Done {
        message: String,
    },
    Pending {
        reason: &'static str,
        message: String,
    },
}

/// Where the rollout of the configuration `hash` (the last valid one) stands.
fn rollout_state(db_side: &DbSideObservation, hash: Option<&str>) -> Rollout {
    let desired = db_side.desired;
    let Some(sts) = &db_side.stateful_set else {
        return Rollout::Pending {
            reason: "Creating",
            message: "the StatefulSet is being created".to_owned(),
        };
    };
    let seen = match (sts.generation, sts.observed_generation) {
        (Some(generation), Some(observed)) => observed >= generation,
        (Some(_), None) => false,
        (None, _) => true,
    };
    let revisions_match = match (&sts.current_revision, &sts.update_revision) {
        (Some(current), Some(update)) => current == update,
        _ => true,
    };
    if !seen || sts.updated_replicas < desired || !revisions_match {
        return Rollout::Pending {
            reason: "RollingOut",
            message: format!(
                "{} of {desired} proxies run the current configuration",
                sts.updated_replicas.min(desired)
            ),
        };
    }
    if sts.ready_replicas < desired {
        let mut message = format!("{} of {desired} proxies ready", sts.ready_replicas);
        if !db_side.problems.is_empty() {
            message.push_str(" (see Degraded)");
        }
        return Rollout::Pending {
            reason: "WaitingForProxies",
            message,
        };
    }
    // Every proxy runs the current Pod template and is ready: do they run the configuration?
    // (They reload it once the kubelet has updated their ConfigMap volume.)
    if let Some(hash) = hash {
        let mut current = 0;
        let mut behind = Vec::new();
        for (name, running) in &db_side.proxies {
            match running.standing(hash).why_not() {
                None => current += 1,
                Some(why) => behind.push(format!("{name} {why}")),
            }
        }
        if !behind.is_empty() {
            return Rollout::Pending {
                reason: "Reloading",
                message: format!(
                    "{} of {desired} proxies run configuration {hash}; {}",
                    current.min(desired),
                    summary(&behind)
                ),
            };
        }
    }
    Rollout::Done {
        message: format!("{desired} of {desired} proxies ready"),
    }
}

#[cfg(test)]
mod tests;
