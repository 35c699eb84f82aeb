//! Counters and histograms in Prometheus form: what the host received, what plugins did.

use std::any::Any;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

use crate::http::{Direction, Phase};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResponseLabels {
    chain: String,
    plugin: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    chain: String,
    plugin: String,
    phase: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabel {
    chain: String,
    plugin: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShadowFailureLabels {
    chain: String,
    plugin: String,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginPhaseLabels {
    chain: String,
    plugin: String,
    phase: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabel {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnswerLabel {
    answer: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Every (listener, reason) a client can be refused for.
pub const REFUSALS: [(&str, &str); 6] = [
    ("admin", "missing_token"),
    ("admin", "wrong_token"),
    ("admin", "not_local"),
    ("admin", "token_unavailable"),
    ("ext_proc", "identity"),
    ("ext_proc", "overload"),
];

/// Every outcome a plugin call can have: `ok`, or a failure kind.
pub const OUTCOMES: [&str; 9] = [
    "ok",
    "trap",
    "deadline",
    "memory_limit",
    "invalid_output",
    "instantiate",
    "body_too_large",
    "quarantined",
    "body_budget",
];

/// The host's metrics. Cheap to share.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    messages: Family<PhaseLabel, Counter>,
    /// `messages` per phase, resolved once: counting a message is one atomic add.
    messages_by_phase: [Counter; 6],
    /// `message_seconds` per phase, resolved once.
    message_seconds_by_phase: [Histogram; 6],
    calls: Family<CallLabels, Counter>,
    responses: Family<ResponseLabels, Counter>,
    call_seconds: Family<PluginPhaseLabels, Histogram>,
    instantiate_seconds: Family<PluginLabel, Histogram>,
    active_streams: Gauge,
    streams: Counter,
    idle_streams: Counter,
    bodies_over_budget: Counter,
    reloads: Family<ResultLabel, Counter>,
    log_lines_suppressed: Family<PluginLabel, Counter>,
    shadow_differences: Family<PluginLabel, Counter>,
    shadow_failures: Family<ShadowFailureLabels, Counter>,
    bodies_not_sent: Family<DirectionLabel, Counter>,
    refused: Family<RefusalLabel, Counter>,
    unknown_chains: Family<AnswerLabel, Counter>,
    pool: PoolMetrics,
    /// Families a capability registers for itself ([`family`](Metrics::family)).
    families: Mutex<Families>,
    /// Every plugin that has had series, as (chain, plugin), for [`samples`](Metrics::samples).
    plugins: Mutex<BTreeSet<(String, String)>>,
}

/// The families capabilities registered, and each by name.
#[derive(Debug)]
struct Families {
    registry: Registry,
    by_name: HashMap<&'static str, Box<dyn Any + Send + Sync>>,
}

/// One counter or gauge series and its value now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The series' name, without the `wasm_extproc_` prefix.
    pub name: &'static str,
    /// Label names and values, in the order the series defines them.
    pub labels: Vec<(String, String)>,
    pub value: u64,
    pub kind: SampleKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleKind {
    Counter,
    Gauge,
}

/// The instance pool's series, updated by the runtime.
#[derive(Debug, Clone, Default)]
pub struct PoolMetrics {
    /// Plugin instances alive now.
    pub in_use: Gauge,
    /// How many may be: `[runtime] max_instances`.
    pub size: Gauge,
    /// Instantiations that found the pool full and waited.
    pub waits: Counter,
    /// Instantiations that gave up waiting: the plugin's failure policy applied.
    pub exhausted: Counter,
}

/// Plugin calls take microseconds to milliseconds; buckets from 1 µs to ~16 s.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-6, 4.0, 13))
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("wasm_extproc");
        let messages = Family::<PhaseLabel, Counter>::default();
        registry.register(
            "messages_received",
            "ext_proc messages received from Envoy, by phase",
            messages.clone(),
        );
        let message_seconds = Family::<PhaseLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "message_duration_seconds",
            "Time from reading an ext_proc message to having its answers ready to send, by \
             phase: the plugins' calls, any wait for an instance and the host's own work. The \
             time a message waited before the host read it is in Envoy's ext_proc latency \
             (access log: request_header_latency_us and the like), not here",
            message_seconds.clone(),
        );
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "plugin_calls",
            "Plugin handler calls by plugin, phase and outcome (ok, or the failure kind)",
            calls.clone(),
        );
        let responses = Family::<ResponseLabels, Counter>::default();
        registry.register(
            "plugin_responses",
            "Immediate responses plugins answered with instead of passing a message on, by plugin \
             and HTTP status (a rate limit's 429s, an auth check's 401s); failure policies' \
             answers are not counted here but in plugin_calls",
            responses.clone(),
        );
        let call_seconds = Family::<PluginPhaseLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "plugin_call_duration_seconds",
            "Time spent in plugin handler calls, by plugin and phase",
            call_seconds.clone(),
        );
        let instantiate_seconds = Family::<PluginLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "plugin_instantiate_duration_seconds",
            "Time to create a plugin instance for a stream, by plugin",
            instantiate_seconds.clone(),
        );
        let active_streams = Gauge::default();
        registry.register(
            "active_streams",
            "ext_proc streams being served",
            active_streams.clone(),
        );
        let streams = Counter::default();
        let idle_streams = Counter::default();
        registry.register(
            "idle_streams_ended",
            "ext_proc streams ended because no message came for stream_idle_timeout_ms; their \
             instances went back to the pool",
            idle_streams.clone(),
        );
        let bodies_over_budget = Counter::default();
        registry.register(
            "bodies_over_budget",
            "Body messages the host had no room for under [runtime] max_body_bytes_in_flight: \
             the plugins that would have seen them got their failure policy (kind body_budget)",
            bodies_over_budget.clone(),
        );
        registry.register("streams", "ext_proc streams opened", streams.clone());
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "reloads",
            "Plugin chain loads (start-up included), by result (ok, error)",
            reloads.clone(),
        );
        let log_lines_suppressed = Family::<PluginLabel, Counter>::default();
        registry.register(
            "plugin_log_lines_suppressed",
            "Plugin log lines dropped over the plugin's log_lines_per_second budget, by plugin",
            log_lines_suppressed.clone(),
        );
        let shadow_differences = Family::<PluginLabel, Counter>::default();
        registry.register(
            "shadow_differences",
            "Calls of a shadow plugin whose output differed from the plugin it runs beside, by \
             the shadow plugin",
            shadow_differences.clone(),
        );
        let shadow_failures = Family::<ShadowFailureLabels, Counter>::default();
        registry.register(
            "shadow_failures",
            "Failed calls of a shadow plugin (never applied to the exchange), by the shadow \
             plugin and failure kind",
            shadow_failures.clone(),
        );
        let bodies_not_sent = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "bodies_not_sent",
            "Streams on which plugins handle a direction's body but Envoy sends none of it \
             (its ext_proc body mode is NONE), by direction",
            bodies_not_sent.clone(),
        );
        let refused = Family::<RefusalLabel, Counter>::default();
        registry.register(
            "refused",
            "Clients the server turned away, by listener (ext_proc, admin) and reason",
            refused.clone(),
        );
        let unknown_chains = Family::<AnswerLabel, Counter>::default();
        registry.register(
            "unknown_chain_streams",
            "Streams that asked for a chain that does not exist, by the answer they got \
             (unknown_chain: default, reject)",
            unknown_chains.clone(),
        );
        let pool = PoolMetrics::default();
        registry.register(
            "instances_in_use",
            "Plugin instances alive now, across all streams ([runtime] max_instances at most)",
            pool.in_use.clone(),
        );
        registry.register(
            "instance_pool_size",
            "Plugin instances the pool holds at most ([runtime] max_instances)",
            pool.size.clone(),
        );
        registry.register(
            "instance_waits",
            "Instantiations that found the instance pool full and waited for a free instance",
            pool.waits.clone(),
        );
        registry.register(
            "instance_pool_exhausted",
            "Instantiations that waited [runtime] instance_wait_ms in vain (the failure policy applied)",
            pool.exhausted.clone(),
        );
        let messages_by_phase = Phase::ALL.map(|phase| {
            messages
                .get_or_create(&PhaseLabel {
                    phase: phase.as_str(),
                })
                .clone()
        });
        let message_seconds_by_phase = Phase::ALL.map(|phase| {
            message_seconds
                .get_or_create(&PhaseLabel {
                    phase: phase.as_str(),
                })
                .clone()
        });
        // Series with a fixed set of labels exist from the start, at zero, so that the first
        // event is an increase a query over a time window can see.
        for result in ["ok", "error"] {
            let _ = reloads.get_or_create(&ResultLabel { result });
        }
        for direction in Direction::BOTH {
            let _ = bodies_not_sent.get_or_create(&DirectionLabel {
                direction: direction.noun(),
            });
        }
        for answer in ["default", "reject"] {
            let _ = unknown_chains.get_or_create(&AnswerLabel { answer });
        }
        for (listener, reason) in REFUSALS {
            let _ = refused.get_or_create(&RefusalLabel { listener, reason });
        }
        Arc::new(Metrics {
            registry,
            messages_by_phase,
            message_seconds_by_phase,
            messages,
            calls,
            responses,
            call_seconds,
            instantiate_seconds,
            active_streams,
            streams,
            idle_streams,
            bodies_over_budget,
            reloads,
            log_lines_suppressed,
            shadow_differences,
            shadow_failures,
            bodies_not_sent,
            refused,
            unknown_chains,
            pool,
            families: Mutex::new(Families {
                registry: Registry::with_prefix("wasm_extproc"),
                by_name: HashMap::new(),
            }),
            plugins: Mutex::default(),
        })
    }

    /// The family `name`, registered with `help` on first use: how a capability's own module
    /// keeps its series, without an entry here. Asked again (a second runtime on the same
    /// metrics), it is the same family.
    pub fn family<F>(&self, name: &'static str, help: &str, make: impl FnOnce() -> F) -> F
    where
        F: Metric + Clone,
    {
        let mut families = self.families.lock().expect("metric families");
        if let Some(family) = families
            .by_name
            .get(name)
            .and_then(|f| f.downcast_ref::<F>())
        {
            return family.clone();
        }
        let family = make();
        families.registry.register(name, help, family.clone());
        families.by_name.insert(name, Box::new(family.clone()));
        family
    }

    /// The instance pool's series, for the runtime to update.
    pub fn pool(&self) -> PoolMetrics {
        self.pool.clone()
    }

    /// The counter of `plugin`'s log lines dropped over its budget, for its
    /// [`LogBudget`](crate::log_budget::LogBudget).
    pub fn log_lines_suppressed(&self, chain: &str, plugin: &str) -> Counter {
        self.note_plugin(chain, plugin);
        self.log_lines_suppressed
            .get_or_create(&PluginLabel {
                chain: chain.to_string(),
                plugin: plugin.to_string(),
            })
            .clone()
    }

    /// The value of the counter `name` (without the `wasm_extproc_` prefix and `_total`) with
    /// `labels`, in the order its family declares them; 0 if it has no such series. It reads
    /// the exposition, so it finds a capability's own families too: for tests and tools.
    pub fn counter_value(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        let series = format!("wasm_extproc_{name}_total{{{}}} ", labels.join(","));
        self.render()
            .lines()
            .find_map(|line| line.strip_prefix(&series))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Counts a call of the shadow plugin `plugin` whose output differed from its target's.
    pub fn shadow_difference(&self, chain: &str, plugin: &str) {
        self.shadow_differences
            .get_or_create(&PluginLabel {
                chain: chain.to_string(),
                plugin: plugin.to_string(),
            })
            .inc();
    }

    /// Counts a failed call of the shadow plugin `plugin`.
    pub fn shadow_failure(&self, chain: &str, plugin: &str, kind: &'static str) {
        self.shadow_failures
            .get_or_create(&ShadowFailureLabels {
                chain: chain.to_string(),
                plugin: plugin.to_string(),
                kind,
            })
            .inc();
    }

    /// How many calls of the shadow plugin `plugin` in `chain` differed from its target's.
    pub fn shadow_differences(&self, chain: &str, plugin: &str) -> u64 {
        self.shadow_differences
            .get(&PluginLabel {
                chain: chain.to_string(),
                plugin: plugin.to_string(),
            })
            .map_or(0, |c| c.get())
    }

    /// How many calls of the shadow plugin `plugin` in `chain` failed with `kind`.
    pub fn shadow_failures(&self, chain: &str, plugin: &str, kind: &'static str) -> u64 {
        self.shadow_failures
            .get(&ShadowFailureLabels {
                chain: chain.to_string(),
                plugin: plugin.to_string(),
                kind,
            })
            .map_or(0, |c| c.get())
    }

    fn note_plugin(&self, chain: &str, plugin: &str) {
        self.plugins
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert((chain.to_string(), plugin.to_string()));
    }

    /// The chains that have a plugin named `plugin`.
    fn chains_of(&self, plugin: &str) -> Vec<String> {
        self.plugins
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .filter(|(_, p)| p == plugin)
            .map(|(chain, _)| chain.clone())
            .collect()
    }

    /// Counts a stream on which Envoy sends none of the `direction` body plugins handle.
    pub fn body_not_sent(&self, direction: Direction) {
        self.bodies_not_sent
            .get_or_create(&DirectionLabel {
                direction: direction.noun(),
            })
            .inc();
    }

    /// Counts a stream that asked for a chain that does not exist and got `answer`
    /// (`default`, `reject`).
    pub fn unknown_chain(&self, answer: &'static str) {
        self.unknown_chains
            .get_or_create(&AnswerLabel { answer })
            .inc();
    }

    /// How many streams [`unknown_chain`](Self::unknown_chain) counted with `answer`.
    pub fn unknown_chains(&self, answer: &'static str) -> u64 {
        self.unknown_chains
            .get(&AnswerLabel { answer })
            .map_or(0, |c| c.get())
    }

    /// Counts a client turned away by `listener` (`ext_proc`, `admin`) for `reason`.
    pub fn refused(&self, listener: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&RefusalLabel { listener, reason })
            .inc();
    }

    /// How many clients [`refused`](Self::refused) counted for `listener` and `reason`.
    pub fn refusals(&self, listener: &'static str, reason: &'static str) -> u64 {
        self.refused
            .get(&RefusalLabel { listener, reason })
            .map_or(0, |counter| counter.get())
    }

    /// How many streams [`body_not_sent`](Self::body_not_sent) counted.
    pub fn bodies_not_sent(&self, direction: Direction) -> u64 {
        self.bodies_not_sent
            .get(&DirectionLabel {
                direction: direction.noun(),
            })
            .map_or(0, |c| c.get())
    }

    pub fn message_received(&self, phase: Phase) {
        self.messages_by_phase[phase as usize].inc();
    }

    /// A message of `phase` took `took` from being read to having its answers.
    pub fn message_handled(&self, phase: Phase, took: Duration) {
        self.message_seconds_by_phase[phase as usize].observe(took.as_secs_f64());
    }

    /// How many messages of `phase` arrived.
    pub fn messages_received(&self, phase: Phase) -> u64 {
        self.messages
            .get(&PhaseLabel {
                phase: phase.as_str(),
            })
            .map_or(0, |c| c.get())
    }

    /// The series of one plugin, looked up on first use and kept: what a stream records for
    /// each call, without building labels.
    pub fn for_plugin(self: &Arc<Self>, chain: &str, plugin: &str) -> PluginMetrics {
        self.note_plugin(chain, plugin);
        PluginMetrics {
            metrics: self.clone(),
            chain: chain.to_string(),
            plugin: plugin.to_string(),
            calls: Default::default(),
            call_seconds: Default::default(),
            instantiate_seconds: OnceLock::new(),
        }
    }

    /// Counts a stream as open until the returned guard drops.
    pub fn stream_opened(self: &Arc<Self>) -> StreamGuard {
        self.streams.inc();
        self.active_streams.inc();
        StreamGuard(self.clone())
    }

    /// Counts a stream ended for its idleness.
    pub fn idle_stream_ended(&self) {
        self.idle_streams.inc();
    }

    pub fn idle_streams_ended(&self) -> u64 {
        self.idle_streams.get()
    }

    /// The counter of body messages there was no room for, for the
    /// [`BodyBudget`](crate::bodies::BodyBudget).
    pub fn bodies_over_budget_counter(&self) -> Counter {
        self.bodies_over_budget.clone()
    }

    pub fn bodies_over_budget(&self) -> u64 {
        self.bodies_over_budget.get()
    }

    pub fn active_streams(&self) -> i64 {
        self.active_streams.get()
    }

    pub fn reload(&self, result: &'static str) {
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    /// How many loads ended with `result`.
    pub fn reloads(&self, result: &'static str) -> u64 {
        self.reloads
            .get(&ResultLabel { result })
            .map_or(0, |c| c.get())
    }

    /// How many calls of `plugin` (in whichever chains have one) in `phase` ended with
    /// `outcome`.
    pub fn plugin_calls(&self, plugin: &str, phase: Phase, outcome: &'static str) -> u64 {
        self.chains_of(plugin)
            .iter()
            .map(|chain| self.chain_plugin_calls(chain, plugin, phase, outcome))
            .sum()
    }

    /// How many calls of `plugin` in `chain` and `phase` ended with `outcome`.
    pub fn chain_plugin_calls(
        &self,
        chain: &str,
        plugin: &str,
        phase: Phase,
        outcome: &'static str,
    ) -> u64 {
        self.calls
            .get(&CallLabels {
                chain: chain.to_string(),
                plugin: plugin.to_string(),
                phase: phase.as_str(),
                outcome,
            })
            .map_or(0, |c| c.get())
    }

    /// How many immediate responses with `status` `plugin` in `chain` answered with.
    pub fn plugin_responses(&self, chain: &str, plugin: &str, status: u16) -> u64 {
        self.responses
            .get(&ResponseLabels {
                chain: chain.to_string(),
                plugin: plugin.to_string(),
                status,
            })
            .map_or(0, |c| c.get())
    }

    /// How many calls of `plugin` in `chain`, in any phase, ended with `outcome`.
    pub fn chain_plugin_outcomes(&self, chain: &str, plugin: &str, outcome: &'static str) -> u64 {
        Phase::ALL
            .into_iter()
            .map(|phase| self.chain_plugin_calls(chain, plugin, phase, outcome))
            .sum()
    }

    /// How many calls of `plugin`, in any phase, ended with `outcome`.
    pub fn plugin_outcomes(&self, plugin: &str, outcome: &'static str) -> u64 {
        Phase::ALL
            .into_iter()
            .map(|phase| self.plugin_calls(plugin, phase, outcome))
            .sum()
    }

    /// Every counter and gauge series that has a value, for a front end that publishes them
    /// elsewhere than the Prometheus endpoint (histograms are only there).
    pub fn samples(&self) -> Vec<Sample> {
        let counter = |name, labels: Vec<(&str, String)>, value| Sample {
            name,
            labels: labels
                .into_iter()
                .map(|(name, value)| (name.to_string(), value))
                .collect(),
            value,
            kind: SampleKind::Counter,
        };
        let gauge = |name, value: i64| Sample {
            name,
            labels: Vec::new(),
            value: value.max(0) as u64,
            kind: SampleKind::Gauge,
        };
        let mut samples = vec![
            counter("streams", Vec::new(), self.streams.get()),
            gauge("active_streams", self.active_streams.get()),
            gauge("instances_in_use", self.pool.in_use.get()),
            counter("instance_waits", Vec::new(), self.pool.waits.get()),
            counter(
                "instance_pool_exhausted",
                Vec::new(),
                self.pool.exhausted.get(),
            ),
        ];
        for result in ["ok", "error"] {
            samples.push(counter(
                "reloads",
                vec![("result", result.to_string())],
                self.reloads(result),
            ));
        }
        for phase in Phase::ALL {
            samples.push(counter(
                "messages_received",
                vec![("phase", phase.as_str().to_string())],
                self.messages_received(phase),
            ));
        }
        for answer in ["default", "reject"] {
            let value = self.unknown_chains(answer);
            if value > 0 {
                samples.push(counter(
                    "unknown_chain_streams",
                    vec![("answer", answer.to_string())],
                    value,
                ));
            }
        }
        let plugins = self
            .plugins
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        for (chain, plugin) in plugins {
            let suppressed = self
                .log_lines_suppressed
                .get(&PluginLabel {
                    chain: chain.clone(),
                    plugin: plugin.clone(),
                })
                .map_or(0, |c| c.get());
            if suppressed > 0 {
                samples.push(counter(
                    "plugin_log_lines_suppressed",
                    vec![("chain", chain.clone()), ("plugin", plugin.clone())],
                    suppressed,
                ));
            }
            let differences = self.shadow_differences(&chain, &plugin);
            if differences > 0 {
                samples.push(counter(
                    "shadow_differences",
                    vec![("chain", chain.clone()), ("plugin", plugin.clone())],
                    differences,
                ));
            }
            for kind in OUTCOMES.into_iter().skip(1) {
                let failures = self.shadow_failures(&chain, &plugin, kind);
                if failures > 0 {
                    samples.push(counter(
                        "shadow_failures",
                        vec![
                            ("chain", chain.clone()),
                            ("plugin", plugin.clone()),
                            ("kind", kind.to_string()),
                        ],
                        failures,
                    ));
                }
            }
            for phase in Phase::ALL {
                for outcome in OUTCOMES {
                    let value = self.chain_plugin_calls(&chain, &plugin, phase, outcome);
                    if value > 0 {
                        samples.push(counter(
                            "plugin_calls",
                            vec![
                                ("chain", chain.clone()),
                                ("plugin", plugin.clone()),
                                ("phase", phase.as_str().to_string()),
                                ("outcome", outcome.to_string()),
                            ],
                            value,
                        ));
                    }
                }
            }
        }
        samples.extend(self.capability_counters());
        samples
    }

    /// The counters capabilities registered ([`family`](Self::family): outbound requests,
    /// state store operations), read back from their exposition.
    fn capability_counters(&self) -> Vec<Sample> {
        use prometheus_client::encoding::text::encode_registry;
        let families = self.families.lock().expect("metric families");
        let mut text = String::new();
        encode_registry(&mut text, &families.registry).expect("writing to a String cannot fail");
        text.lines()
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (name, labels) = series.split_once('{')?;
                let name = name.strip_prefix("wasm_extproc_")?.strip_suffix("_total")?;
                let name = *families.by_name.keys().find(|n| **n == name)?;
                Some(Sample {
                    name,
                    labels: exposition_labels(labels.strip_suffix('}')?)?,
                    value: value.parse().ok()?,
                    kind: SampleKind::Counter,
                })
            })
            .collect()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut text = String::new();
        let families = self.families.lock().expect("metric families");
        encode_registry(&mut text, &self.registry)
            .and_then(|()| encode_registry(&mut text, &families.registry))
            .and_then(|()| encode_eof(&mut text))
            .expect("writing to a String cannot fail");
        text
    }
}

/// One plugin's series. Each is created the first time it is recorded, so the exposition
/// lists only what happened, as with labels looked up on every call.
#[derive(Debug)]
pub struct PluginMetrics {
    metrics: Arc<Metrics>,
    chain: String,
    plugin: String,
    calls: [[OnceLock<Counter>; OUTCOMES.len()]; 6],
    call_seconds: [OnceLock<Histogram>; 6],
    instantiate_seconds: OnceLock<Histogram>,
}

impl PluginMetrics {
    /// Counts a call of `phase` that ended with `outcome` (see [`OUTCOMES`]) after `took`.
    pub fn call(&self, phase: Phase, outcome: &'static str, took: Duration) {
        let index = OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .expect("outcome listed in OUTCOMES");
        self.calls[phase as usize][index]
            .get_or_init(|| {
                self.metrics
                    .calls
                    .get_or_create(&CallLabels {
                        chain: self.chain.clone(),
                        plugin: self.plugin.clone(),
                        phase: phase.as_str(),
                        outcome,
                    })
                    .clone()
            })
            .inc();
        self.call_seconds[phase as usize]
            .get_or_init(|| {
                self.metrics
                    .call_seconds
                    .get_or_create(&PluginPhaseLabels {
                        chain: self.chain.clone(),
                        plugin: self.plugin.clone(),
                        phase: phase.as_str(),
                    })
                    .clone()
            })
            .observe(took.as_secs_f64());
    }

    /// Counts an immediate response the plugin answered with.
    pub fn responded(&self, status: u16) {
        self.metrics
            .responses
            .get_or_create(&ResponseLabels {
                chain: self.chain.clone(),
                plugin: self.plugin.clone(),
                status,
            })
            .inc();
    }

    /// Counts a call of this shadow plugin whose output differed from its target's.
    pub fn shadow_difference(&self) {
        self.metrics.shadow_difference(&self.chain, &self.plugin);
    }

    /// Counts a failed call of this shadow plugin.
    pub fn shadow_failure(&self, kind: &'static str) {
        self.metrics.shadow_failure(&self.chain, &self.plugin, kind);
    }

    pub fn instantiated(&self, took: Duration) {
        self.instantiate_seconds
            .get_or_init(|| {
                self.metrics
                    .instantiate_seconds
                    .get_or_create(&PluginLabel {
                        chain: self.chain.clone(),
                        plugin: self.plugin.clone(),
                    })
                    .clone()
            })
            .observe(took.as_secs_f64());
    }
}

/// Marks one stream as active while it lives.
#[derive(Debug)]
pub struct StreamGuard(Arc<Metrics>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.active_streams.dec();
    }
}

/// The labels of one exposition line, `name="value",...` (values escaped as the exposition
/// escapes them).
fn exposition_labels(text: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((name.to_string(), value));
        rest = after[end + 1..]
            .strip_prefix(',')
            .unwrap_or(&after[end + 1..]);
    }
    Some(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        chain: String,
        destination: String,
    }

    #[test]
    fn counters_capabilities_register_are_samples_too() {
        let metrics = Metrics::new();
        let family = metrics.family(
            "outbound_requests",
            "help",
            Family::<Labels, Counter>::default,
        );
        let labels = Labels {
            chain: "default".into(),
            destination: "http://127.0.0.1:80".into(),
        };
        family.get_or_create(&labels).inc_by(2);
        let sample = metrics
            .samples()
            .into_iter()
            .find(|s| s.name == "outbound_requests")
            .expect("the capability's counter");
        assert_eq!(
            sample.labels,
            [
                ("chain".to_string(), "default".to_string()),
                ("destination".to_string(), "http://127.0.0.1:80".to_string()),
            ]
        );
        assert_eq!((sample.value, sample.kind), (2, SampleKind::Counter));
        assert_eq!(
            exposition_labels(r#"a="x\"y,z",b="""#),
            Some(vec![
                ("a".to_string(), "x\"y,z".to_string()),
                ("b".to_string(), String::new()),
            ])
        );
    }
}
